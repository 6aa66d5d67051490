"""``dmdctl distill``: see :data:`dmdctl.settings.distill.HELP`."""

from __future__ import annotations

from pathlib import Path

from dmdctl.commands import show, stopped_code
from dmdctl.settings.distill import DistillConfig


def run(cfg: DistillConfig) -> int | None:
    """Run the command on resolved settings (its help: :data:`dmdctl.settings.distill.HELP`)."""
    from dmdctl.runtime import is_main_launch_process
    from dmdctl.training.loop import distill
    from dmdctl.ui import error_line

    result = distill(cfg)
    main = is_main_launch_process()  # the other processes of a launch print nothing
    if main:
        show("distill", result)
    if "interrupted" not in result:
        return None
    if main:
        error_line(
            f"stopped by {result['interrupted']} at step {result['step']}; checkpoint saved "
            f"in {Path(cfg.out) / 'checkpoints'}. Resume with the same command plus --resume latest"
        )
    return stopped_code(result["interrupted"])
