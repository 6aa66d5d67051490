"""FD-DINOv2 (``eval-fid --features dinov2 --dinov2 DIR``): EDM2's protocol on a local
transformers Dinov2Model (here a tiny random one written to a folder; nothing is downloaded)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cli_helpers import ok, one_line_error, run


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> str:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, patch_size=14, image_size=224)  # fmt: skip
    folder = tmp_path_factory.mktemp("dinov2") / "dinov2"
    Dinov2Model(cfg).save_pretrained(folder)
    return str(folder)


def test_features_are_edm2s_protocol(tiny_dinov2):
    """uint8 images -> torch bicubic+antialias to 224 -> [0, 1] -> ImageNet mean/std -> the
    class token after the final norm; samples in [-1, 1] are rounded to uint8 first."""
    from transformers import Dinov2Model

    from dmdctl.metrics.dinov2 import DinoV2Features

    ext = DinoV2Features(tiny_dinov2, "cpu", batch=3)
    model = Dinov2Model.from_pretrained(tiny_dinov2).eval()
    imgs = torch.randint(
        0, 256, (5, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    x = F.interpolate(imgs.float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model(pixel_values=x).last_hidden_state[:, 0]  # after the final layer norm
    got = ext.from_uint8(imgs)
    assert got.shape == (5, 16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # samples in [-1, 1]: the uint8 images they round to
    samples = imgs.float() / 127.5 - 1
    torch.testing.assert_close(ext(samples), got, atol=1e-5, rtol=1e-5)


def test_fd_dinov2_of_a_generator_against_a_reference_made_with_dinov2(tmp_path, tiny_dinov2):
    from test_edm2 import TINY, converted

    teacher, _ = converted(tmp_path, TINY, 0, "teacher")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "real.npz", rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8))
    dino = ["--features", "dinov2", "--dinov2", tiny_dinov2, "--device", "cpu"]
    ok(run("eval-fid", "--make-ref", tmp_path / "real.npz", "-o", tmp_path / "ref.npz", *dino))
    ref = np.load(tmp_path / "ref.npz")
    assert ref["mu"].shape == (16,) and str(ref["protocol"]) == "dinov2"
    ok(run("eval-fid", "--teacher-path", teacher, "--steps", 1, "--num-samples", 24,
           "--batch-size", 12, "--ref", tmp_path / "ref.npz", "--json", tmp_path / "r.json",
           *dino))  # fmt: skip
    res = json.loads((tmp_path / "r.json").read_text())
    assert "fid" not in res and math.isfinite(res["fd_dinov2"]) and res["fd_dinov2"] > 0
    assert res["protocol"]["name"] == "dinov2" and res["dinov2_weights"]["path"] == tiny_dinov2
    # an image folder scored against the same reference: the same distance for the same images
    folder = _images(tmp_path)
    ok(run("eval-fid", "--images", folder, "--ref", tmp_path / "ref.npz", "--json",
           tmp_path / "i.json", *dino))  # fmt: skip
    assert json.loads((tmp_path / "i.json").read_text())["fd_dinov2"] == pytest.approx(0, abs=1e-6)
    # a reference of Inception statistics does not fit DINOv2 features
    np.savez(tmp_path / "incep.npz", mu=np.zeros(2048), sigma=np.eye(2048),
             features=np.array("inception-2015-12-05 pool3 (2048-d)"))  # fmt: skip
    one_line_error(run("eval-fid", "--images", folder, "--ref", tmp_path / "incep.npz", *dino),
                   "features")  # fmt: skip


def test_dinov2_bad_inputs(tmp_path, tiny_dinov2):
    base = ["eval-fid", "--make-ref", tmp_path / "x.npz", "-o", tmp_path / "r.npz"]
    one_line_error(
        run(*base, "--features", "dinov2"), "--features dinov2 and --dinov2 DIR go together"
    )
    one_line_error(
        run(*base, "--features", "dinov2", "--dinov2", tmp_path / "none"), "no such folder"
    )
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "x.npz", np.zeros((20, 16, 16, 3), dtype=np.uint8))
    one_line_error(run(*base, "--features", "dinov2", "--dinov2", tmp_path / "empty"),
                   "not a transformers model folder")  # fmt: skip
    assert not (tmp_path / "r.npz").exists()


def test_edm2_reference_pickle_is_read_as_data(tmp_path, tiny_dinov2):
    """EDM2's published references are pickles (dict(num_images, fid=dict(mu, sigma),
    fd_dinov2=...)): eval-fid reads the entry of its metric through the restricted unpickler,
    and refuses one that holds anything else."""
    import pickle

    from dmdctl.metrics.fid import frechet_distance
    from test_edm import RunsShell

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "real.npz", rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8))
    a = rng.normal(size=(16, 16))
    stats = {"num_images": 50000, "fd_dinov2": {"mu": rng.normal(size=16), "sigma": a @ a.T / 16},
             "fid": {"mu": np.zeros(2048), "sigma": np.eye(2048)}}  # fmt: skip
    (tmp_path / "img512.pkl").write_bytes(pickle.dumps(stats, protocol=4))
    dino = ["--features", "dinov2", "--dinov2", tiny_dinov2, "--device", "cpu"]
    ok(run("eval-fid", "--make-ref", tmp_path / "real.npz", "-o", tmp_path / "own.npz", *dino))
    folder = _images(tmp_path)
    ok(run("eval-fid", "--images", folder, "--ref", tmp_path / "img512.pkl", "--json",
           tmp_path / "r.json", *dino))  # fmt: skip
    res = json.loads((tmp_path / "r.json").read_text())
    own = np.load(tmp_path / "own.npz")
    want = frechet_distance(
        own["mu"], own["sigma"], stats["fd_dinov2"]["mu"], stats["fd_dinov2"]["sigma"]
    )
    assert res["fd_dinov2"] == pytest.approx(want, rel=1e-6)
    assert res["reference"]["entry"] == "fd_dinov2" and res["reference"]["num_samples"] == 50000
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"fd_dinov2": RunsShell(marker)}))
    one_line_error(run("eval-fid", "--images", folder, "--ref", tmp_path / "evil.pkl", *dino),
                   "refusing")  # fmt: skip
    assert not marker.exists()


def _images(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    for i, im in enumerate(np.load(tmp_path / "real.npz")["arr_0"]):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    return folder
