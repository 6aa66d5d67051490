"""One module per ``dmdctl`` command: its settings dataclass (``SETTINGS``, each option declared
once with :func:`dmdctl.options.option`) and a ``run(settings)`` that imports the work it does
only when it runs and returns the exit code of a stopped run (None: 0).

Nothing here imports torch at import time, so ``dmdctl --help`` and a mistyped flag answer at
once; ``dmdctl.cli`` builds the Typer commands from :data:`COMMANDS`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# command name -> module under dmdctl.commands, in the order of ``dmdctl --help``
COMMANDS: dict[str, str] = {
    "train-teacher": "train_teacher",
    "make-pairs": "make_pairs",
    "distill": "distill",
    "eval-fid": "eval_fid",
    "sample": "sample",
    "export": "export",
    "convert-edm": "convert_edm",
    "clip-score": "clip_score",
    "demo": "demo",
}


def command_module(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{COMMANDS[name]}")
