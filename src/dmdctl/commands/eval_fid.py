"""``dmdctl eval-fid``: see :data:`dmdctl.settings.eval_fid.HELP`."""

from __future__ import annotations

from dmdctl.settings.eval_fid import EvalFidConfig


def run(cfg: EvalFidConfig) -> int | None:
    """Run the command on resolved settings (its help: :data:`dmdctl.settings.eval_fid.HELP`)."""
    from dmdctl.metrics.evaluate import evaluate, result_rows
    from dmdctl.runtime import is_main_launch_process
    from dmdctl.ui import print_table, summary_table

    result = evaluate(cfg, multiprocess=True)
    if is_main_launch_process():
        print_table(summary_table("eval-fid", result_rows(result)))
    return None
