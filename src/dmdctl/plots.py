"""PNG figures drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw


def scatter_panels(
    panels: list[tuple[str, torch.Tensor]],
    path: Path,
    extent: float,
    centers: torch.Tensor | None = None,
    size: int = 280,
) -> Path:
    """Side-by-side scatter plots of 2-D points, one panel per (title, points)."""
    pad_top = 22
    img = Image.new("RGB", (size * len(panels), size + pad_top), "white")
    draw = ImageDraw.Draw(img)

    def to_px(p: torch.Tensor, ox: int):
        u = (p[:, 0].clamp(-extent, extent) + extent) / (2 * extent) * (size - 1) + ox
        v = (extent - p[:, 1].clamp(-extent, extent)) / (2 * extent) * (size - 1) + pad_top
        return u.round().int().tolist(), v.round().int().tolist()

    for i, (title, pts) in enumerate(panels):
        ox = i * size
        draw.rectangle([ox, pad_top, ox + size - 1, pad_top + size - 1], outline=(180, 180, 180))
        draw.text((ox + 6, 4), title, fill="black")
        us, vs = to_px(pts.detach().float().cpu()[:, :2], ox)
        for u, v in zip(us, vs, strict=True):
            draw.point((u, v), fill=(30, 80, 200))
        if centers is not None:
            cu, cv = to_px(centers.float(), ox)
            for u, v in zip(cu, cv, strict=True):
                draw.ellipse([u - 3, v - 3, u + 3, v + 3], outline=(220, 40, 40))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
