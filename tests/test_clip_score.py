"""CLIP score on a tiny random CLIPModel saved locally (tokenizer built from a tiny vocab)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmdctl.errors import UserError
from dmdctl.metrics.clip import clip_cosines, clip_score

transformers = pytest.importorskip("transformers")
CAPTIONS = ["a cat on a mat", "two dogs", "the quick brown fox", "zebra"]


def uint8_images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 40, 48), dtype=np.uint8)


def test_clip_score_equals_clip_model_forward(tiny_clip, no_network):
    from transformers import CLIPModel, CLIPProcessor

    imgs = uint8_images()
    got = clip_cosines(torch.from_numpy(imgs), CAPTIONS, tiny_clip, batch_size=3)
    # reference: the model's own forward (logits_per_image = exp(logit_scale) * cosine)
    model = CLIPModel.from_pretrained(tiny_clip, local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(tiny_clip, local_files_only=True)
    inputs = proc(
        text=CAPTIONS, images=list(imgs.transpose(0, 2, 3, 1)), return_tensors="pt", padding=True
    )
    with torch.no_grad():
        out = model(**inputs)
    want = (out.logits_per_image.diag() / model.logit_scale.exp()).detach().double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert clip_score(torch.from_numpy(imgs), CAPTIONS, tiny_clip) == pytest.approx(
        want.mean(), rel=1e-5, abs=1e-6
    )


def test_float_images_are_quantised_like_dmd2(tiny_clip):
    imgs = uint8_images(2, 1)
    x = torch.from_numpy(imgs).float() / 127.5 - 1 + 0.2 / 127.5  # truncates back to imgs
    a = clip_cosines(x, CAPTIONS[:2], tiny_clip)
    b = clip_cosines(torch.from_numpy(imgs), CAPTIONS[:2], tiny_clip)
    np.testing.assert_array_equal(a, b)


def test_prefix_and_resize_change_the_score(tiny_clip):
    imgs = torch.from_numpy(uint8_images(2, 2))
    base = clip_cosines(imgs, CAPTIONS[:2], tiny_clip)
    assert not np.allclose(
        base, clip_cosines(imgs, CAPTIONS[:2], tiny_clip, prefix="a photo depicts ")
    )
    assert clip_cosines(imgs, CAPTIONS[:2], tiny_clip, resize=256).shape == (2,)


def test_offline_hub_id_fails_cleanly_without_network(monkeypatch, tmp_path, no_network):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not load a CLIP model"):
        clip_score(
            torch.from_numpy(uint8_images(1)), CAPTIONS[:1], "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"
        )
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(UserError, match="offline=True"):
        clip_score(
            torch.from_numpy(uint8_images(1)),
            CAPTIONS[:1],
            "openai/clip-vit-base-patch32",
            offline=True,
        )


def test_mismatched_counts(tiny_clip):
    with pytest.raises(UserError, match="2 images but 3 captions"):
        clip_score(torch.from_numpy(uint8_images(2)), CAPTIONS[:3], tiny_clip)
