"""``dmdctl distill``: see :data:`dmdctl.settings.distill.HELP`."""

from __future__ import annotations

from pathlib import Path

from dmdctl.commands import report
from dmdctl.settings.distill import DistillConfig


def run(cfg: DistillConfig) -> int | None:
    """Run the command on resolved settings (its help: :data:`dmdctl.settings.distill.HELP`)."""
    from dmdctl.training.loop import distill

    result = distill(cfg)
    return report(
        "distill",
        result,
        f" at step {result.get('step')}; checkpoint saved in {Path(cfg.out) / 'checkpoints'}. "
        "Resume with the same command plus --resume latest",
    )
