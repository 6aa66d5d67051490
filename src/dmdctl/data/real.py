"""Real samples for DMD2's GAN (``distill --real-data``), drawn each step with the step's RNG.

Sources:

- the built-in teachers' own training data (the default for toy2d and digits);
- an image folder (unconditional teachers; centre-cropped and resized to the teacher's
  resolution) or an ADM/EDM-style ``.npz`` (``arr_0``: uint8
  images ``[N, H, W, C]``; ``arr_1``: integer labels, needed by class-conditional teachers);
- for text-to-image teachers, a folder of images with ``captions.jsonl`` (one
  ``{"file": ..., "caption": ...}`` per line): the images are encoded to latents by the VAE and
  the captions by the text encoder once, and cached in the run folder (``real_data.safetensors``);
- a store made once by ``dmdctl prepare-real`` (:mod:`dmdctl.data.real_store`), opened with
  :func:`open_real_store` and read by row (:meth:`RealStore.rows`), memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
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


def _prepare_image(im, mode: str, size: int | None = None) -> np.ndarray:
    """A PIL image in ``mode``, centre-cropped and resized (bicubic) to ``size`` x ``size``."""
    from PIL import Image

    im = im.convert(mode)
    if size is not None and im.size != (size, size):
        side = min(im.size)  # centre crop, then resize (as dataset tools do)
        left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return np.asarray(im)


def _read_images(files: list[Path], channels: int, size: int | None = None) -> np.ndarray:
    from PIL import Image

    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise UserError(f"--real-data images need 1 or 3 channels; this teacher has {channels}")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                a = _prepare_image(im, mode, size)
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


# --- the store made by `dmdctl prepare-real`, read by row ---------------------------------------
@dataclass
class _OpenShard:
    mm: object  # the pyarrow MemoryMappedFile (kept alive with the views)
    x: np.ndarray  # [count, *sample_shape], a zero-copy view of the mapping
    cond: object  # the caption column (pyarrow StringArray), labels (numpy), or None
    stat: tuple[int, int]  # (st_ino, st_size) when opened: a changed file is noticed


class RealStore:
    """A complete store made by ``dmdctl prepare-real`` (:mod:`dmdctl.data.real_store`),
    memory-mapped shard by shard when first drawn from; :meth:`rows` reads only the rows asked.

    Made by :func:`open_real_store`. Picklable (a DataLoader worker re-opens the shards)."""

    MAX_OPEN = 64  # open shards kept (least recently used closed first)

    def __init__(self, folder: Path, manifest: dict):
        self.folder = Path(folder)
        self.manifest = manifest
        self.entries = list(manifest["shards"])
        self.sample_shape = tuple(int(s) for s in manifest["sample_shape"])
        self.kind = manifest["kind"]
        self.conditioning = manifest["conditioning"]
        counts = np.array([e["count"] for e in self.entries], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # global row of each shard's first
        self.num_shards = len(self.entries)
        src = manifest["source"]
        self.description = (
            f"{self.folder} ({len(self):,} {self.kind} from {src['path']}, "
            f"{self.num_shards} shards)"
        )
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_open"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open = OrderedDict()

    def _path(self, k: int) -> Path:
        return self.folder / self.entries[k]["file"]

    def _damaged(self, k: int, row: int, why: str) -> UserError:
        return UserError(
            f"real-data shard {self._path(k)} (row {row}) {why}; run the same `dmdctl "
            "prepare-real` command again to remake it"
        )

    def _shard(self, k: int, row: int) -> _OpenShard:
        import pyarrow as pa

        path = self._path(k)
        try:
            st = os.stat(path)
        except OSError as e:
            raise self._damaged(k, row, f"is unreadable ({e.strerror or e})") from None
        found = self._open.get(k)
        if found is not None:
            if (st.st_ino, st.st_size) != found.stat:
                del self._open[k]  # never touch a mapping whose file shrank (SIGBUS)
                raise self._damaged(k, row, "was changed or truncated since it was opened")
            self._open.move_to_end(k)
            return found
        entry = self.entries[k]
        if st.st_size != entry["bytes"]:
            raise self._damaged(
                k, row, f"is {st.st_size} bytes, the manifest says {entry['bytes']} (truncated?)"
            )
        try:
            mm = pa.memory_map(str(path))
            batch = pa.ipc.open_file(mm).get_batch(0)
            col = batch.column("x")
            per_row = int(np.prod(self.sample_shape))
            values = col.values.to_numpy(zero_copy_only=True)
            if (
                col.offset != 0
                or batch.num_rows != entry["count"]
                or len(values) != (batch.num_rows * per_row)
            ):
                raise ValueError("its rows do not match the manifest")
            x = values.reshape(batch.num_rows, *self.sample_shape)
            cond = None
            if self.conditioning == "captions":
                cond = batch.column("caption")
            elif self.conditioning == "labels":
                cond = batch.column("label").to_numpy(zero_copy_only=True)
        except (OSError, ValueError, KeyError, IndexError, pa.ArrowException) as e:
            raise self._damaged(k, row, f"is unreadable ({e})") from None
        shard = _OpenShard(mm, x, cond, (st.st_ino, st.st_size))
        self._open[k] = shard
        while len(self._open) > self.MAX_OPEN:
            self._open.popitem(last=False)
        return shard

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | list[str] | None]:
        """Rows ``idx`` (global row numbers, any order, repeats allowed): samples float32
        ``[n, *sample_shape]`` in the teacher's space (latents as stored; pixels mapped to
        [-1, 1]), and their labels (int64), captions (list of str) or None, in ``idx``'s order."""
        import pyarrow as pa

        want = np.asarray(torch.as_tensor(idx).reshape(-1).cpu(), dtype=np.int64)
        n = len(want)
        if n and (want.min() < 0 or want.max() >= len(self)):
            raise IndexError(f"row out of range 0..{len(self) - 1}")
        shard_of = np.searchsorted(self.starts, want, side="right") - 1
        offset = want - self.starts[shard_of]
        x = np.empty(
            (n, *self.sample_shape), dtype=np.float16 if self.kind == "latents" else np.uint8
        )
        captions: list[str] | None = [""] * n if self.conditioning == "captions" else None
        labels = np.empty(n, dtype=np.int64) if self.conditioning == "labels" else None
        for k in np.unique(shard_of):
            where = np.flatnonzero(shard_of == k)
            shard = self._shard(int(k), int(want[where[0]]))
            off = offset[where]
            x[where] = shard.x[off]
            if captions is not None:
                for i, c in zip(where, shard.cond.take(pa.array(off)).to_pylist(), strict=True):
                    captions[i] = c
            elif labels is not None:
                labels[where] = shard.cond[off]
        out = torch.from_numpy(x).float()
        if self.kind == "pixels":
            out = out / 127.5 - 1  # as _to_unit_range
        if labels is not None:
            return out, torch.from_numpy(labels)
        return out, captions

    def verify(self, shard_ids) -> None:
        """Check the sha256 of these shards against the manifest (streamed: memory stays flat)."""
        from dmdctl.files import sha256_file

        for k in shard_ids:
            entry = self.entries[int(k)]
            path = self._path(int(k))
            try:
                digest = sha256_file(path)
            except OSError as e:
                raise UserError(
                    f"real-data shard {path} is unreadable ({e.strerror or e})"
                ) from None
            if digest != entry["sha256"]:
                raise UserError(
                    f"real-data shard {path} is corrupt (sha256 differs from the manifest); run "
                    "the same `dmdctl prepare-real` command again to remake it"
                )


