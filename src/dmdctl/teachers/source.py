"""The published run a preset's length comes from, and the run-length line ``distill`` prints.

``--steps`` counts generator updates. DMD2's scripts count *iterations*: one fake-score update
each, the generator updating on every ``dfake_gen_update_ratio``-th (``main/train_sd.py``,
``main/edm/train_edm.py``: ``self.step % self.dfake_gen_update_ratio == 0``), so a DMD2
checkpoint at N iterations holds N / ratio generator updates, and a dmdctl run of S steps with
F fake updates per step is S x F iterations. The facts (iterations, ratio, FID) are written once,
next to the presets (``"source"`` entries in the teacher kinds); docs/RECIPES.md shows the same
arithmetic and tests/test_recipes.py holds the two together.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceCheckpoint:
    """A published checkpoint: how many iterations its run (or stage) trained, at which ratio."""

    checkpoint: str  # what the log line calls it: "its SD1.5 stage-1 checkpoint"
    iterations: int  # iterations of this run or stage (one fake-score update each)
    ratio: int  # fake-score updates per generator update (DMD2's dfake_gen_update_ratio)
    fid: float | None = None

    def __post_init__(self):
        if self.iterations % self.ratio:
            raise ValueError(
                f"{self.checkpoint}: {self.iterations} is not a multiple of {self.ratio}"
            )

    @property
    def steps(self) -> int:
        """The checkpoint's length in generator updates (dmdctl's ``--steps``)."""
        return self.iterations // self.ratio


def run_length_line(
    steps: int, fake_updates: int, preset: str | None = None, source: SourceCheckpoint | None = None
) -> str:
    """The run's length in generator steps and in DMD2 iterations and, for a preset, how it
    compares with the checkpoint the preset's recipe comes from."""
    line = f"{steps:,} generator steps = {steps * fake_updates:,} DMD2 iterations"
    notes = []
    if fake_updates != 1 and (source is None or fake_updates != source.ratio):
        notes.append(f"{fake_updates} fake-score updates each")
    if preset is not None and source is None:
        notes.append(f"the {preset} preset's length is ours: no published run gives one")
    elif source is not None:
        fid = f", FID {source.fid:g}" if source.fid is not None else ""
        if steps == source.steps and fake_updates == source.ratio:
            notes.append(source.checkpoint + fid)
        else:
            notes.append(
                f"the {preset} preset's source, {source.checkpoint}{fid}, trained "
                f"{source.steps:,} generator steps = {source.iterations:,} iterations at "
                f"{source.ratio} fake updates each"
            )
    return line + (f" ({'; '.join(notes)})" if notes else "")
