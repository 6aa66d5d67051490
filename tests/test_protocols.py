"""Protocols: quantisation and resize rules, checked against the libraries' own functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dmdctl.errors import UserError
from dmdctl.metrics.inception import build_network, pool3_from_normalized
from dmdctl.metrics.protocols import CLEAN, EDM, center_crop_lanczos, get_protocol

tfi_interp = pytest.importorskip("torch_fidelity.interpolate_compat_tensorflow")
cleanfid_resize = pytest.importorskip("cleanfid.resize")


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_network()


def fixed_image(h=48, w=64, seed=0) -> np.ndarray:
    """A fixed test image: smooth gradients plus noise, HWC uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / (w - 1), yy * 255 / (h - 1), (xx + yy) % 256], axis=2)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- quantisation


def test_edm_quantisation_is_edm_generate_py_rule():
    # values whose x * 127.5 + 127.5 lands exactly on .5 (round half up) and on the ends
    v = torch.tensor([-1.0, -0.9, 0.0, 1.0, 1.5, -2.0, 10.5 / 127.5 - 1, 0.3])
    x = v.view(1, 1, 1, -1)
    got = EDM.to_uint8(x)
    assert got.shape == (1, 3, 1, 8) and got.dtype == torch.uint8
    # EDM generate.py, verbatim
    want = (x * 127.5 + 128).clip(0, 255).to(torch.uint8)
    assert torch.equal(got[:, :1], want)
    assert got[0, 0, 0].tolist()[:4] == [0, 13, 128, 255]
    assert got[0, 0, 0, 6].item() == 11  # 10.5 rounds up
    # grayscale is repeated to RGB, as EDM's fid.py does
    assert torch.equal(got[:, 0], got[:, 1]) and torch.equal(got[:, 0], got[:, 2])


def test_clean_quantisation_is_gigagan_dmd2_rule():
    x = torch.tensor([-1.0, 10.5 / 127.5 - 1, 0.0, 1.0, 2.0]).view(1, 1, 1, -1).repeat(1, 3, 1, 1)
    got = CLEAN.to_uint8(x)
    # GigaGAN/DMD2 tensor2pil, verbatim
    want = ((x + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8)
    assert torch.equal(got, want)
    assert got[0, 0, 0].tolist() == [0, 10, 127, 255, 255]  # truncation: 10.5 -> 10, 127.5 -> 127


def test_protocols_are_named_and_described():
    for name in ("edm", "clean"):
        rec = get_protocol(name).record()
        assert rec["name"] == name and rec["quantization"] and rec["resize"] and rec["follows"]
    assert "TF1" in EDM.resize and "LANCZOS" in CLEAN.resize and "bicubic" in CLEAN.resize
    with pytest.raises(UserError, match="unknown protocol"):
        get_protocol("legacy")


# ---------------------------------------------------------------- edm resize


def tf1_bilinear_reference(img: np.ndarray, size: int) -> np.ndarray:
    """TF1 resize_bilinear (align_corners=False, half_pixel_centers=False): src = dst * in/out."""
    h, w = img.shape[:2]
    out = np.zeros((size, size, img.shape[2]))
    ys, xs = np.arange(size) * (h / size), np.arange(size) * (w / size)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    dy, dx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    f = img.astype(np.float64)
    top = f[y0][:, x0] + (f[y0][:, x1] - f[y0][:, x0]) * dx
    bot = f[y1][:, x0] + (f[y1][:, x1] - f[y1][:, x0]) * dx
    out = top + (bot - top) * dy
    return out


def test_torch_fidelity_resize_is_tf1_bilinear():
    img = fixed_image()
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    lib = tfi_interp.interpolate_bilinear_2d_like_tensorflow1x(
        t, size=(299, 299), align_corners=False
    )
    np.testing.assert_allclose(
        lib[0].permute(1, 2, 0).numpy(), tf1_bilinear_reference(img, 299), atol=2e-3
    )


def test_edm_features_are_the_library_resize_then_the_network(net):
    # the edm path hands uint8 to torch-fidelity's forward; that forward must equal its TF1
    # resize followed by (x - 128) / 128 and the pool3 layers (what the protocol describes)
    img = fixed_image()
    kind, batch = next(EDM.network_batches([img]))
    assert kind == "uint8" and batch.dtype == torch.uint8 and batch.shape == (1, 3, 48, 64)
    with torch.no_grad():
        lib = net(batch)[0]
        resized = tfi_interp.interpolate_bilinear_2d_like_tensorflow1x(
            batch.float(), size=(299, 299), align_corners=False
        )
        ours = pool3_from_normalized(net, (resized - 128) / 128)
    torch.testing.assert_close(ours, lib, rtol=0, atol=0)


def test_edm_groups_images_by_size():
    imgs = [fixed_image(8, 8), fixed_image(8, 8, 1), fixed_image(9, 8), fixed_image(8, 8, 2)]
    shapes = [tuple(b.shape) for _, b in EDM.network_batches(imgs)]
    assert shapes == [(2, 3, 8, 8), (1, 3, 9, 8), (1, 3, 8, 8)]


# ---------------------------------------------------------------- clean resize


def test_center_crop_lanczos_is_gigagan_resize_and_center_crop():
    img = fixed_image(200, 300)  # landscape: crop 200x200 from x = 50
    got = center_crop_lanczos(img, 256)
    want = np.asarray(Image.fromarray(img[:, 50:250]).resize((256, 256), Image.LANCZOS))
    assert got.dtype == np.uint8 and got.shape == (256, 256, 3)
    np.testing.assert_array_equal(got, want)
    tall = fixed_image(301, 200)  # portrait, odd margin: torchvision rounds (101 / 2) to 50
    np.testing.assert_array_equal(
        center_crop_lanczos(tall, 64),
        np.asarray(Image.fromarray(tall[50:250]).resize((64, 64), Image.LANCZOS)),
    )


def test_clean_resize_is_clean_fid_clean_mode():
    img = fixed_image(200, 300)
    ours = CLEAN.resize_one(img)
    ref = cleanfid_resize.build_resizer("clean")(center_crop_lanczos(img))
    assert ours.dtype == np.float32 and ours.shape == (299, 299, 3)
    np.testing.assert_array_equal(ours, ref)
    # and it is not quantised: clean-fid keeps the float result
    assert not np.allclose(ours, np.round(ours))


def test_clean_batches_feed_float_images_normalised_like_clean_fid(net):
    img = fixed_image(256, 256)
    kind, batch = next(CLEAN.network_batches([img]))
    assert kind == "float299" and batch.dtype == torch.float32 and batch.shape == (1, 3, 299, 299)
    want = cleanfid_resize.build_resizer("clean")(img)  # 256x256 input: crop and LANCZOS are no-ops
    np.testing.assert_array_equal(batch[0].permute(1, 2, 0).numpy(), want)


def test_float_path_equals_library_forward_at_299(net):
    # at 299x299 torch-fidelity's resize is the identity: its uint8 forward and dmdctl's float
    # path (used by the clean protocol) must agree exactly
    img = torch.from_numpy(fixed_image(299, 299)).permute(2, 0, 1)[None]
    with torch.no_grad():
        lib = net(img)[0]
        ours = pool3_from_normalized(net, (img.float() - 128) / 128)
    torch.testing.assert_close(ours, lib, rtol=0, atol=0)


def test_tensor_input_matches_list_input():
    img = fixed_image(40, 40)
    t = torch.from_numpy(img).permute(2, 0, 1)[None]
    for proto in (EDM, CLEAN):
        (_, a), (_, b) = next(proto.network_batches(t)), next(proto.network_batches([img]))
        assert torch.equal(a, b)
