"""What ``--help`` shows is what the commands do: every option has help text, and the default it
shows is the value a run uses when the flag is left out (for the preset-dependent ones, the
value each named preset gives). Showing help imports no heavy library."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from dmdctl.cli import app
from dmdctl.options import PANELS, declared_fields, default_of, help_text, shown_default
from dmdctl.settings import COMMANDS, preset_defaults, settings_module
from dmdctl.teachers import presets

PRESETS = set(presets())

CLICK = typer.main.get_command(app)


def rendered_help(name: str) -> str:
    r = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "1000", "NO_COLOR": "1"})
    assert r.exit_code == 0, r.output
    return " ".join(r.output.replace("│", " ").split())


def plain(text: str) -> str:
    return " ".join(text.replace("\\[", "[").split())


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_shown_has_help(name):
    shown = rendered_help(name)
    for param in CLICK.commands[name].params:
        text = (getattr(param, "help", None) or "").strip()
        assert text, f"dmdctl {name}: {param.name} has no help text"
        assert plain(text) in shown, (name, param.name)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_shown_default_is_the_value_used(name):
    settings = settings_module(name).SETTINGS
    shown = rendered_help(name)
    layer = settings.preset_layer({})  # nothing given: what a bare command runs with
    for f in declared_fields(settings):
        if not f.metadata["cli"]:
            continue
        assert plain(help_text(f)) in shown, (name, f.name)
        if f.metadata["show_default"]:
            continue  # depends on the preset: checked below
        used = layer.get(f.name, default_of(f))
        text = shown_default(f)
        if used is None or used is False:
            assert text is None, (name, f.name, text)
        else:
            assert f"[default: {text}]" in shown, (name, f.name)
            assert text == (str(used).lower() if isinstance(used, bool) else f"{used:g}"
                            if isinstance(used, float) else str(used) or '""'), (name, f.name)  # fmt: skip


def preset_entries(text: str) -> list[tuple[str, str]]:
    """``"toy2d 8000, digits 5000"`` -> [("toy2d", "8000"), ("digits", "5000")]."""
    return [tuple(part.strip().split(" ", 1)) for part in text.split(",")]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_preset_dependent_defaults_are_the_presets_values(name):
    settings = settings_module(name).SETTINGS
    by_preset = preset_defaults(settings)  # what each preset runs with (docs/CLI.md shows it all)
    for f in declared_fields(settings):
        text = f.metadata["show_default"]
        if not text:
            continue
        if ";" in text:  # "BUILT-IN; preset value, ..." (or free text: sample --num)
            head, text = (part.strip() for part in text.split(";", 1))
            if not all(p in PRESETS for p, *_ in preset_entries(text)):
                continue  # free text, not a per-preset list
            assert float(head) == float(default_of(f)), (name, f.name, head)
        for preset, value in preset_entries(text):
            used = by_preset[f.name][preset]
            assert float(value) == float(used) if isinstance(used, (int, float)) else value == used, (
                name, f.name, preset, value, used,
            )  # fmt: skip


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_is_in_a_panel(name):
    """--help groups a command's options (Inputs, Training, DMD2, ...): each declares its panel."""
    loose = [
        p.opts[0]
        for p in CLICK.commands[name].params
        if p.param_type_name == "option" and p.name != "config" and p.rich_help_panel not in PANELS
    ]
    assert not loose, f"dmdctl {name}: options without a panel {loose}"
    shown = rendered_help(name)
    for panel in {p.rich_help_panel for p in CLICK.commands[name].params} - {None}:
        assert f"╭─ {panel} ─" in shown, (name, panel)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_text_wraps_only_where_the_terminal_ends(name):
    """At 80 columns a line of a command's description breaks only where the next word would
    not fit (no break where the source's line ended, mid-sentence); flags carry no <bool>."""
    r = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "80", "NO_COLOR": "1"})
    text = r.output.split("╭")[0].splitlines()[3:]  # the description: after the usage line
    width = 80 - 2  # the description's padding
    for line, following in zip(text, text[1:], strict=False):
        if line.strip() and following.strip():
            fits = len(line.strip()) + 1 + len(following.split()[0]) <= width
            assert not fits, f"dmdctl {name} --help breaks early: {line.strip()!r}"
    assert "<bool>" not in r.output


def test_the_main_help_shows_no_bool_metavar():
    r = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80"})
    assert "--version" in r.output and "<bool>" not in r.output


def test_demo_help_shows_what_the_demo_runs():
    # the drift this design removes: help once said 400 steps, 1000 pairs, lr 2e-5 for digits
    shown = rendered_help("demo")
    for fragment in ("toy2d 2000, digits 200", "toy2d 128, digits 100", "digits 0.0001"):
        assert fragment in shown, fragment


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["distill", "--help"],
        ["eval-fid", "--help"],
        ["env", "--help"],
        ["distill", "--no-such-flag"],
    ],
)
def test_help_and_flag_errors_import_no_heavy_library(argv):
    code = (
        "import sys\n"
        f"sys.argv = ['dmdctl', *{argv!r}]\n"
        "from dmdctl.cli import app\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'diffusers', 'accelerate', 'safetensors')"
        " if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in r.stdout, r.stdout + r.stderr


def test_a_bad_value_gets_the_generic_message_with_the_flag():
    r = CliRunner().invoke(
        app, ["sample", "--generator", "g.safetensors", "--class", "-1", "--num", "0"]
    )
    assert r.exit_code == 2
    assert "--num must be positive, got 0" in r.stderr
    r = CliRunner().invoke(app, ["distill", "--lr-schedule", "step", "--reg-weight", "0"])
    assert r.exit_code == 2
    assert "--lr-schedule must be one of cosine, constant, got 'step'" in r.stderr


def test_choices_match_the_code_that_reads_them():
    from dmdctl.data.pairs import DTYPES
    from dmdctl.metrics.protocols import PROTOCOLS as PROTOCOL_TABLE
    from dmdctl.settings.eval_fid import PROTOCOLS
    from dmdctl.settings.make_pairs import STORAGE_DTYPES

    assert tuple(DTYPES) == STORAGE_DTYPES
    assert tuple(PROTOCOL_TABLE) == PROTOCOLS


def test_no_flag_is_lost():
    """The flags and arguments of every command, against tests/data/cli-flags.json (the
    previous release's, read from its CLI): a flag a user's script passes must not vanish in
    a refactor. A flag added on purpose is added to that file."""
    import json
    from pathlib import Path

    want = json.loads((Path(__file__).parent / "data" / "cli-flags.json").read_text())
    for name, flags in want.items():
        cmd = CLICK.commands[name]
        have = {o for p in cmd.params for o in [*p.opts, *getattr(p, "secondary_opts", [])]}
        have |= {p.name for p in cmd.params if p.param_type_name == "argument"}
        missing = sorted(set(flags) - have)
        assert not missing, f"dmdctl {name} lost {missing}"
