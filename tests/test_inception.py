"""Inception features: verified, offline weight loading; the eval-fid paths that use them; and
dmdctl's Fréchet distance against pytorch-fid's and torchmetrics' formulas."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dmdctl.cli import app
from dmdctl.errors import UserError
from dmdctl.files import sha256_file
from dmdctl.metrics.fid import FeatureStats, frechet_distance, save_stats_npz
from dmdctl.metrics.inception import (
    WEIGHTS_FILENAME,
    WEIGHTS_SHA256,
    InceptionFeatures,
    build_network,
    default_weights_path,
    load_network,
)

tfi = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(r, *fragments):
    assert r.exit_code == 2, r.output
    lines = [
        line for line in r.stderr.splitlines() if line.strip() and not line.startswith("warning:")
    ]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def images(n, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


# ---------------------------------------------------------------- weights


def test_default_location_is_torch_fidelity_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert default_weights_path() == tmp_path / "hub" / "checkpoints" / WEIGHTS_FILENAME


def test_missing_weights_one_clear_error_and_no_download(monkeypatch, tmp_path, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as e:
        load_network()
    msg = str(e.value)
    for part in (
        str(default_weights_path()),
        WEIGHTS_FILENAME,
        WEIGHTS_SHA256,
        "--inception-weights",
    ):
        assert part in msg
    assert not (tmp_path / "hub").exists()  # nothing was fetched or created


def test_build_network_never_downloads_or_reads_a_file(no_network, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("torch.load called while building")

    monkeypatch.setattr(torch, "load", no_load)
    net = build_network()
    assert len(net.state_dict()) == 566  # torch-fidelity's layout (FACTS.md)


def test_wrong_hash_is_refused_before_loading(random_weights, monkeypatch):
    path, sha = random_weights
    assert sha != WEIGHTS_SHA256

    def no_load(*a, **k):
        raise AssertionError("an unverified file was loaded")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(UserError, match="expected " + WEIGHTS_SHA256):
        load_network(path)
    with pytest.raises(UserError, match="does not match --inception-sha256"):
        load_network(path, "0" * 64)


class _Evil:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_matching_hash_still_loads_tensors_only(tmp_path):
    # even a file whose hash the user vouches for is read with weights_only=True
    evil = _Evil()
    evil.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"x": evil}))
    with pytest.raises(UserError, match="not a plain state dict"):
        load_network(path, sha256_file(path))
    assert not (tmp_path / "pwned").exists()


def test_features_equal_torch_fidelity_own_loading(random_weights, no_network):
    path, sha = random_weights
    ext = InceptionFeatures("edm", path, sha)
    assert ext.weights == {"path": str(path), "sha256": sha, "official": False}
    # the library's own constructor, reading the (our own, verified) file itself
    lib = tfi.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
    )
    batch = torch.from_numpy(np.stack(images(3, 32))).permute(0, 3, 1, 2)
    with torch.no_grad():
        want = lib(batch)[0]
    got = ext.from_uint8(batch)
    assert got.shape == (3, 2048)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # generated samples in [-1, 1] go through the protocol's quantisation first
    x = batch.float() / 127.5 - 1 + 0.1 / 127.5
    torch.testing.assert_close(ext(x), want, rtol=0, atol=0)


def test_features_chunked_like_one_batch(random_weights):
    path, sha = random_weights
    imgs = images(5, 20)
    one = InceptionFeatures("clean", path, sha, batch_size=8).from_uint8(imgs)
    chunked = InceptionFeatures("clean", path, sha, batch_size=2).from_uint8(imgs)
    assert one.shape == (5, 2048)
    torch.testing.assert_close(chunked, one, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- eval-fid with Inception


def write_folder(path, n, size=16):
    path.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images(n, size, seed=1)):
        Image.fromarray(img).save(path / f"{i:05d}.png")
    return path


def test_too_few_images_stop_before_any_work(random_weights, tmp_path):
    path, sha = random_weights
    folder = write_folder(tmp_path / "imgs", 6)
    r = run("eval-fid", "--make-ref", folder, "-o", tmp_path / "ref.npz",
            "--inception-weights", path, "--inception-sha256", sha)  # fmt: skip
    one_line_error(r, "6 images give a singular covariance", "2049")
    assert not (tmp_path / "ref.npz").exists()


def test_missing_weights_from_the_cli(toy_teacher, tmp_path):
    ref = save_stats_npz(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048))
    missing = tmp_path / "nowhere" / WEIGHTS_FILENAME
    r = run("eval-fid", "--teacher", "digits", "--steps", 1, "--features", "inception",
            "--ref", ref, "--num-samples", 3000, "--inception-weights", missing, "--offline")  # fmt: skip
    one_line_error(r, "Inception weights not found", str(missing), WEIGHTS_SHA256)
    r = run("eval-fid", "--teacher", "digits", "--features", "inception", "--num-samples", 3000)
    one_line_error(r, "need reference statistics", "--ref")
    r = run("eval-fid", "--teacher-path", toy_teacher, "--features", "inception", "--ref", ref)
    one_line_error(r, "Inception features need images", "toy2d")


def test_reference_protocol_must_match(random_weights, tmp_path):
    path, sha = random_weights
    ref = save_stats_npz(
        tmp_path / "ref.npz", np.zeros(2048), np.eye(2048), protocol=np.array("clean")
    )
    folder = write_folder(tmp_path / "imgs", 3)
    r = run("eval-fid", "--images", folder, "--ref", ref, "--protocol", "edm")
    # the count check comes first (3 images); with enough images the protocol check would fire
    one_line_error(r, "singular covariance")
    from dmdctl.metrics.evaluate import evaluate
    from dmdctl.settings.eval_fid import EvalFidConfig

    stats = save_stats_npz(tmp_path / "a.npz", np.zeros(2048), np.eye(2048), protocol=np.array("edm"),
                           num_samples=np.array(50000))  # fmt: skip
    with pytest.raises(UserError, match="protocol 'clean' but this run uses 'edm'"):
        evaluate(EvalFidConfig(stats=str(stats), ref=str(ref)))


def test_stats_against_ref_json(tmp_path, capsys):
    # 64-d stand-ins for Inception statistics (a 2048-d distance takes ~20 s on this CPU)
    rng = np.random.default_rng(0)
    d = 64
    a, b = FeatureStats(d), FeatureStats(d)
    fa = rng.standard_normal((2100, d)).astype(np.float32)
    fb = (rng.standard_normal((2100, d)) * 1.1 + 0.05).astype(np.float32)
    a.update(fa)
    b.update(fb)
    pa = save_stats_npz(tmp_path / "a.npz", a.mu, a.sigma, num_samples=np.array(a.n),
                        features=np.array("inception-2015-12-05 pool3 (2048-d)"),
                        protocol=np.array("edm"), kid_features=fa[:300])  # fmt: skip
    pb = save_stats_npz(tmp_path / "b.npz", b.mu, b.sigma, num_samples=np.array(b.n),
                        protocol=np.array("edm"), kid_features=fb[:300])  # fmt: skip
    r = run(
        "eval-fid", "--stats", pa, "--ref", pb, "--json", tmp_path / "r.json", "--kid-subsets", 5
    )
    assert r.exit_code == 0, r.output
    assert "not comparable to 50k-sample FIDs" in r.stderr
    assert len([x for x in r.stderr.splitlines() if x.startswith("warning:")]) == 1
    res = json.loads((tmp_path / "r.json").read_text())
    assert {
        "fid",
        "num_samples",
        "reference",
        "features",
        "protocol",
        "versions",
        "kid",
        "kid_std",
    } <= set(res)
    assert res["fid"] == pytest.approx(frechet_distance(a.mu, a.sigma, b.mu, b.sigma), rel=1e-10)
    assert res["num_samples"] == 2100 and res["reference"]["sha256"] == sha256_file(pb)
    assert res["reference"]["path"] == str(pb) and res["protocol"]["name"] == "edm"
    assert res["features"].startswith("inception-2015-12-05")
    assert res["versions"]["numpy"] == np.__version__ and res["kid_subset_size"] == 300
    one_line_error(run("eval-fid", "--stats", pa), "needs --ref")


def test_stats_with_too_few_samples(tmp_path):
    p = save_stats_npz(tmp_path / "a.npz", np.zeros(2048), np.eye(2048), num_samples=np.array(500))
    one_line_error(
        run("eval-fid", "--stats", p, "--ref", p), "500 samples", "singular covariance", "2049"
    )


def test_mode_conflicts(tmp_path, toy_teacher):
    one_line_error(run("eval-fid", "--images", tmp_path, "--teacher-path", toy_teacher, "--ref", "r.npz"),
                   "pass only one of")  # fmt: skip
    one_line_error(run("eval-fid", "--make-ref", tmp_path), "needs -o")
    one_line_error(run("eval-fid", "--images", tmp_path), "needs --ref")
    one_line_error(run("eval-fid", "--images", tmp_path, "--ref", "r.npz", "--features", "native"),
                   "Inception features")  # fmt: skip
    one_line_error(run("eval-fid", "--teacher-path", toy_teacher, "--protocol", "tf"), "--protocol")
    one_line_error(run("eval-fid", "--make-ref", tmp_path / "nope", "-o", tmp_path / "r.npz"),
                   "images not found")  # fmt: skip


def test_adm_npz_is_streamed_like_the_folder(random_weights, tmp_path):
    from dmdctl.metrics.images import ImageInput
    from dmdctl.runtime import Processes

    imgs = np.stack(images(7, 12, seed=3))
    np.savez(tmp_path / "batch.npz", arr_0=imgs)
    folder = tmp_path / "f"
    folder.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i}.png")
    procs = Processes()
    a = list(ImageInput(tmp_path / "batch.npz").batches(3, procs))
    b = list(ImageInput(folder).batches(3, procs))
    assert [len(i) for i, _ in a] == [3, 3, 1] == [len(i) for i, _ in b]
    for (ia, xa), (ib, xb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(np.stack(xa), np.stack(xb))
    np.savez(tmp_path / "bad.npz", images=imgs)
    with pytest.raises(UserError, match="arr_0"):
        ImageInput(tmp_path / "bad.npz")


@pytest.mark.slow
@pytest.mark.heavy
def test_images_end_to_end_with_random_weights(random_weights, tmp_path):
    """The whole Inception path through the CLI: 2049 images (the minimum); 16 min on 2 busy cores."""
    path, sha = random_weights
    folder = write_folder(tmp_path / "imgs", 2049, size=8)
    rng = np.random.default_rng(0)
    ref = save_stats_npz(tmp_path / "ref.npz", rng.standard_normal(2048) * 0.01, np.eye(2048) * 1e-3,
                         protocol=np.array("edm"))  # fmt: skip
    r = run("eval-fid", "--images", folder, "--ref", ref, "-o", tmp_path / "stats.npz",
            "--json", tmp_path / "r.json", "--inception-weights", path, "--inception-sha256", sha)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (
        "not comparable to 50k-sample FIDs" in r.stderr
        and "not torch-fidelity's official" in r.stderr
    )
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["num_samples"] == 2049 and res["protocol"]["name"] == "edm"
    assert res["inception_weights"] == {"path": str(path), "sha256": sha, "official": False}
    assert res["versions"]["torch-fidelity"] and res["kid"] is None
    r = run(
        "eval-fid", "--stats", tmp_path / "stats.npz", "--ref", ref, "--json", tmp_path / "s.json"
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s.json").read_text())["fid"] == pytest.approx(
        res["fid"], rel=1e-12
    )


# ---------------------------------------------------------------- Fréchet distance vs other tools


def feature_sets(d, n, seed):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    a = rng.standard_normal((n, d)) @ mix + rng.uniform(-1, 1, d)
    b = (rng.standard_normal((n, d)) * 1.2) @ mix + rng.uniform(-1, 1, d)
    out = []
    for f in (a, b):
        s = FeatureStats(d)
        s.update(f)
        out += [s.mu, s.sigma]
    return out


SIZES = [(16, 100), (96, 300), (256, 700), (200, 150)]  # the last: singular covariances


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")
@pytest.mark.parametrize("d,n", SIZES)
def test_frechet_distance_equals_pytorch_fid(d, n):
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    mu1, s1, mu2, s2 = feature_sets(d, n, d)
    want = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("d,n", SIZES)
def test_frechet_distance_equals_torchmetrics(d, n):
    tm_fid = pytest.importorskip("torchmetrics.image.fid")
    mu1, s1, mu2, s2 = feature_sets(d, n, 1000 + d)
    t = [torch.from_numpy(v) for v in (mu1, s1, mu2, s2)]
    want = float(tm_fid._compute_fid(*t))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)
