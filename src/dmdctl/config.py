"""Config objects: dataclass defaults < TOML file < command-line flags.

Each command has one dataclass. The resolved config is written next to the command's outputs
as TOML, so ``--config that_file.toml`` repeats the run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import UserError

T = TypeVar("T")


def default_help(cls: type, name: str, text: str) -> str:
    """Help text for a CLI option with the dataclass default appended (one source of truth)."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    value = field.default
    if value is dataclasses.MISSING or value is None:
        return text
    if isinstance(value, bool):
        value = str(value).lower()
    return f"{text} \\[default: {value}]"


def load_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None


def _coerce(name: str, value: Any, hint: Any) -> Any:
    hint_s = str(hint)
    if value is None:
        return None
    if hint is bool or hint_s.startswith("bool"):
        if not isinstance(value, bool):
            raise UserError(f"config key '{name}' must be true or false, got {value!r}")
        return value
    if hint is int or hint_s.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserError(f"config key '{name}' must be an integer, got {value!r}")
        return value
    if hint is float or hint_s.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key '{name}' must be a number, got {value!r}")
        return float(value)
    if hint is str or hint_s.startswith("str"):
        if not isinstance(value, (str, Path)):
            raise UserError(f"config key '{name}' must be a string, got {value!r}")
        return str(value)
    return value


def resolve(
    cls: type[T], config_file: Path | None = None, preset_defaults=None, **overrides: Any
) -> T:
    """Build ``cls`` from its defaults, then the TOML file, then non-None overrides.

    ``preset_defaults(values)`` may return defaults that depend on the chosen teacher (e.g. the
    sd15 preset's learning rate); they sit between the dataclass defaults and the TOML file.
    """
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    if config_file is not None:
        data = load_toml(Path(config_file))
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(
                f"unknown key(s) in {config_file}: {', '.join(unknown)} "
                f"(valid: {', '.join(sorted(names))})"
            )
        values.update(data)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if preset_defaults is not None:
        values = {**preset_defaults(values), **values}
    hints = get_type_hints(cls)
    values = {k: _coerce(k, v, hints[k]) for k, v in values.items()}
    cfg = cls(**values)
    check = getattr(cfg, "validate", None)
    if check is not None:
        check()
    return cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return {True: "inf", False: "-inf"}[v > 0] if math.isinf(v) else "nan"
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def dumps_toml(data: dict[str, Any]) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if v is not None]
    return "\n".join(lines) + "\n"


def write_config(cfg: Any, directory: Path, name: str = "config.toml") -> Path:
    from .files import atomic_write_bytes

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    atomic_write_bytes(path, dumps_toml(dataclasses.asdict(cfg)).encode())
    return path
