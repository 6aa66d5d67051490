"""Real samples for DMD2's GAN (``distill --real-data``), drawn each step with the step's RNG.

Sources: the built-in teachers' own training data (the default for toy2d and digits), or a
store made once by ``dmdctl prepare-real`` from an image folder (with ``captions.jsonl`` for
text-to-image teachers), an ADM/EDM-style ``.npz`` or Parquet files. A step draws row indices
for the global batch, keeps its process's share, and reads only those rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dmdctl.errors import UserError

CAPTIONS_FILE = "captions.jsonl"


@dataclass
class RealData:
    """Real samples held in memory (the built-in teachers' small data sets): ``x`` ``[N, ...]``
    in the teacher's space, ``cond`` class labels ``[N]`` or None. ``sampler`` replaces ``x``
    for an endless source (toy2d's mixture): ``sampler(n, gen) -> (x, labels)``."""

    description: str
    x: torch.Tensor | None = None
    cond: torch.Tensor | None = None
    sampler: object = None

    def __len__(self) -> int:
        return len(self.x) if self.x is not None else 0

    def rows(self, idx: torch.Tensor):
        """Rows ``idx`` and their labels (or None)."""
        return self.x[idx].float(), (self.cond[idx] if self.cond is not None else None)

    def draw(self, n: int, gen: torch.Generator):
        """``n`` samples and their labels (or None)."""
        if self.sampler is not None:
            return self.sampler(n, gen)
        idx = torch.randint(0, len(self.x), (n,), generator=gen)
        return self.rows(idx)


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


def load_real_data(path: str | None, teacher):
    """The GAN's real samples for ``teacher``: a store made by ``dmdctl prepare-real`` (opened,
    its shards' sizes checked; rows are read when a step draws them), or with no path the
    built-in teachers' own training data. Raw images, captions and npz files are refused with
    the prepare-real command that turns them into a store (once, resumable, by every process
    of a launch)."""
    if path is None:
        found = teacher.kind.real_data(teacher.config)
        if found is None:
            raise UserError(
                "the GAN loss (--gan-weight > 0) needs real samples: make a store once with "
                "`dmdctl prepare-real SOURCE --teacher ... --out STORE` (an image folder"
                + (" with captions.jsonl" if teacher.text_conditioned else " or .npz")
                + "), then pass --real-data STORE"
            )
        return found
    p = Path(path)
    if not p.exists():
        raise UserError(f"--real-data {p}: no such file or folder")
    if not is_store(p):
        raise UserError(
            f"--real-data {p} is not a store made by `dmdctl prepare-real`: make one once with "
            f"`dmdctl prepare-real {p} --teacher ... --out STORE` and pass --real-data STORE"
        )
    return open_real_store(p, teacher)


STORE_FORMAT = "dmdctl.real"


def is_store(path: Path) -> bool:
    """Whether ``path`` is a folder made by ``dmdctl prepare-real`` (its manifest says so)."""
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == STORE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False
