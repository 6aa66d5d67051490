"""One module per ``dmdctl`` command: the work it does, and ``run(settings)``, which the CLI calls
with the resolved settings (``dmdctl.settings``) and whose return value is the exit code of a
run stopped by a signal (None: 0). These modules import torch; the CLI imports one only when its
command runs."""

from __future__ import annotations


def show(title: str, result: dict) -> None:
    """The command's result as a table on stdout (nested values are left to the files)."""
    from dmdctl.ui import print_table, summary_table

    print_table(
        summary_table(title, {k: v for k, v in result.items() if not isinstance(v, (dict, list))})
    )


def stopped_code(signal_name: str) -> int:
    """The exit code of a run stopped by a signal: 130 for SIGINT, 143 for SIGTERM."""
    return 130 if signal_name == "SIGINT" else 143


def report(title: str, result: dict, stopped: str) -> int | None:
    """End a command that a signal can stop: the main process of a launch shows the result and,
    for a stopped run, one line (``stopped``: what was kept and how to resume); the exit code is
    130 (SIGINT) or 143 (SIGTERM) for a stopped run, None otherwise."""
    from dmdctl.runtime import is_main_launch_process
    from dmdctl.ui import error_line

    main = is_main_launch_process()  # the other processes of a launch print nothing
    if main:
        show(title, result)
    if "interrupted" not in result:
        return None
    if main:
        error_line(f"stopped by {result['interrupted']}{stopped}")
    return stopped_code(result["interrupted"])
