"""One declaration per option: a config dataclass field carries its default, help, limits and
choices, and both the command line and the range checks are generated from it.

    steps: int = option(2000, "Generator updates.", min=1)

``typer_parameters(cls)`` turns the fields into Typer options whose own default is None (so a flag
left out can be told from one given), with the field's real default and range shown in
``--help``; ``check_options(cfg)`` applies the limits and choices with one message shape for every
option. This module imports neither torch nor typer at import time: ``dmdctl --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from pathlib import Path
from typing import Annotated, Any

from dmdctl.errors import UserError

MISSING = dataclasses.MISSING

# The panels of ``--help`` (and the sections of docs/CLI.md), in the order they are shown; every
# option names one (``option(..., panel="DMD2")``), an argument none (it shows under Arguments).
PANELS = (
    "Inputs",
    "Sampling",
    "Training",
    "Losses",
    "DMD2",
    "LoRA",
    "Evaluation",
    "Output",
    "Checkpoints and logging",
    "Device, precision and speed",
)


def option(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    below: float | None = None,
    choices: tuple[str, ...] | None = None,
    path: bool = False,
    argument: bool = False,
    cli: bool = True,
    show_default: str | None = None,
    flags: tuple[str, ...] | None = None,
    panel: str | None = None,
) -> Any:
    """A dataclass field with what the CLI and the checks need.

    ``min``/``max`` are inclusive, ``above``/``below`` exclusive limits; ``choices`` a closed set
    of strings; ``path`` shows the option as a path; ``argument`` makes it positional; ``cli=False``
    keeps a field out of the command line (set by presets or --config only); ``show_default``
    replaces the shown default (a default that depends on the teacher, say: written as
    ``"toy2d 8000, digits 5000"``, which tests hold to the presets); ``flags`` replaces the
    generated flag names (``("--out", "-o")``, ``("--real-only/--with-fake",)``); ``panel`` is the
    group of ``--help`` (one of :data:`PANELS`) the option is shown in."""
    if panel is not None and panel not in PANELS:
        raise ValueError(f"unknown help panel {panel!r} (known: {', '.join(PANELS)})")
    meta = {
        "help": help,
        "min": min,
        "max": max,
        "above": above,
        "below": below,
        "choices": tuple(choices) if choices else None,
        "path": path,
        "argument": argument,
        "cli": cli,
        "show_default": show_default,
        "flags": tuple(flags) if flags else None,
        "panel": panel,
    }
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown_flag(f: dataclasses.Field) -> str:
    """The long flag a message names: ``--class`` for ``class_label``, ``--out`` for ``out``."""
    flags = f.metadata.get("flags")
    if f.metadata.get("argument"):
        return f.name.upper()
    if flags:
        return flags[0].split("/")[0]
    return flag_name(f.name)


def declared_fields(cls) -> list[dataclasses.Field]:
    """The fields declared with :func:`option` (the settings a user can give)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def bare_type(hint) -> type:
    """``int | None`` -> int, ``str`` -> str."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def range_text(meta: dict) -> str:
    """The limits in words, for --help: ">= 1", "> 0", "0..1"."""
    lo = (
        (">=", meta["min"])
        if meta["min"] is not None
        else (">", meta["above"])
        if meta["above"] is not None
        else None
    )
    hi = (
        ("<=", meta["max"])
        if meta["max"] is not None
        else ("<", meta["below"])
        if meta["below"] is not None
        else None
    )
    if lo and hi:
        return f"{lo[0]} {_fmt(lo[1])} and {hi[0]} {_fmt(hi[1])}"
    if lo:
        return f"{lo[0]} {_fmt(lo[1])}"
    if hi:
        return f"{hi[0]} {_fmt(hi[1])}"
    if meta["choices"]:
        return "one of " + ", ".join(meta["choices"])
    return ""


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def shown_default(f: dataclasses.Field) -> str | None:
    meta = f.metadata
    if meta.get("show_default"):
        return meta["show_default"]
    value = default_of(f)
    if value is None or (isinstance(value, bool) and value is False):
        return None
    if value == "":
        return '""'  # an empty text, shown as such
    return _fmt(value)


def help_text(f: dataclasses.Field) -> str:
    """The help, the limits and the real default: ``Learning rate. [> 0] [default: 0.0003]``."""
    text = f.metadata["help"]
    limits = range_text(f.metadata)
    if limits:
        text += f" \\[{limits}]"
    shown = shown_default(f)
    if shown is not None:
        text += f" \\[default: {shown}]"
    return text


def check_options(cfg: Any) -> None:
    """Every declared limit and choice, one message shape: ``--name must be ..., got v``."""
    for f in declared_fields(type(cfg)):
        v = getattr(cfg, f.name)
        if v is None or isinstance(v, bool):
            continue
        m, name = f.metadata, shown_flag(f)
        if m["choices"] is not None and v not in m["choices"]:
            raise UserError(f"{name} must be one of {', '.join(m['choices'])}, got {v!r}")
        if not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and math.isnan(v):
            raise UserError(f"{name} must be a number, got nan")
        if m["min"] is not None and v < m["min"]:
            if m["min"] == 1 and isinstance(v, int):
                raise UserError(f"{name} must be positive, got {v}")
            raise UserError(f"{name} must be >= {_fmt(m['min'])}, got {v}")
        if m["above"] is not None and not v > m["above"]:
            if m["above"] == 0:
                raise UserError(f"{name} must be positive, got {v}")
            raise UserError(f"{name} must be > {_fmt(m['above'])}, got {v}")
        if m["max"] is not None and v > m["max"]:
            raise UserError(f"{name} must be <= {_fmt(m['max'])}, got {v}")
        if m["below"] is not None and not v < m["below"]:
            raise UserError(f"{name} must be < {_fmt(m['below'])}, got {v}")
        if isinstance(v, float) and math.isinf(v) and m["max"] is None and m["below"] is None:
            raise UserError(f"{name} must be finite, got {v}")


def shown_fields(cls, skip: tuple[str, ...] = ()) -> list[dataclasses.Field]:
    """The fields the command line has, in ``--help``'s order: the arguments, then the options
    panel by panel (:data:`PANELS`), each panel in the order its fields are declared."""

    def rank(f: dataclasses.Field) -> int:
        if f.metadata["argument"]:
            return -1
        panel = f.metadata.get("panel")
        return PANELS.index(panel) if panel in PANELS else len(PANELS)

    fields = [f for f in declared_fields(cls) if f.metadata["cli"] and f.name not in skip]
    return sorted(fields, key=rank)


def help_paragraphs(text: str) -> list[str]:
    """A command's help as paragraphs, each on one line: the source wraps them at 100 columns,
    and Typer's rich markup would keep those line breaks, breaking sentences at any width."""
    return [" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n") if p.strip()]


def flag_decls(f: dataclasses.Field, bare: type) -> tuple[str, ...]:
    """The option's flags as Typer declares them: ``("--out", "-o")``, ``("--plot/--no-plot",)``
    for a flag that is on by default, ``("--cpu",)``."""
    if f.metadata["flags"]:
        return f.metadata["flags"]
    if bare is bool and default_of(f):
        return (f"{flag_name(f.name)}/--no-{f.name.replace('_', '-')}",)
    return (flag_name(f.name),)


def typer_parameters(cls, skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One Typer parameter per field the command line has (default None: "not given"), each
    option in its panel."""
    import typer

    hints = typing.get_type_hints(cls)
    params = []
    for f in shown_fields(cls, skip):
        bare = bare_type(hints[f.name])
        cli_type = Path if f.metadata["path"] else bare
        kw: dict[str, Any] = {"help": help_text(f), "show_default": False}
        if f.metadata["argument"]:
            info = typer.Argument(**kw)
        else:
            kw["rich_help_panel"] = f.metadata.get("panel")
            info = typer.Option(*flag_decls(f, bare), **kw)
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[cli_type | None, info],
            )
        )
    return params
