"""--report-to tensorboard: the event file holds what log.jsonl holds (offline, local files)."""

from __future__ import annotations

import json

import pytest

from cli_helpers import ok, one_line_error, run

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

ARGS = ["--reg-weight", "0", "--steps", "10", "--batch-size", "32", "--log-every", "5",
        "--checkpoint-every", "5", "--plot-samples", "50", "--eval-every", "10",
        "--eval-samples", "100", "--cpu"]  # fmt: skip


def events(folder) -> EventAccumulator:
    """The run's event file (Accelerate writes the hyper-parameters into a second one)."""
    found = []
    for f in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        found.append(acc)
    assert found, f"no event file under {folder}"
    return max(found, key=lambda a: len(a.Tags()["scalars"]))


def test_tensorboard_holds_the_logged_losses(toy_teacher, tmp_path):
    out = tmp_path / "run"
    ok(run("distill", "--teacher-path", toy_teacher, "--out", out, *ARGS,
           "--report-to", "tensorboard"))  # fmt: skip
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    ev = events(out / "trackers")
    logged = {}
    for row in rows:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                logged.setdefault(k, []).append((row["step"], v))
    assert {"loss_dm", "loss_fake", "eval_fid"} <= set(logged)
    for name, want in logged.items():
        got = [(e.step, e.value) for e in ev.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in want], name
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6, abs=1e-12)
    # the sample plot of each checkpoint, as an image
    assert [e.step for e in ev.Images("samples")] == [5, 10]
    # the resolved config as hyper-parameters
    hparams = next((out / "trackers").rglob("hparams.yml")).read_text()
    assert "fake_updates" in hparams and "report_to: tensorboard" in hparams


def test_report_to_none_writes_no_tracker_files(toy_teacher, tmp_path):
    out = tmp_path / "run"
    ok(run("distill", "--teacher-path", toy_teacher, "--out", out, *ARGS[:10], "--cpu"))
    assert (out / "log.jsonl").is_file() and not (out / "trackers").exists()


def test_unknown_tracker_is_refused(toy_teacher, tmp_path):
    r = run("distill", "--teacher-path", toy_teacher, "--out", tmp_path / "run", "--report-to",
            "mlflow")  # fmt: skip
    one_line_error(r, "--report-to", "mlflow", "tensorboard")
    assert not (tmp_path / "run").exists()


def test_train_teacher_reports_its_losses(tmp_path):
    out = tmp_path / "teacher"
    ok(run("train-teacher", "--out", out, "--steps", "201", "--batch-size", "64",
           "--report-to", "tensorboard"))  # fmt: skip
    ev = events(out / "trackers")
    assert [e.step for e in ev.Scalars("loss")] == [1, 101, 201]
    assert all(e.value > 0 for e in ev.Scalars("loss"))
