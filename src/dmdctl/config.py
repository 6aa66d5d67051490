"""Settings of a command: dataclass defaults < preset < TOML file < command-line flags.

Each command has one settings dataclass (``dmdctl.settings``), a subclass of :class:`Settings`
whose fields are declared with :func:`dmdctl.options.option`. :func:`resolve` is the one way a
settings object is built from what a user gave, on the command line or from Python. The resolved
settings are written next to the command's outputs as TOML, so ``--config that_file.toml``
repeats the run.
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

from dmdctl.errors import UserError

T = TypeVar("T")


class Settings:
    """Base of every command's settings dataclass.

    ``preset_layer(values)`` returns the defaults that depend on what was chosen (the teacher
    preset's recipe, a demo's sizes): they sit above the dataclass defaults and below a
    ``--config`` file and the flags. ``check()`` holds the checks that involve several fields or
    the file system; the limits and choices declared on the fields are checked for every
    command in the same way (:func:`dmdctl.options.check_options`).
    """

    @staticmethod
    def preset_layer(values: dict[str, Any]) -> dict[str, Any]:
        return {}

    def check(self) -> None:
        pass

    def validate(self) -> None:
        from dmdctl.options import check_options

        check_options(self)
        self.check()


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


def resolve(cls: type[T], config_file: Path | None = None, **given: Any) -> T:
    """Build ``cls`` from its defaults, its preset layer, the TOML file, then the values given.

    A value of None in ``given`` means "not given" (the command line's flags left out); the
    preset layer (:meth:`Settings.preset_layer`) sees the file's and the given values.
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
    unknown = sorted(set(given) - names)
    if unknown:  # a programming error (a caller's typo), not a user's
        raise TypeError(f"{cls.__name__} has no settings {unknown}")
    values.update({k: v for k, v in given.items() if v is not None})
    values = {**cls.preset_layer(values), **values}
    hints = get_type_hints(cls)
    values = {k: _coerce(k, v, hints[k]) for k, v in values.items()}
    cfg = cls(**values)
    cfg.validate()
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
    from dmdctl.files import atomic_write_bytes

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    atomic_write_bytes(path, dumps_toml(dataclasses.asdict(cfg)).encode())
    return path
