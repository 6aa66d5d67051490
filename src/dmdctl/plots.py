"""PNG figures drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

TITLE_SIZE = 13


def _font():
    try:
        return ImageFont.load_default(size=TITLE_SIZE)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def draw_title(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str) -> None:
    """Text with visible word gaps: Pillow's default font draws a space about 2-3 px wide, so
    "DMD one-step" read as "DMDone-step"; words are placed one by one, half an em apart."""
    font = _font()
    gap = draw.textlength("n", font=font) * 0.8
    x, y = xy
    for word in text.split(" "):
        if word:
            draw.text((x, y), word, fill="black", font=font)
            x += draw.textlength(word, font=font)
        x += gap


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
        draw_title(draw, (ox + 6, 4), title)
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


def image_grid_panels(
    panels: list[tuple[str, torch.Tensor]],
    path: Path,
    labels: torch.Tensor | None,
    num_classes: int = 0,
    per_row: int = 10,
    scale: int = 3,
) -> Path:
    """Image grids side by side: one row per class (when labels are given), images in [-1, 1]."""
    pad_top, gap = 22, 12
    tiles = []
    for title, x in panels:
        x = x.detach().float().cpu()
        if labels is not None and num_classes:
            rows = [x[: len(labels)][labels[: len(x)] == k][:per_row] for k in range(num_classes)]
        else:
            rows = [x[i : i + per_row] for i in range(0, min(len(x), per_row * per_row), per_row)]
        tiles.append((title, rows))
    h, w = panels[0][1].shape[-2:]
    cell_h, cell_w = h * scale + 2, w * scale + 2
    n_rows = max(len(rows) for _, rows in tiles)
    panel_w = per_row * cell_w
    img = Image.new("RGB", (len(tiles) * (panel_w + gap), n_rows * cell_h + pad_top), "white")
    draw = ImageDraw.Draw(img)
    for p, (title, rows) in enumerate(tiles):
        ox = p * (panel_w + gap)
        draw_title(draw, (ox + 2, 4), title)
        for r, row in enumerate(rows):
            for c, im in enumerate(row):
                arr = ((im.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                arr = (
                    arr.permute(1, 2, 0).squeeze(-1).numpy()
                    if arr.shape[0] in (1, 3)
                    else arr.numpy()
                )
                tile = (
                    Image.fromarray(arr)
                    .convert("RGB")
                    .resize((w * scale, h * scale), Image.NEAREST)
                )
                img.paste(tile, (ox + c * cell_w + 1, pad_top + r * cell_h + 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
