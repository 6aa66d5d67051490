"""Console output: rich progress bars and summary tables on stderr/stdout."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def progress(transient: bool = False, disable: bool | None = None) -> Progress:
    """A progress bar on stderr; hidden when DMDCTL_QUIET=1 or on a non-main process."""
    if disable is None:
        disable = os.environ.get("DMDCTL_QUIET") == "1"
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=err_console,
        transient=transient,
        disable=disable,
    )


def summary_table(title: str, rows: dict | list[tuple[str, object]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    items = rows.items() if isinstance(rows, dict) else rows
    for k, v in items:
        if isinstance(v, float):
            v = f"{v:.4g}"
        table.add_row(str(k), str(v))
    return table


def print_table(table: Table) -> None:
    console.print(table)


def info(message: str) -> None:
    err_console.print(message)


def error_line(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
