import json

import pytest
import tomllib
from typer.testing import CliRunner

from dmdctl.cli import app
from dmdctl.settings.demo import DEMO_DEFAULTS, DemoConfig


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """The full toy2d demo (about 2 minutes on 2 cores): every artefact and the paper's picture."""
    r = CliRunner().invoke(app, ["demo", "toy2d", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"teacher_35nfe", "teacher_1step", "dmd", "dmd_real_only", "dmd_no_reg"} <= set(metrics)
    for row in metrics.values():
        assert {
            "fid",
            "num_samples",
            "reference",
            "features",
            "modes_covered",
            "frac_within_3std",
            "kid",
            "kid_std",
            "precision",
            "recall",
        } <= set(row)
    assert (tmp_path / "report.md").is_file() and (tmp_path / "toy2d.png").stat().st_size > 0
    assert (tmp_path / "generator.safetensors").is_file()
    teacher, dmd = metrics["teacher_35nfe"], metrics["dmd"]
    assert teacher["modes_covered"] == 8
    assert dmd["modes_covered"] == 8
    assert dmd["frac_within_3std"] >= 0.7 * teacher["frac_within_3std"]
    assert metrics["teacher_1step"]["modes_covered"] < 8
    assert metrics["dmd_real_only"]["modes_covered"] < 8


@pytest.mark.slow
def test_digits_demo_end_to_end(tmp_path):
    """The digits demo with --all-runs: artefacts, and DMD and DMD2 (one and four steps) far
    better than 1 step of the teacher."""
    r = CliRunner().invoke(app, ["demo", "digits", "--all-runs", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "warning" not in r.output  # nothing the demo itself causes (DMD2 runs get no pairs)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {
        "teacher_35nfe",
        "teacher_1step",
        "dmd",
        "dmd2",
        "dmd2_4step",
        "noise_floor",
    }
    # every model row on the same sample count; the floor is the 297 held-out digits
    assert len({m["num_samples"] for k, m in metrics.items() if k != "noise_floor"}) == 1
    assert metrics["noise_floor"]["num_samples"] == 297
    # KID against the training data: the floor's interval holds 0, the 1-step teacher's does not
    assert metrics["noise_floor"]["kid_interval"][0] < 0 < metrics["noise_floor"]["kid_interval"][1]
    assert metrics["teacher_1step"]["kid_interval"][0] > 0
    assert metrics["teacher_1step"]["recall"] < metrics["teacher_35nfe"]["recall"]
    assert (tmp_path / "digits.png").stat().st_size > 0 and (
        tmp_path / "generator.safetensors"
    ).is_file()
    report = (tmp_path / "report.md").read_text()
    assert "faster" in report and "Floor:" in report and "KID ± std" in report
    # the one-step generator is far closer to the data than the teacher run for one step
    assert metrics["dmd"]["fid"] < 0.5 * metrics["teacher_1step"]["fid"]
    assert metrics["dmd"]["class_accuracy"] > 0.9
    # DMD2: the 4-step generator runs its 4 steps and is far closer to the data than 1 step of
    # the teacher, as the one-step DMD2 generator is
    assert metrics["dmd2_4step"]["nfe"] == 4 and metrics["dmd2"]["nfe"] == 1
    for row in ("dmd2", "dmd2_4step"):
        assert metrics[row]["fid"] < 0.5 * metrics["teacher_1step"]["fid"]
        assert metrics[row]["recall"] > 10 * metrics["teacher_1step"]["recall"]


@pytest.mark.slow
def test_digits_demo_default_runs_are_the_headline_rows(tmp_path):
    """Without --all-runs the digits demo distils DMD and DMD2 one-step only (tiny sizes here)."""
    r = CliRunner().invoke(app, ["demo", "digits", "--distill-steps", "2", "--num-pairs", "8",
                                 "--eval-samples", "100", "--out", str(tmp_path)])  # fmt: skip
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"teacher_35nfe", "teacher_1step", "dmd", "dmd2", "noise_floor"}
    assert not (tmp_path / "dmd2_4step").exists()
    # the DMD run trains with the digits recipe's regression weight on the demo's pairs; the
    # DMD2 run with neither (the runs' recorded settings)
    dmd = tomllib.loads((tmp_path / "dmd" / "config.toml").read_text())
    dmd2 = tomllib.loads((tmp_path / "dmd2" / "config.toml").read_text())
    assert dmd["reg_weight"] == 4.0 and dmd["pairs"] == str((tmp_path / "pairs").resolve())
    assert dmd2["reg_weight"] == 0.0 and "pairs" not in dmd2 and dmd2["gan_weight"] > 0


def test_digits_demo_hands_each_run_the_recipe(tmp_path, monkeypatch):
    """The digits demo's runs as it hands them to distill (nothing trained): DMD with the
    recipe's pairs and regression weight, DMD2 with neither, both with the demo's batch, lr and
    fake-score updates."""
    from dmdctl.commands import demo

    class Stop(Exception):
        pass

    runs = []

    def recorded(cfg):
        runs.append(cfg)
        if len(runs) == 2:
            raise Stop

    monkeypatch.setattr(demo, "make_pairs", lambda cfg: None)
    monkeypatch.setattr(demo, "distill", recorded)
    monkeypatch.setattr(demo.torch, "set_num_threads", lambda n: None)  # keep the suite's
    with pytest.raises(Stop):
        demo.run_demo(DemoConfig(teacher="digits", out=str(tmp_path)))
    d = DEMO_DEFAULTS["digits"]
    dmd, dmd2 = runs
    assert dmd.out == str(tmp_path / "dmd") and dmd2.out == str(tmp_path / "dmd2")
    assert dmd.pairs == str(tmp_path / "pairs") and dmd.reg_weight == d["reg_weight"]
    assert dmd2.pairs is None and dmd2.reg_weight == 0 and dmd2.gan_weight > 0
    for run in runs:
        assert (run.batch_size, run.pair_batch_size, run.lr, run.fake_lr, run.fake_updates) == (
            d["batch_size"], d["batch_size"], d["lr"], d["lr"], d["fake_updates"]
        )  # fmt: skip
