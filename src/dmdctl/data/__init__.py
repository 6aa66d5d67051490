"""What a training step draws from disk: prompts, real samples for the GAN, noise->image pairs.

Each source is opened once per process, checked before anything is written, and read by row:
a step draws its row indices from the step's seeded generator (for the global batch, each
process keeping its slice) and asks the source for those rows only. Nothing is read whole, so
memory does not grow with the number of rows, and every process of a launch opens the same
files on its own (a shared filesystem is enough; nobody waits for a main process to prepare
them).

- :mod:`dmdctl.data.prompts`: prompt files (text, JSONL, Arrow/Parquet column) indexed by row,
  encoded by the frozen text encoders inside the step (or from a small cache).
- :mod:`dmdctl.data.real`: the real-sample store made once by ``dmdctl prepare-real``.
- :mod:`dmdctl.data.pairs`: the pairs store made by ``dmdctl make-pairs``, memory-mapped.
"""
