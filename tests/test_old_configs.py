"""Runs made before the settings moved to dmdctl.settings (commit 54cf407) repeat with
``--config their/config.toml``: every key they wrote is still a setting, and it resolves to the
value written. (The files in tests/data were written by that commit's train-teacher, make-pairs
and distill; rerunning them with this code gave byte-identical teacher, pairs and generator.)"""

import dataclasses
from pathlib import Path

import pytest

from dmdctl.config import resolve, tomllib
from dmdctl.settings.distill import DistillConfig
from dmdctl.settings.make_pairs import MakePairsConfig
from dmdctl.settings.train_teacher import TrainTeacherConfig

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize(
    "name, settings",
    [
        ("train-teacher", TrainTeacherConfig),
        ("make-pairs", MakePairsConfig),
        ("distill", DistillConfig),
    ],
)
def test_an_old_config_resolves_to_what_it_says(name, settings, tmp_path, monkeypatch):
    path = DATA / f"{name}-config-54cf407.toml"
    written = tomllib.loads(path.read_text())
    monkeypatch.chdir(tmp_path)  # its relative paths: the checks need a writable out folder
    if "teacher_path" in written:
        Path(written["teacher_path"]).parent.mkdir(parents=True, exist_ok=True)
        Path(written["teacher_path"]).write_bytes(b"")
    cfg = dataclasses.asdict(resolve(settings, path))
    for key, value in written.items():
        assert cfg[key] == value, (name, key, cfg[key], value)
