"""``dmdctl clip-score``: CLIP score of a folder of images against their prompts.

Images and prompts are matched in one of two ways:

- the ``images.jsonl`` that ``dmdctl sample --prompts`` writes next to its ``images/`` folder
  (one JSON object per image, with ``file`` relative to the jsonl's folder and ``prompt``): every
  listed image is scored with its own prompt;
- any other prompts file (one prompt per line, or JSON lines without ``file``): the images of the
  folder, sorted by path, are paired with the prompts in order, and the counts must be equal.

The score itself is :func:`dmdctl.metrics.clip.clip_cosines` (cosine scale, as GigaGAN and DMD2
report it); the CLIP model is a local transformers folder or a hub id (``--offline``: local only).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from dmdctl.commands import show
from dmdctl.config import write_config
from dmdctl.errors import UserError
from dmdctl.settings.clip_score import ClipScoreConfig


def _pairs_from_index(index: Path) -> list[tuple[Path, str]] | None:
    """(image path, prompt) from a jsonl whose rows name their ``file``; None if they do not."""
    rows = []
    for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{index}:{n} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "file" not in row:
            return None
        text = next((row[k] for k in ("prompt", "caption", "text") if k in row), None)
        if not isinstance(text, str):
            raise UserError(f"{index}:{n} has no 'prompt', 'caption' or 'text' string field")
        rows.append((index.parent / str(row["file"]), text))
    return rows


def image_prompt_pairs(images: Path, prompts: Path) -> list[tuple[Path, str]]:
    from dmdctl.metrics.images import list_images
    from dmdctl.teachers.sd.pipeline import read_prompts

    if not images.is_dir():
        raise UserError(f"--images {images} is not a folder")
    if not prompts.is_file():
        raise UserError(f"prompts file not found: {prompts}")
    if prompts.suffix.lower() in (".jsonl", ".json"):
        pairs = _pairs_from_index(prompts)
        if pairs is not None:
            missing = [str(p) for p, _ in pairs if not p.is_file()]
            if missing:
                raise UserError(
                    f"{prompts} names {len(missing)} image(s) that do not exist, e.g. {missing[0]}"
                )
            return pairs
    files = list_images(images)
    texts = read_prompts(prompts)
    if len(files) != len(texts):
        raise UserError(
            f"{images} holds {len(files)} images but {prompts} has {len(texts)} prompts: pass "
            "the images.jsonl that `dmdctl sample` wrote, or as many prompts as images"
        )
    return list(zip(files, texts, strict=True))


def clip_score_folder(cfg: ClipScoreConfig) -> dict:
    from dmdctl.metrics.clip import clip_cosines
    from dmdctl.metrics.images import read_image
    from dmdctl.runtime import pick_device

    pairs = image_prompt_pairs(Path(cfg.images), Path(cfg.prompts))
    if not pairs:
        raise UserError(f"{cfg.prompts} lists no images")
    device = pick_device(cfg.device)
    t0 = time.perf_counter()
    images = [np.array(read_image(p)) for p, _ in pairs]  # writable copies for torch
    cos = clip_cosines(
        images,
        [t for _, t in pairs],
        cfg.clip_model,
        prefix=cfg.prefix,
        resize=cfg.resize or None,
        batch_size=cfg.batch_size,
        device=device,
        offline=cfg.offline,
    )
    result = {
        "clip_score": float(cos.mean()),
        "clip_score_std": float(cos.std()),
        "num_images": len(pairs),
        "clip_model": str(cfg.clip_model),
        "prefix": cfg.prefix,
        "resize": cfg.resize or None,
        "images": str(cfg.images),
        "prompts": str(cfg.prompts),
        "scale": "cosine similarity (GigaGAN / DMD2), not 100 * max(cos, 0)",
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if cfg.json:
        path = Path(cfg.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        write_config(cfg, path.parent, name=path.stem + ".config.toml")
    return result


__all__ = ["ClipScoreConfig", "clip_score_folder", "image_prompt_pairs"]


def run(cfg: ClipScoreConfig) -> int | None:
    """Run the command on resolved settings (its help: :data:`dmdctl.settings.clip_score.HELP`)."""

    show("clip-score", clip_score_folder(cfg))
    return None
