"""``train-teacher`` (dmdctl.commands.train_teacher): a teacher file with its settings; the teacher
kind's own defaults fill what was not given, from the command line or from Python."""

import pytest

from dmdctl.commands.train_teacher import train_teacher
from dmdctl.config import resolve, tomllib
from dmdctl.errors import UserError
from dmdctl.settings.train_teacher import TrainTeacherConfig
from dmdctl.teachers import load_teacher


@pytest.mark.parametrize(
    "teacher, want", [("toy2d", (8000, 512, 2e-3)), ("digits", (5000, 128, 5e-4))]
)
def test_the_kind_fills_what_was_not_given(teacher, want):
    cfg = resolve(TrainTeacherConfig, teacher=teacher)
    assert (cfg.steps, cfg.batch_size, cfg.lr) == want
    # a flag given wins, even when it equals another kind's default
    assert resolve(TrainTeacherConfig, teacher=teacher, steps=5000).steps == 5000


def test_a_config_made_in_python_is_filled_and_written(tmp_path):
    result = train_teacher(TrainTeacherConfig(out=str(tmp_path), steps=20, seed=3))
    written = tomllib.loads((tmp_path / "config.toml").read_text())
    assert written["steps"] == 20 and written["batch_size"] == 512 and written["lr"] == 2e-3
    teacher = load_teacher(tmp_path / "teacher.safetensors")
    assert teacher.name == "toy2d" and result["steps"] == 20


def test_only_built_in_teachers_are_trained(tmp_path):
    with pytest.raises(UserError, match="trains built-in teachers only"):
        train_teacher(TrainTeacherConfig(teacher="sd15", out=str(tmp_path), steps=1))
