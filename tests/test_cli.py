"""The command line as a user meets it: help, versions, and one-line errors with exit code 2."""

import json

import pytest

from cli_helpers import ok, one_line_error, run

COMMANDS = ["train-teacher", "make-pairs", "distill", "eval-fid", "sample", "export", "demo"]


def test_version_lists_the_libraries():
    r = run("--version")
    assert r.exit_code == 0
    for name in ("dmdctl", "torch", "diffusers", "accelerate"):
        assert name in r.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example_and_a_config_option(command):
    r = run(command, "--help")
    assert r.exit_code == 0
    assert "Example" in r.output and "dmdctl " + command in r.output.replace("\n", " ")
    assert "--config" in r.output


def test_help_shows_the_defaults():
    out = " ".join(run("distill", "--help").output.replace("│", " ").split())  # as read, unwrapped
    assert "[default: 2000]" in out and "[default: runs/distill]" in out


def test_bad_inputs_exit_2_with_one_line(toy_teacher, toy_pairs, tmp_path):
    missing = tmp_path / "nope.safetensors"
    one_line_error(
        run("make-pairs", "--teacher-path", missing, "--out", tmp_path / "p"),
        "file not found",
        str(missing),
    )
    one_line_error(
        run(
            "make-pairs", "--teacher-path", toy_teacher, "--num-pairs", -3, "--out", tmp_path / "p"
        ),
        "--num-pairs must be positive",
    )
    one_line_error(
        run(
            "make-pairs",
            "--teacher",
            "sd99",
            "--teacher-path",
            toy_teacher,
            "--out",
            tmp_path / "p",
        ),
        "unknown teacher 'sd99'",
    )
    one_line_error(
        run("distill", "--teacher-path", toy_teacher, "--out", tmp_path / "d"), "no --pairs folder"
    )
    one_line_error(
        run(
            "distill",
            "--teacher-path",
            toy_teacher,
            "--pairs",
            tmp_path / "none",
            "--out",
            tmp_path / "d",
        ),
        "pairs folder not found",
    )
    one_line_error(
        run(
            "distill",
            "--teacher-path",
            toy_teacher,
            "--pairs",
            toy_pairs,
            "--reg-loss",
            "l7",
            "--out",
            tmp_path / "d",
        ),
        "--reg-loss must be one of",
    )
    one_line_error(
        run(
            "distill",
            "--teacher-path",
            toy_teacher,
            "--pairs",
            toy_pairs,
            "--reg-weight",
            0,
            "--dm-weight",
            0,
            "--out",
            tmp_path / "d",
        ),
        "nothing to train",
    )
    one_line_error(
        run(
            "distill",
            "--teacher-path",
            toy_teacher,
            "--pairs",
            toy_pairs,
            "--resume",
            "latest",
            "--out",
            tmp_path / "d",
        ),
        "no complete checkpoint",
    )
    not_a_teacher = tmp_path / "x.safetensors"
    not_a_teacher.write_bytes(b"garbage")
    one_line_error(
        run("eval-fid", "--teacher-path", not_a_teacher), "not a readable safetensors file"
    )
    one_line_error(run("eval-fid"), "nothing to score")
    one_line_error(run("eval-fid", "--generator", toy_teacher), "is not a dmdctl generator file")
    one_line_error(
        run("eval-fid", "--teacher-path", toy_teacher, "--steps", 2, "--ref", tmp_path / "ref.npz"),
        "reference statistics not found",
    )
    one_line_error(
        run("export", tmp_path / "nothing-here", "-o", tmp_path / "g.safetensors"),
        "nothing to export",
    )
    one_line_error(run("train-teacher", "sd99"), "unknown teacher 'sd99'")
    one_line_error(run("train-teacher", "sd15"), "built-in teachers only", "--teacher-path")
    one_line_error(run("demo", "imagenet"), "TEACHER must be one of toy2d, digits")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("steps = [\n")
    one_line_error(run("train-teacher", "--config", bad_toml), "not valid TOML")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("stepz = 3\n")
    one_line_error(run("train-teacher", "--config", unknown), "unknown key(s)", "stepz")


def test_flags_override_the_config_file_and_the_resolved_config_is_written(toy_teacher, tmp_path):
    conf = tmp_path / "pairs.toml"
    conf.write_text(f'teacher_path = "{toy_teacher}"\nnum_pairs = 50\nsteps = 3\nshard_size = 10\n')
    r = run("make-pairs", "--config", conf, "--num-pairs", 20, "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["num_pairs"] == 20 and manifest["sampler"]["steps"] == 3
    written = (tmp_path / "p" / "config.toml").read_text()
    assert "num_pairs = 20" in written and "steps = 3" in written and "shard_size = 10" in written
    # the written config repeats the run
    r = run("make-pairs", "--config", tmp_path / "p" / "config.toml")
    assert r.exit_code == 0, r.output
    assert "made_now" in r.output


def test_distill_settings_come_from_defaults_preset_file_flags_in_that_order(tmp_path, monkeypatch):
    """What distill runs with: the preset's recipe over the defaults, a --config file over the
    preset, flags over the file; a flag equal to the default still counts as given."""
    import dmdctl.commands.distill as command

    seen = []
    monkeypatch.setattr(command, "run", lambda cfg: seen.append(cfg))
    base = ["distill", "--teacher", "sd15", "--out", tmp_path / "o"]
    ok(run(*base))
    cfg = seen[-1]
    # sd15 = DMD2's recipe (docs/RECIPES.md) where the defaults would say otherwise
    assert (cfg.lr, cfg.fake_updates, cfg.real_guidance, cfg.reg_weight) == (1e-5, 10, 1.75, 0.0)
    assert cfg.steps == 3900  # DMD2's checkpoint: 39,000 iterations / 10 fake updates
    assert cfg.checkpoint_every == 500  # not in the recipe: the default
    conf = tmp_path / "c.toml"
    conf.write_text("fake_updates = 3\nlr = 2e-5\n")
    ok(run(*base, "--config", conf))
    assert (seen[-1].fake_updates, seen[-1].lr, seen[-1].fake_lr) == (3, 2e-5, 1e-5)
    ok(run(*base, "--config", conf, "--lr", 3e-4))  # 3e-4 is the built-in default
    assert (seen[-1].fake_updates, seen[-1].lr) == (3, 3e-4)
