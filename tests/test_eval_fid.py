"""eval-fid's KID / precision / recall / intervals as a user meets them: built-in teachers scored
against their own training data, any feature set through statistics files, and the floor."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_helpers import ok, one_line_error, run
from dmdctl.metrics.fid import FeatureStats, save_stats_npz
from dmdctl.metrics.quality import score_floor, training_reference
from dmdctl.teachers import get_kind, load_teacher


def test_digits_teacher_one_step_is_told_apart_from_the_data(tmp_path):
    """The 1-step teacher (blurred means of the classes) is precise but has almost no recall, and
    its KID interval is far from 0; every documented key is in the JSON."""
    out = tmp_path / "r.json"
    ok(run("eval-fid", "--teacher", "digits", "--steps", 1, "--num-samples", 300,
           "--precision-recall", "--bootstrap", 30, "--kid-subsets", 20, "--json", out))  # fmt: skip
    r = json.loads(out.read_text())
    for key in ("kid", "kid_std", "kid_all", "kid_interval", "precision", "recall", "density",
                "coverage", "precision_interval", "recall_interval", "pr_k", "class_accuracy"):  # fmt: skip
        assert key in r, key
    assert r["reference"]["num_samples"] == 1500 and "training" in r["reference"]["builtin"]
    assert r["kid_standardized"] is True and r["pr_features_used"] == [300, 1500]
    assert r["kid_interval"][0] > 0.02  # far from "same distribution"
    assert r["recall"] < 0.1 < 0.9 < r["precision"]
    lo, hi = r["recall_interval"]
    assert lo <= r["recall"] <= hi


def test_the_held_out_floor_is_the_same_distribution():
    teacher = load_teacher(get_kind("digits").default_path())
    f = score_floor(teacher.kind, teacher.config, bootstrap=50)
    lo, hi = f["kid_interval"]
    assert lo < 0 < hi  # unbiased KID: held-out digits are not told from the training data
    assert f["num_samples"] == 297 and f["precision"] > 0.8 and f["recall"] > 0.8
    assert f["kid_std"] < 0.05  # standardised features: KID of order 1e-2, not 1e6


def test_toy2d_reference_is_a_fixed_draw_of_the_mixture():
    kind = get_kind("toy2d")
    cfg = kind.presets()["toy2d"]
    a, b = training_reference(kind, cfg), training_reference(kind, dict(cfg))
    assert a.features.shape == (10_000, 2) and np.array_equal(a.features, b.features)
    assert "exact moments" in a.description


def test_precision_recall_on_any_features_via_statistics_files(tmp_path):
    """--stats A --ref B: Inception-labelled (here 16-d stand-in) features; a set collapsed onto
    a few points has high precision and low recall; KID is not standardised for Inception."""
    rng = np.random.default_rng(0)
    real = rng.standard_normal((400, 16)).astype(np.float32)
    collapsed = (real[:5].repeat(80, 0) + 0.01 * rng.standard_normal((400, 16))).astype(np.float32)
    paths = []
    for name, f in (("gen", collapsed), ("ref", real)):
        s = FeatureStats(16)
        s.update(f)
        paths.append(save_stats_npz(tmp_path / f"{name}.npz", s.mu, s.sigma,
                                    num_samples=np.array(400), protocol=np.array("edm"),
                                    features=np.array("inception-2015-12-05 pool3 (2048-d)"),
                                    kid_features=f))  # fmt: skip
    out = tmp_path / "r.json"
    r = ok(run("eval-fid", "--stats", paths[0], "--ref", paths[1], "--precision-recall",
               "--kid-subsets", 5, "--json", out))  # fmt: skip
    assert "precision" in r.output and "recall" in r.output
    res = json.loads(out.read_text())
    assert res["precision"] > 0.9 and res["recall"] < 0.1 and res["coverage"] < 0.1
    assert res["kid_standardized"] is False and "kid_interval" not in res


def test_precision_recall_needs_reference_features(tmp_path):
    s = FeatureStats(4)
    s.update(np.random.default_rng(0).standard_normal((50, 4)))
    p = save_stats_npz(tmp_path / "a.npz", s.mu, s.sigma, num_samples=np.array(50))
    one_line_error(run("eval-fid", "--stats", p, "--ref", p, "--precision-recall"),
                   "--precision-recall needs the features of the reference", "--make-ref")  # fmt: skip


@pytest.mark.parametrize(
    "flag,message",
    [(("--pr-k", 0), "--pr-k must be positive, got 0"), (("--bootstrap", 3), "at least 10 rounds")],
)
def test_bad_values(flag, message):
    one_line_error(run("eval-fid", "--teacher", "digits", "--steps", 1, *flag), message)


def test_fid_and_clip_score_of_a_text_to_image_generator_in_one_command(
    sd_pipe, prompts_file, tiny_clip, random_weights, hf_offline, tmp_path, monkeypatch
):
    """``eval-fid --generator G --prompts P --ref R --clip-model C`` gives what the three-command
    route gives: ``sample --prompts``, ``eval-fid --images`` and ``clip-score``. Scored against
    a reference made from images of other seeds, both routes give the same FID."""
    import torch.nn.functional as F

    from cli_helpers import ok, run
    from dmdctl.generators import save_generator
    from dmdctl.metrics import collect
    from dmdctl.metrics.inception import InceptionFeatures
    from dmdctl.teachers import resolve_teacher

    # 6 images cannot give an Inception FID (2,049 are needed), and a random Inception maps
    # every image to about the same point: the wiring is what is tested, so the features here
    # are the network's input pooled to 2,048 numbers (tests/test_inception.py tests Inception)
    monkeypatch.setattr(collect, "check_sample_count", lambda *a: None)
    monkeypatch.setattr(collect, "COMPARABLE_SAMPLES", 0)
    monkeypatch.setattr(
        InceptionFeatures,
        "_run",
        lambda self, kind, batch: F.adaptive_avg_pool2d(batch.float(), (27, 26)).flatten(1)[
            :, :2048
        ],
    )
    teacher = resolve_teacher("sd15", sd_pipe)
    gen = tmp_path / "g.safetensors"  # the teacher's UNet as a one-step generator (distill's start)
    save_generator(teacher.denoiser, "sd", teacher.config, teacher.sha256, gen)
    weights, sha = random_weights
    inception = ["--inception-weights", weights, "--inception-sha256", sha, "--protocol", "clean"]
    common = ["--num-samples", 6, "--seed", 3, "--batch-size", 4, "--device", "cpu"]

    def sample(out, seed):
        ok(run("sample", "--generator", gen, "--prompts", prompts_file, "--out", out,
               "--num", 6, "--seed", seed, "--device", "cpu"))  # fmt: skip
        return out / "images"

    # the reference: images of other seeds; the three-command route on seeds 3..8
    ok(run("eval-fid", "--make-ref", sample(tmp_path / "r", 100), "-o", tmp_path / "ref.npz",
           *inception))  # fmt: skip
    images = sample(tmp_path / "s", 3)
    ok(run("eval-fid", "--images", images, "--ref", tmp_path / "ref.npz", "--json",
           tmp_path / "f.json", *inception))  # fmt: skip
    ok(run("clip-score", "--images", images, "--prompts", images.parent / "images.jsonl",
           "--clip-model", tiny_clip, "--json", tmp_path / "c.json"))  # fmt: skip
    # the one command
    ok(run("eval-fid", "--generator", gen, "--prompts", prompts_file, "--ref", tmp_path / "ref.npz",
           "--clip-model", tiny_clip, "--json", tmp_path / "one.json", *common, *inception))  # fmt: skip
    one = json.loads((tmp_path / "one.json").read_text())
    fid = json.loads((tmp_path / "f.json").read_text())["fid"]
    clip = json.loads((tmp_path / "c.json").read_text())["clip_score"]
    assert fid > 0 and one["fid"] == pytest.approx(fid, rel=1e-9) and one["num_samples"] == 6
    assert one["clip_score"] == pytest.approx(clip, abs=1e-6)
    assert one["prompts"] == str(prompts_file)
    # a prompts file for an image generator, or --clip-model without prompts, is one line
    r = run("eval-fid", "--clip-model", tiny_clip, "--images", tmp_path / "s" / "images",
            "--ref", tmp_path / "ref.npz")  # fmt: skip
    assert r.exit_code == 2 and "--clip-model scores a generator's images" in r.stderr
