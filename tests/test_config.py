"""Config resolution: dataclass defaults < preset layer < TOML file < command-line flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from dmdctl.config import Settings, resolve, write_config
from dmdctl.errors import UserError

VALIDATE_CALLS: list[ToyConfig] = []


@dataclass
class ToyConfig(Settings):
    steps: int = 100
    lr: float = 1e-3
    name: str = "toy"
    ema: bool = False
    teacher_path: str | None = None
    dropout: float = 0.0

    def check(self) -> None:
        VALIDATE_CALLS.append(self)
        if self.steps < 1:
            raise UserError(f"steps must be >= 1, got {self.steps}")


def write(tmp_path, text: str, name: str = "cfg.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_file_or_overrides():
    assert resolve(ToyConfig) == ToyConfig()


def test_file_overrides_defaults(tmp_path):
    path = write(tmp_path, 'steps = 7\nlr = 0.5\nname = "from-file"\nema = true\n')
    cfg = resolve(ToyConfig, path)
    assert cfg == ToyConfig(steps=7, lr=0.5, name="from-file", ema=True)


def test_overrides_beat_file_and_none_is_ignored(tmp_path):
    path = write(tmp_path, 'steps = 7\nlr = 0.5\nname = "from-file"\nteacher_path = "t.pt"\n')
    cfg = resolve(ToyConfig, path, steps=9, lr=None, name=None, ema=True, teacher_path=None)
    assert cfg.steps == 9  # flag beats file
    assert cfg.lr == 0.5  # None flag: file value kept
    assert cfg.name == "from-file"
    assert cfg.ema is True  # flag beats default
    assert cfg.teacher_path == "t.pt"
    assert cfg.dropout == 0.0  # default kept


def test_overrides_without_file():
    cfg = resolve(ToyConfig, None, steps=3, ema=None, teacher_path="x")
    assert cfg == ToyConfig(steps=3, teacher_path="x")


def test_false_and_zero_overrides_are_not_ignored(tmp_path):
    # only None means "not given": False, 0 and "" are real values
    path = write(tmp_path, "ema = true\ndropout = 0.5\n")
    cfg = resolve(ToyConfig, path, ema=False, dropout=0.0, name="")
    assert cfg.ema is False
    assert cfg.dropout == 0.0
    assert cfg.name == ""


def test_unknown_keys_are_listed(tmp_path):
    path = write(tmp_path, "steps = 3\nlearning_rate = 0.1\nzzz = 1\n")
    with pytest.raises(UserError) as e:
        resolve(ToyConfig, path)
    msg = str(e.value)
    assert "learning_rate" in msg and "zzz" in msg
    assert str(path) in msg


@pytest.mark.parametrize(
    "line,key",
    [
        ('steps = "ten"', "steps"),
        ("steps = true", "steps"),
        ("steps = 2.5", "steps"),
        ('lr = "fast"', "lr"),
        ("lr = false", "lr"),
        ("name = 3", "name"),
        ('ema = "yes"', "ema"),
        ("ema = 1", "ema"),
        ("teacher_path = 5", "teacher_path"),
    ],
)
def test_wrong_types_name_the_key(tmp_path, line, key):
    path = write(tmp_path, line + "\n")
    with pytest.raises(UserError) as e:
        resolve(ToyConfig, path)
    assert f"'{key}'" in str(e.value)


def test_wrong_type_in_override_is_a_user_error():
    with pytest.raises(UserError, match="steps"):
        resolve(ToyConfig, None, steps="many")


def test_int_accepted_for_float(tmp_path):
    path = write(tmp_path, "lr = 2\ndropout = 0\n")
    cfg = resolve(ToyConfig, path)
    assert cfg.lr == 2.0 and isinstance(cfg.lr, float)
    assert cfg.dropout == 0.0 and isinstance(cfg.dropout, float)


def test_integral_float_accepted_for_int(tmp_path):
    path = write(tmp_path, "steps = 30.0\n")
    cfg = resolve(ToyConfig, path)
    assert cfg.steps == 30 and isinstance(cfg.steps, int)


def test_invalid_toml(tmp_path):
    path = write(tmp_path, "steps = = 3\n")
    with pytest.raises(UserError) as e:
        resolve(ToyConfig, path)
    assert str(path) in str(e.value)


def test_missing_config_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(UserError) as e:
        resolve(ToyConfig, path)
    assert str(path) in str(e.value)


def test_validate_is_called(tmp_path):
    VALIDATE_CALLS.clear()
    cfg = resolve(ToyConfig, None, steps=5)
    assert VALIDATE_CALLS == [cfg]
    with pytest.raises(UserError, match="steps must be >= 1"):
        resolve(ToyConfig, write(tmp_path, "steps = 0\n"))
    with pytest.raises(UserError, match="steps must be >= 1"):
        resolve(ToyConfig, None, steps=-2)


# ---------------------------------------------------------------- write_config


@pytest.mark.parametrize(
    "cfg",
    [
        ToyConfig(),
        ToyConfig(steps=12345, lr=3e-4, name="run 1", ema=True, teacher_path="a/b.safetensors"),
        ToyConfig(lr=1e-5, dropout=0.1 + 0.2, name='quote " and \\ backslash'),
        ToyConfig(lr=1e20, name="ünïcødé\ttab\nnewline"),
    ],
)
def test_write_config_round_trips(tmp_path, cfg):
    path = write_config(cfg, tmp_path / "out")
    assert path == tmp_path / "out" / "config.toml"
    assert path.is_file()
    back = resolve(ToyConfig, path)
    assert back == cfg
    # floats survive bit for bit
    assert back.lr.hex() == cfg.lr.hex()
    assert back.dropout.hex() == cfg.dropout.hex()


def test_write_config_omits_none(tmp_path):
    cfg = ToyConfig(teacher_path=None)
    path = write_config(cfg, tmp_path, name="run.config.toml")
    assert path.name == "run.config.toml"
    text = path.read_text()
    assert "teacher_path" not in text
    for f in dataclasses.fields(ToyConfig):
        if f.name != "teacher_path":
            assert f"{f.name} = " in text
    assert resolve(ToyConfig, path).teacher_path is None


def test_written_config_then_overrides(tmp_path):
    # "--config that_file.toml" repeats a run; flags still win over it
    path = write_config(ToyConfig(steps=50, lr=3e-4), tmp_path)
    cfg = resolve(ToyConfig, path, steps=60)
    assert cfg == ToyConfig(steps=60, lr=3e-4)


# ---------------------------------------------------------------- preset layer


@dataclass
class PresetConfig(Settings):
    preset: str = "plain"
    steps: int = 100
    lr: float = 1e-3

    @staticmethod
    def preset_layer(values):
        return {"fast": {"steps": 10, "lr": 0.1}}.get(values.get("preset", "plain"), {})


def test_preset_sits_between_defaults_and_file_and_flags(tmp_path):
    assert resolve(PresetConfig) == PresetConfig()
    assert resolve(PresetConfig, preset="fast") == PresetConfig("fast", 10, 0.1)
    # the file beats the preset, a flag beats both; a flag equal to the default still counts
    path = write(tmp_path, 'preset = "fast"\nlr = 0.5\n')
    assert resolve(PresetConfig, path) == PresetConfig("fast", 10, 0.5)
    assert resolve(PresetConfig, path, steps=100) == PresetConfig("fast", 100, 0.5)


def test_a_misspelt_setting_from_python_is_an_error():
    with pytest.raises(TypeError, match="stepz"):
        resolve(PresetConfig, stepz=3)
