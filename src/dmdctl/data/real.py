"""Real samples for DMD2's GAN (``distill --real-data``), drawn each step with the step's RNG.

Sources:

- the built-in teachers' own training data (the default for toy2d and digits);
- an image folder (unconditional teachers; centre-cropped and resized to the teacher's
  resolution) or an ADM/EDM-style ``.npz`` (``arr_0``: uint8
  images ``[N, H, W, C]``; ``arr_1``: integer labels, needed by class-conditional teachers);
- for text-to-image teachers, a folder of images with ``captions.jsonl`` (one
  ``{"file": ..., "caption": ...}`` per line): the images are encoded to latents by the VAE and
  the captions by the text encoder once, and cached in the run folder (``real_data.safetensors``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dmdctl.errors import UserError

CACHE_FILE = "real_data.safetensors"
CAPTIONS_FILE = "captions.jsonl"


@dataclass
class RealData:
    """``x``: samples ``[N, ...]`` in the teacher's space (latents for SD); ``cond``: class labels
    ``[N]``, indices into ``embeddings`` (SD), or None. ``sampler`` replaces ``x`` for an
    endless source (toy2d's mixture): ``sampler(n, gen) -> (x, labels)``."""

    description: str
    x: torch.Tensor | None = None
    cond: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None  # [N, L, D] caption embeddings (SD)
    sampler: object = None

    def __len__(self) -> int:
        return len(self.x) if self.x is not None else 0

    def draw(self, n: int, gen: torch.Generator):
        """``n`` samples and their conditions (labels, caption embeddings or None)."""
        if self.sampler is not None:
            return self.sampler(n, gen)
        idx = torch.randint(0, len(self.x), (n,), generator=gen)
        c = None
        if self.cond is not None:
            c = self.cond[idx]
            if self.embeddings is not None:
                c = self.embeddings[c]
        return self.x[idx].float(), c


def _to_unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` -> float32 ``[N, C, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _read_images(files: list[Path], channels: int, size: int | None = None) -> np.ndarray:
    from PIL import Image

    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise UserError(f"--real-data images need 1 or 3 channels; this teacher has {channels}")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if size is not None and im.size != (size, size):
                    side = min(im.size)  # centre crop, then resize (as dataset tools do)
                    left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
                    im = im.crop((left, top, left + side, top + side)).resize(
                        (size, size), Image.BICUBIC
                    )
                a = np.asarray(im)
        except OSError as e:
            raise UserError(f"could not read image {f} ({e})") from None
        out.append(a[..., None] if a.ndim == 2 else a)
    return np.stack(out)


def _check_shape(x: torch.Tensor, shape: tuple[int, ...], where: str) -> None:
    if tuple(x.shape[1:]) != tuple(shape):
        raise UserError(
            f"--real-data {where} holds samples of shape {tuple(x.shape[1:])}, but this teacher "
            f"makes {tuple(shape)}"
        )


def load_real_data(path: str | None, teacher, cache_dir: Path, device="cpu") -> RealData:
    """The GAN's real samples for ``teacher`` (see the module's docstring)."""
    if path is None:
        found = teacher.kind.real_data(teacher.config)
        if found is None:
            raise UserError(
                "the GAN loss (--gan-weight > 0) needs real samples: pass --real-data with an "
                "image folder or .npz"
                + (
                    " (images with captions.jsonl for text-to-image)"
                    if teacher.text_conditioned
                    else ""
                )
            )
        return found
    p = Path(path)
    if not p.exists():
        raise UserError(f"--real-data {p}: no such file or folder")
    if teacher.text_conditioned:
        return _captioned_latents(p, teacher, Path(cache_dir), device)
    shape = tuple(teacher.sample_shape)
    if len(shape) != 3:
        raise UserError(
            f"--real-data takes images; the '{teacher.name}' teacher is not an image model"
        )
    k = teacher.num_classes
    if p.is_file():
        if p.suffix.lower() != ".npz":
            raise UserError(f"--real-data {p}: expected an image folder or a .npz file")
        try:
            with np.load(p, allow_pickle=False) as data:
                images = data["arr_0"]
                labels = data["arr_1"] if "arr_1" in data.files else None
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--real-data {p}: not an ADM/EDM-style npz with arr_0 ({e})") from None
        if images.ndim != 4 or images.dtype != np.uint8:
            raise UserError(f"--real-data {p}: arr_0 must be uint8 [N, H, W, C]")
        x = _to_unit_range(images)
        _check_shape(x, shape, str(p))
        cond = None
        if k:
            if labels is None:
                raise UserError(
                    f"--real-data {p} has no labels (arr_1) but the teacher is class-conditional"
                )
            cond = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
            if len(cond) != len(x) or int(cond.min()) < 0 or int(cond.max()) >= k:
                raise UserError(f"--real-data {p}: arr_1 must hold {len(x)} labels in 0..{k - 1}")
        return RealData(f"{p} ({len(x)} images)", x, cond)
    from dmdctl.metrics.images import list_images

    if k:
        raise UserError(
            f"--real-data {p} is an image folder without labels, but the teacher is "
            "class-conditional: pass an npz with labels (arr_1)"
        )
    # centre-cropped and resized to the teacher's resolution, as for text-to-image teachers
    x = _to_unit_range(_read_images(list_images(p), shape[0], shape[-1]))
    return RealData(f"{p} ({len(x)} images, resized to {shape[-1]}x{shape[-1]})", x, None)


def _read_captions(folder: Path) -> tuple[list[Path], list[str]]:
    path = folder / CAPTIONS_FILE
    if not path.is_file():
        raise UserError(
            f"--real-data {folder}: a text-to-image teacher needs {CAPTIONS_FILE} next to the "
            'images, one {"file": ..., "caption": ...} per line'
        )
    files, captions = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            f, text = folder / row["file"], row["caption"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{n} needs a JSON object with 'file' and 'caption'") from None
        if not f.is_file():
            raise UserError(f"{path}:{n}: image {f} not found")
        files.append(f)
        captions.append(str(text))
    if not files:
        raise UserError(f"{path} lists no image")
    return files, captions


@torch.no_grad()
def _captioned_latents(folder: Path, teacher, cache_dir: Path, device) -> RealData:
    from dmdctl.files import atomic_save_safetensors, load_cached_safetensors
    from dmdctl.teachers.sd.pipeline import text_identity

    if not folder.is_dir():
        raise UserError(f"--real-data {folder}: expected a folder of images with {CAPTIONS_FILE}")
    files, captions = _read_captions(folder)
    stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps([stamp, captions, text_identity(teacher)]).encode()).hexdigest()
    cache = cache_dir / CACHE_FILE
    description = f"{folder} ({len(files)} captioned images, latents cached in {cache})"
    d = load_cached_safetensors(cache, key)
    if d is not None:
        return RealData(description, d["latents"], d["index"], d["embeddings"])
    cfg = teacher.config
    images = _to_unit_range(_read_images(files, 3, int(cfg["resolution"])))
    codec = teacher.codec
    vae = codec.vae
    home = next(vae.parameters()).device
    vae.to(device)
    latents = torch.cat(
        [codec.encode(images[i : i + 8].to(device)).float().cpu() for i in range(0, len(images), 8)]
    )
    vae.to(home)
    encoder = teacher.text_encoder()
    emb = encoder(captions, device)
    del encoder
    index = torch.arange(len(files))
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(
        {"latents": latents.contiguous(), "index": index, "embeddings": emb.contiguous()},
        cache,
        {"key": key, "source": str(folder)},
    )
    return RealData(description, latents, index, emb)
