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

from __future__ import annotations


def check_together(state, checks: list) -> None:
    """Run this process's share of ``checks`` (callables that raise UserError; process r takes
    every world-th one) and agree on the outcome: when any process found a fault, every process
    raises it (the main one says it, the others exit quietly), so nobody waits at a collective
    for a process that has stopped. Used for the shards' sha256 at the start of a run: the work
    is split, not done by one process while the others wait."""
    from dmdctl.errors import UserError
    from dmdctl.runtime import QuietUserError

    rank = state.process_index if state is not None else 0
    world = state.num_processes if state is not None else 1
    fault = None
    for check in checks[rank::world]:
        try:
            check()
        except UserError as e:
            fault = str(e)
            break
    if world > 1:
        from accelerate.utils import gather_object

        faults = [f for f in gather_object([fault]) if f]
        fault = faults[0] if faults else None
    if fault is not None:
        if state is None or state.is_main_process:
            raise UserError(fault)
        raise QuietUserError(fault)


class RowGuard:
    """Reads rows through ``fetch(indices)``; with ``skip`` (``--skip-bad-records``) a row that
    fails with :class:`~dmdctl.errors.DataError` is replaced by the next row that reads, and
    counted (``count``; ``last`` names the latest). Without ``skip`` the error goes on up and
    stops the run (its last checkpoint stays as it was)."""

    def __init__(self, skip: bool = False):
        self.skip = skip
        self.count = 0
        self.last: str | None = None

    def read(self, fetch, idx: list[int], rows: int):
        from dmdctl.errors import DataError

        try:
            return fetch(list(idx))
        except DataError as e:
            if not self.skip:
                raise
            self.last = str(e)
        parts = []
        for i in idx:
            for k in range(rows):
                try:
                    parts.append(fetch([(i + k) % rows]))
                    break
                except DataError as e:
                    if k == 0:
                        self.count += 1
                        self.last = str(e)
            else:
                raise DataError(f"no row of this source can be read any more ({self.last})")
        return _join(parts)


def _join(parts):
    """One batch from single-row batches: tensors concatenated, lists joined, tuples by item."""
    import torch

    first = parts[0]
    if isinstance(first, tuple):
        return tuple(_join([p[i] for p in parts]) for i in range(len(first)))
    if first is None:
        return None
    if isinstance(first, list):
        return [x for p in parts for x in p]
    return torch.cat(parts)
