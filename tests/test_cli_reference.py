"""docs/CLI.md is what scripts/cli_reference.py writes from the settings classes now: every
command, every flag the command line has, the defaults each preset runs with."""

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from scripts.cli_reference import DOC, render

from dmdctl.cli import app
from dmdctl.settings import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference() -> str:
    return render()


def test_the_reference_is_current(reference):
    assert DOC.read_text() == reference, "docs/CLI.md is stale: run scripts/cli_reference.py"


def section(reference: str, name: str) -> str:
    return reference.split(f"\n## dmdctl {name}\n", 1)[1].split("\n## dmdctl ", 1)[0]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_reference_has_every_flag_of_the_command_line(reference, name):
    text = section(reference, name)
    for param in typer.main.get_command(app).commands[name].params:
        if param.name == "config":
            continue  # every command's, said once at the top
        names = [param.name.upper()] if param.param_type_name == "argument" else param.opts
        for flag in [*names, *getattr(param, "secondary_opts", [])]:
            assert f"`{flag}`" in text, (name, flag)


def test_the_reference_shows_each_presets_default(reference):
    distill = section(reference, "distill")
    assert "| `--steps` | integer | 2000; sd15: 3900; sd15-gan: 200;" in distill
    assert "sdxl-lora: 64" in distill  # --lora-rank, set only by the sdxl-lora preset
    assert "| `--steps` | integer | toy2d, toy2d-unbalanced, toy2d-flow: 8000; digits: 5000 |" in (
        section(reference, "train-teacher")
    )


def test_importing_the_script_imports_no_torch():
    code = "import sys; import scripts.cli_reference; print('torch' in sys.modules)"
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert r.stdout.strip() == "False", r.stdout + r.stderr
