"""One module per ``dmdctl`` command holding what a user can set: its settings dataclass
(``SETTINGS``, each option declared once with :func:`dmdctl.options.option`) and its help text
(``HELP``). The work itself is in ``dmdctl.commands``, under the same module name.

Nothing here imports torch at import time, so ``dmdctl --help`` and a mistyped flag answer at
once; ``dmdctl.cli`` builds the Typer commands from :data:`COMMANDS`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

# command name -> module name under dmdctl.settings and dmdctl.commands, in --help's order
COMMANDS: dict[str, str] = {
    "train-teacher": "train_teacher",
    "make-pairs": "make_pairs",
    "prepare-real": "prepare_real",
    "distill": "distill",
    "eval-fid": "eval_fid",
    "sample": "sample",
    "export": "export",
    "convert-edm": "convert_edm",
    "clip-score": "clip_score",
    "demo": "demo",
    "env": "env",
}


def settings_module(name: str) -> ModuleType:
    """The settings module of command ``name`` (light: no torch)."""
    return importlib.import_module(f"{__name__}.{COMMANDS[name]}")


def command_module(name: str) -> ModuleType:
    """The module that does command ``name``'s work (imports torch)."""
    return importlib.import_module(f"dmdctl.commands.{COMMANDS[name]}")


def preset_defaults(settings: type) -> dict[str, dict[str, Any]]:
    """What each teacher preset (or demo) runs a command with where its preset layer sets a
    value: field name -> {preset: value}, presets in the registry's order. ``--help``'s
    per-preset defaults are checked against it and docs/CLI.md is written from it. Imports the
    teacher registry (and so torch, about a second): never called for ``--help``."""
    from dmdctl.options import declared_fields
    from dmdctl.teachers import presets

    names = {f.name for f in declared_fields(settings)}
    out: dict[str, dict[str, Any]] = {}
    for preset in presets():
        for name, value in settings.preset_layer({"teacher": preset}).items():
            if name in names:
                out.setdefault(name, {})[preset] = value
    return out
