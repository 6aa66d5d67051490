"""benchmarks.quality_ablation: the table calls rows different only when their intervals do not
overlap, and checks the resolution target from the seeds' spread."""

from __future__ import annotations

import argparse

import pytest
from benchmarks import quality_ablation as qa

from dmdctl.settings.demo import DEMO_DEFAULTS


def row(kid, half_width, seed_shift=0.0):
    k = kid + seed_shift
    iv = [k - half_width, k + half_width]
    return {
        "kid": k, "kid_std": half_width / 2, "kid_interval": iv, "fid": 10 * k, "num_samples": 100,
        "precision": 0.9, "precision_interval": [0.85, 0.95], "recall": 0.5,
        "recall_interval": [0.45, 0.55], "density": 1.0, "coverage": 0.8,
        "class_accuracy": 0.99, "kid_subset_size": 100, "pr_k": 3,
        "reference": {"builtin": "ref", "features_of": "ref", "num_samples": 1500},
    }  # fmt: skip


def fake_results(gap: float) -> dict:
    """Two seeds: the 1-step teacher ``gap`` above the 35-NFE teacher; DMD and its no-regression
    ablation overlap; regression only and real score only well apart from both."""
    out = {}
    for s, shift in ((0, 0.0), (1, 0.002)):
        out[s] = {
            "teacher_35nfe": row(0.01, 0.003, shift),
            "teacher_1step": row(0.01 + gap, 0.003, shift),
            "dmd": row(0.05, 0.01, shift),
            "dmd_no_reg": row(0.055, 0.01, shift),
            "dmd_reg_only": row(0.2, 0.01, shift),
            "dmd_real_only": row(0.5, 0.01, shift),
        }
    return out


def summary(gap: float) -> str:
    floor = dict(row(0.0, 0.01), source="held-out", nfe="-")
    halves = dict(row(0.001, 0.01), sizes=[750, 750], kid_all=0.001)
    args = argparse.Namespace(bootstrap=50, settings={"digits": DEMO_DEFAULTS["digits"]})
    return qa.summarise("digits", fake_results(gap), floor, halves, args)


def test_separation_table_and_targets():
    text = summary(gap=0.3)
    kid_block = text[text.index("kid (lower is better)") :].split("\n\n")[1]
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in kid_block.splitlines()[2:]}
    # DMD against [35 NFE, 1 step, DMD, no reg, reg only, real only]
    assert lines["DMD (DM + regression)"].split(" | ")[1:] == [
        "higher", "lower", "-", "n.s.", "lower", "lower |"
    ]  # fmt: skip
    assert "rows not separated by KID: DMD (DM + regression) / no regression" in text
    # the 1-step gap (0.3) against a seed std of ~0.0014: resolution met; halves hold 0
    assert "(target >= 20x): **met**" in text and "contains 0: **met**" in text


def test_resolution_target_fails_when_the_gap_is_within_the_seed_noise():
    assert "(target >= 20x): **NOT met**" in summary(gap=0.01)


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(qa, "finish", lambda args, title, body, module: body)
    body = qa.main(["--quick", "--teachers", "toy2d", "--seeds", "0", "1", "--samples",
                    "toy2d=300", "--bootstrap", "20", "--out", str(tmp_path),
                    "--runs", *qa.RUNS])  # fmt: skip
    for name in qa.ROWS.values():
        assert f"| {name} |" in body
    assert "floor:" in body and "target >= 20x" in body


def test_a_two_stage_run_starts_from_the_earlier_run_and_gets_no_pairs(tmp_path):
    """DMD2 from the regression-only generator: its --init-from is that run's folder, it is not
    handed the pairs (no regression), and the runs' base settings carry the recipe's weight."""
    from dmdctl.settings.demo import distill_settings, run_settings
    from dmdctl.settings.distill import DistillConfig

    base = DistillConfig(pairs="p", **distill_settings(DEMO_DEFAULTS["digits"]))
    assert base.reg_weight == DEMO_DEFAULTS["digits"]["reg_weight"]
    cfg = run_settings(base, "dmd2_reg_init", qa.RUNS["dmd2_reg_init"], tmp_path)
    assert cfg.init_from == str(tmp_path / "dmd_reg_only") and cfg.out == str(
        tmp_path / "dmd2_reg_init"
    )
    assert cfg.pairs is None and cfg.reg_weight == 0 and cfg.gan_weight > 0
    first = run_settings(base, "dmd_reg_only", qa.RUNS["dmd_reg_only"], tmp_path)
    assert first.pairs == "p" and first.dm_weight == 0 and first.init_from is None