def open_real_store(path, teacher) -> RealStore:
    """The complete store in ``path`` made for ``teacher`` (its VAE, sample shape and
    conditioning), each shard's size checked; UserError (one line) otherwise."""
    from dmdctl.data.real_store import (
        STORE_FORMAT,
        store_identity,
        store_kind,
        teacher_conditioning,
    )
    from dmdctl.data.shards import MANIFEST, read_manifest

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(
            f"--real-data {folder}: no such store folder (make one with `dmdctl prepare-real`)"
        )
    manifest = read_manifest(folder, STORE_FORMAT, "real-data store")
    if manifest is None:
        raise UserError(
            f"--real-data {folder} has no {MANIFEST}: make the store with `dmdctl prepare-real "
            "SOURCE --out FOLDER` and pass that folder"
        )
    if not manifest.get("complete"):
        n = -(-manifest["records"] // manifest["shard_size"])
        raise UserError(
            f"--real-data {folder} is incomplete ({len(manifest['shards'])} of {n} shards): run "
            "the same `dmdctl prepare-real` command again to finish it"
        )
    kind, _ = store_kind(teacher)
    checks = [
        ("kind", manifest["kind"], kind),
        ("sample shape", list(manifest["sample_shape"]), [int(s) for s in teacher.sample_shape]),
        ("conditioning", manifest["conditioning"], teacher_conditioning(teacher)),
        ("number of classes", manifest["num_classes"], int(teacher.num_classes or 0)),
    ]
    for what, there, here in checks:
        if there != here:
            raise UserError(
                f"--real-data {folder} was made for a teacher with {what} {there}, this teacher "
                f"has {here}: make a store for it with `dmdctl prepare-real`"
            )
    mine = store_identity(teacher)
    for key, value in mine.items():
        there = manifest["identity"].get(key)
        if there != value:
            what = "VAE" if key == "vae_sha256" else f"'{key}'"
            shown = (lambda v: f"{v[:12]}…") if key == "vae_sha256" else repr
            raise UserError(
                f"--real-data {folder} was made with another {what} ({shown(there)} there, "
                f"{shown(value)} for this teacher): make a store for it with `dmdctl prepare-real`"
            )
    store = RealStore(folder, manifest)
    for k, entry in enumerate(store.entries):
        p = store._path(k)
        try:
            size = p.stat().st_size
        except OSError:
            raise UserError(
                f"real-data shard {p} is missing; run the same `dmdctl prepare-real` command "
                "again to remake it"
            ) from None
        if size != entry["bytes"]:
            raise UserError(
                f"real-data shard {p} is {size} bytes, the manifest says {entry['bytes']} "
                "(truncated?); run the same `dmdctl prepare-real` command again to remake it"
            )
    return store
