"""Real samples for DMD2's GAN (``distill --real-data``), drawn each step with the step's RNG.

Sources: the built-in teachers' own training data (the default for toy2d and digits), or a
store made once by ``dmdctl prepare-real`` from an image folder (with ``captions.jsonl`` for
text-to-image teachers), an ADM/EDM-style ``.npz`` or Parquet files. A step draws row indices
for the global batch, keeps its process's share, and reads only those rows.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dmdctl.errors import DataError, UserError

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
            f"{self.num_shards} shard{'s' if self.num_shards != 1 else ''})"
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

    def _damaged(self, k: int, row: int, why: str) -> DataError:
        return DataError(
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
            out = out / 127.5 - 1  # as real_store.to_unit_range
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
        ("samples in", manifest["kind"], kind),
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
