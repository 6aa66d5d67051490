"""CLIP score of text-to-image samples: mean cosine similarity of image and caption embeddings.

The scale is the one GigaGAN and DMD2 report (a cosine, e.g. ~0.32 for SD-class models with
OpenCLIP ViT-g/14), not torchmetrics' ``100 * max(cos, 0)``. The model is any transformers
``CLIPModel`` folder or hub id with its processor (e.g. ``laion/CLIP-ViT-g-14-laion2B-s12B-b42K``,
the transformers port of the OpenCLIP model GigaGAN/DMD2 use). With ``offline=True`` or
``HF_HUB_OFFLINE=1`` nothing is downloaded: the model must be a local folder or already cached.

Images are quantised and cropped as in GigaGAN/DMD2's evaluation: samples in [-1, 1] become
uint8 by ``((x + 1) * 127.5).clamp(0, 255)`` truncated, then (with ``resize``) a centre crop on
the short side and PIL LANCZOS to ``resize`` x ``resize``; the model's own processor then does
its resize, crop and normalisation. GigaGAN/DMD2 also prepend "A photo depicts " to every
caption (pass ``prefix="A photo depicts "`` to do the same); their tokenizer is OpenAI CLIP's
with truncation at 77 tokens, which the transformers tokenizer reproduces with
``truncation=True``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dmdctl.errors import UserError


def _offline(flag: bool | None) -> bool:
    if flag:
        return True
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_clip(model_path: str | Path, offline: bool | None = None, device="cpu"):
    from transformers import CLIPModel, CLIPProcessor

    local_only = _offline(offline) or Path(model_path).is_dir()
    try:
        model = CLIPModel.from_pretrained(str(model_path), local_files_only=local_only)
        processor = CLIPProcessor.from_pretrained(str(model_path), local_files_only=local_only)
    except (OSError, ValueError) as e:
        where = "a local folder" if local_only else "a local folder or a hub id"
        raise UserError(
            f"could not load a CLIP model and processor from {model_path} ({where}; "
            f"offline={local_only}): {str(e).splitlines()[0]}"
        ) from None
    return model.eval().requires_grad_(False).to(device), processor


def _uint8_hwc(images) -> list[np.ndarray]:
    if torch.is_tensor(images):
        x = images.detach().cpu()
        if x.dtype != torch.uint8:
            x = ((x.float() + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8)
        if x.dim() != 4:
            raise UserError(f"expected NCHW images, got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return list(x.permute(0, 2, 3, 1).numpy())
    out = []
    for img in images:
        img = np.asarray(img)
        if img.dtype != np.uint8:
            raise UserError(f"images given as arrays must be uint8 HWC, got {img.dtype}")
        out.append(img)
    return out


@torch.no_grad()
def clip_cosines(
    images,
    captions: Sequence[str],
    model_path: str | Path,
    prefix: str = "",
    resize: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    offline: bool | None = None,
    clip=None,
) -> np.ndarray:
    """Per-image cosine similarity between each image and its caption."""
    from dmdctl.metrics.protocols import center_crop_lanczos, hwc_uint8

    imgs = _uint8_hwc(images)
    if len(imgs) != len(captions):
        raise UserError(f"{len(imgs)} images but {len(captions)} captions")
    model, processor = clip or load_clip(model_path, offline, device)
    max_len = getattr(model.config.text_config, "max_position_embeddings", 77)
    out = []
    for i in range(0, len(imgs), batch_size):
        batch = [hwc_uint8(im) for im in imgs[i : i + batch_size]]
        if resize:
            batch = [center_crop_lanczos(im, resize) for im in batch]
        text = [prefix + c for c in captions[i : i + batch_size]]
        tok = processor.tokenizer(
            text, padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )
        pix = processor.image_processor(images=batch, return_tensors="pt")["pixel_values"]
        img_emb = model.visual_projection(
            model.vision_model(pixel_values=pix.to(device)).pooler_output
        )
        txt_emb = model.text_projection(
            model.text_model(
                input_ids=tok["input_ids"].to(device),
                attention_mask=tok["attention_mask"].to(device),
            ).pooler_output
        )
        cos = torch.nn.functional.cosine_similarity(img_emb.double(), txt_emb.double(), dim=1)
        out.append(cos.cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def clip_score(images, captions: Sequence[str], model_path: str | Path, **kwargs) -> float:
    """Mean cosine similarity between images (uint8, or NCHW floats in [-1, 1]) and captions."""
    cos = clip_cosines(images, captions, model_path, **kwargs)
    if len(cos) == 0:
        raise UserError("no images to score")
    return float(cos.mean())
