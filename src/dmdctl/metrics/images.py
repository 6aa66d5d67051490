"""Images to score: a folder (searched recursively) or an ADM/EDM-style npz (``arr_0``, NHWC
uint8), read in batches that the processes of a launch share."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dmdctl.errors import UserError
from dmdctl.runtime import Processes

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def list_images(folder: Path) -> list[Path]:
    files = sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise UserError(
            f"{folder} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}, searched recursively)"
        )
    return files


def read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def _npz_header(zf: zipfile.ZipFile, path: Path):
    if "arr_0.npy" not in zf.namelist():
        raise UserError(
            f"{path} has no 'arr_0' array (expected ADM-style NHWC uint8 images in arr_0; "
            f"keys: {', '.join(n.removesuffix('.npy') for n in zf.namelist())})"
        )
    f = zf.open("arr_0.npy")
    major, _ = np.lib.format.read_magic(f)
    read = (
        np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read(f)
    if (
        dtype != np.uint8
        or fortran
        or len(shape) not in (3, 4)
        or (len(shape) == 4 and shape[3] not in (1, 3))
    ):
        f.close()
        raise UserError(
            f"{path}: arr_0 must be NHWC uint8 images (N x H x W x 3), got {dtype} {shape}"
        )
    return f, shape


class ImageInput:
    """Images of a folder or an ADM-style npz, streamed in batches (round-robin over processes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            self.files = list_images(self.path)
            self.count = len(self.files)
            self.kind = "folder"
        elif self.path.is_file():
            try:
                with zipfile.ZipFile(self.path) as zf:
                    f, self.shape = _npz_header(zf, self.path)
                    f.close()
            except zipfile.BadZipFile:
                raise UserError(
                    f"{self.path} is neither a folder of images nor an npz file"
                ) from None
            self.count = int(self.shape[0])
            self.kind = "npz"
        else:
            raise UserError(f"images not found: {self.path}")

    @property
    def description(self) -> str:
        return f"{self.kind} {self.path}"

    def batches(self, batch: int, procs: Processes) -> Iterator[tuple[np.ndarray, list]]:
        """(global indices, list of HWC uint8 images) for this process's batches."""
        starts = range(0, self.count, batch)
        if self.kind == "folder":
            for b, lo in enumerate(starts):
                if procs.mine(b):
                    idx = np.arange(lo, min(lo + batch, self.count))
                    yield idx, [read_image(self.files[i]) for i in idx]
            return
        with zipfile.ZipFile(self.path) as zf:
            f, shape = _npz_header(zf, self.path)
            per = int(np.prod(shape[1:]))
            with f:
                for b, lo in enumerate(starts):
                    n = min(batch, self.count - lo)
                    raw = f.read(n * per)
                    if len(raw) != n * per:
                        raise UserError(f"{self.path}: arr_0 is truncated")
                    if procs.mine(b):
                        arr = np.frombuffer(raw, np.uint8).reshape(n, *shape[1:])
                        yield np.arange(lo, lo + n), list(arr)


# ---------------------------------------------------------------- the shared tail
