"""eval-fid under torchrun: 2 CPU processes (gloo) give the 1-process statistics."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cli_helpers import PROCESS_ENV, free_port
from dmdctl.metrics.evaluate import evaluate
from dmdctl.settings.eval_fid import EvalFidConfig


def test_two_processes_equal_one(toy_teacher, tmp_path):
    common = dict(teacher_path=toy_teacher, steps=2, num_samples=700, batch_size=100)
    one = evaluate(
        EvalFidConfig(**common, out=str(tmp_path / "one.npz"), json=str(tmp_path / "one.json")),
        show_progress=False,
    )
    env = PROCESS_ENV
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "dmdctl", "eval-fid", "--teacher-path", toy_teacher, "--steps", "2",
        "--num-samples", "700", "--batch-size", "100", "--device", "cpu",
        "-o", str(tmp_path / "two.npz"), "--json", str(tmp_path / "two.json"),
    ]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["num_processes"] == 2 and two["num_samples"] == 700
    assert "accelerate" in two["versions"]
    # one table printed (rank 0 only)
    assert r.stdout.count("eval-fid") == 1, r.stdout

    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert int(a["num_samples"]) == int(b["num_samples"]) == 700
    np.testing.assert_allclose(b["mu"], a["mu"], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(b["sigma"], a["sigma"], rtol=1e-10, atol=1e-10)
    # the KID reservoir holds all 700 features in seed order in both runs
    np.testing.assert_array_equal(b["kid_features"], a["kid_features"])
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-10, abs=1e-12)
    # quality metrics see all samples, gathered from both processes in seed order
    for k in ("modes_covered", "frac_within_3std"):
        assert two[k] == one[k]
