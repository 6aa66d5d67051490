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
