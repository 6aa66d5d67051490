"""The pairs store: sharded safetensors of (noise z, teacher ODE output y, condition).

Layout of a pairs folder::

    manifest.json            settings, teacher identity, one entry per complete shard (sha256)
    pairs-00000.safetensors  tensors: noise [n,...] f32, target [n,...], cond [n] i64, seed [n] i64
    ...
    .progress/               while a run is going: one small record per shard written but not
                             yet in the manifest (gone when the manifest has caught up)

Pair ``i`` always comes from seed ``seed_start + i`` (one RNG per seed), and shards hold fixed
seed ranges, so shards can be made in any order, by any number of processes, and a re-run makes
only the missing ones, producing byte-identical files.

Writing a shard: the tensors go to ``pairs-NNNNN.safetensors.tmp``, renamed when complete; then
a record ``.progress/pairs-NNNNN.json`` (name, seeds, sha256) is written atomically. Only the
main process writes ``manifest.json``: it merges the records (its own after each of its shards,
everybody's at the end, and any left over by a killed run at the start of the next one), with
an atomic rename. A shard file without a record is simply made again. The writing is
:class:`dmdctl.data.shards.ShardWriter`'s, shared with the real-data store.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from dmdctl.data import shards
from dmdctl.data.shards import ShardWriter
from dmdctl.errors import DataError, UserError

MANIFEST = "manifest.json"
PROGRESS = ".progress"
PAIRS_FORMAT = "dmdctl.data.pairs"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD_FILE = re.compile(r"^pairs-(\d+)\.safetensors$")


def shard_name(index: int) -> str:
    return f"pairs-{index:05d}.safetensors"


def shard_index(entry: dict) -> int:
    m = SHARD_FILE.match(entry.get("file", ""))
    if not m:
        raise UserError(f"bad shard entry in the pairs manifest: {entry!r}")
    return int(m.group(1))


def read_manifest(folder: Path) -> dict | None:
    return shards.read_manifest(folder, PAIRS_FORMAT, "pairs")


class PairWriter(ShardWriter):
    """Writes pairs shards (any order, any process) and keeps manifest.json in step with the
    disk (:class:`dmdctl.data.shards.ShardWriter`); shard k holds seeds
    ``seed_start + [k*shard_size, (k+1)*shard_size)``."""

    prefix = "pairs"
    suffix = ".safetensors"
    format = PAIRS_FORMAT
    what = "pairs"
    write_errors = (OSError, SafetensorError)

    def read_manifest(self) -> dict | None:
        return read_manifest(self.folder)

    def verify_shard(self, entry: dict) -> Path:
        return verify_shard(self.folder, entry)

    @property
    def num_shards(self) -> int:
        s = self.settings
        return -(-s["num_pairs"] // s["shard_size"])

    def shard_seeds(self, index: int) -> list[int]:
        s = self.settings
        first = index * s["shard_size"]
        last = min(first + s["shard_size"], s["num_pairs"])
        return [s["seed_start"] + i for i in range(first, last)]

    def entry_fits(self, index: int, entry: dict) -> bool:
        return entry.get("first_seed") == self.shard_seeds(index)[0]

    @property
    def complete_pairs(self) -> int:
        return sum(e["count"] for e in self.shards.values())

    def write_file(self, index: int, tmp: Path, tensors: dict[str, torch.Tensor]) -> dict:
        seeds = tensors["seed"].tolist()
        if seeds != self.shard_seeds(index):
            raise RuntimeError(f"shard {index} must hold seeds {self.shard_seeds(index)[:3]}…")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        return {"first_seed": int(seeds[0]), "count": len(seeds)}


def verify_shard(folder: Path, entry: dict) -> Path:
    return shards.verify_shard(folder, entry, "pairs", "`dmdctl make-pairs` command")


SAFETENSORS_NUMPY = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # viewed as torch.bfloat16 after the gather
    "I64": np.int64,
    "U8": np.uint8,
}
COLUMNS = ("noise", "target", "cond")


def safetensors_layout(path: Path) -> tuple[int, dict]:
    """Where a safetensors file's tensors lie: (offset of the data, the header's entries), read
    from the header alone (the tensors are not touched)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n < 100_000_000:
                raise ValueError("no safetensors header")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(
            f"pairs shard {path} is unreadable or damaged ({e}); run the same "
            "`dmdctl make-pairs` command again to remake it"
        ) from None
    header.pop("__metadata__", None)
    return 8 + n, header


class PairColumn:
    """One tensor of every shard (noise, target or cond), read by row from memory-mapped files:
    ``column[idx]`` gathers only the rows asked for."""

    def __init__(self, pairs: Pairs, name: str):
        self.pairs, self.name = pairs, name
        entry = pairs.layout(0)[name]
        self.dtype = {
            "F32": torch.float32,
            "F16": torch.float16,
            "BF16": torch.bfloat16,
            "I64": torch.int64,
            "U8": torch.uint8,
        }[entry["dtype"]]
        self.shape = (len(pairs), *entry["shape"][1:])
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, slice):
            return self[torch.arange(len(self))[idx]]
        single = isinstance(idx, int) or (torch.is_tensor(idx) and idx.ndim == 0)
        rows = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        out = self.pairs.gather(self.name, rows.numpy())
        return out[0] if single else out

    def tolist(self) -> list:
        return self[:].tolist()


class Pairs:
    """The pairs of a folder, read by row (see :class:`PairColumn`): nothing is loaded when the
    folder is opened but the manifest and each shard's header."""

    def __init__(self, folder: Path, manifest: dict, entries: list[dict], limit: int | None):
        self.folder = Path(folder)
        self.manifest = manifest
        self.entries = entries
        counts = np.array([e["count"] for e in entries], dtype=np.int64)
        self.bounds = np.concatenate([[0], np.cumsum(counts)])
        self.total = int(self.bounds[-1]) if limit is None else min(limit, int(self.bounds[-1]))
        self._layouts: dict[int, tuple[int, dict]] = {}
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self._sizes: dict[int, int] = {}
        self.noise, self.target, self.cond = (PairColumn(self, c) for c in COLUMNS)

    def __len__(self) -> int:
        return self.total

    def layout(self, shard: int) -> dict:
        if shard not in self._layouts:
            path = self.folder / self.entries[shard]["file"]
            self._layouts[shard] = safetensors_layout(path)
        return self._layouts[shard][1]

    def check_sizes(self) -> None:
        """Every shard is there, whole (its size matches its header) and holds the columns."""
        for k, entry in enumerate(self.entries):
            path = self.folder / entry["file"]
            if not path.is_file():
                verify_shard(self.folder, entry)  # says it is missing
            start, header = safetensors_layout(path)
            self._layouts[k] = (start, header)
            end = max(v["data_offsets"][1] for v in header.values())
            self._sizes[k] = start + end
            if path.stat().st_size != start + end or any(c not in header for c in COLUMNS):
                raise UserError(
                    f"pairs shard {path} is corrupt or truncated (its size does not match its "
                    "header); run the same "
                    "`dmdctl make-pairs` command again to remake it"
                )

    def verify(self, shards) -> None:
        """sha256 of these shards against the manifest (streamed: memory flat)."""
        for k in shards:
            verify_shard(self.folder, self.entries[k])

    def _still_whole(self, shard: int) -> None:
        """A shard cut short under a running job is named here: reading its mapped pages past
        the new end would kill the process (SIGBUS) instead."""
        path = self.folder / self.entries[shard]["file"]
        try:
            size = path.stat().st_size
        except OSError as e:
            raise DataError(f"pairs shard {path} became unreadable ({e})") from None
        if shard in self._sizes and size != self._sizes[shard]:
            raise DataError(
                f"pairs shard {path} changed while in use ({size} bytes, {self._sizes[shard]} "
                "when the run started)"
            )

    def _map(self, shard: int, name: str) -> np.ndarray:
        key = (shard, name)
        if key not in self._maps:
            self.layout(shard)
            start, header = self._layouts[shard]
            entry = header[name]
            a, b = entry["data_offsets"]
            shape = tuple(entry["shape"])
            dtype = SAFETENSORS_NUMPY[entry["dtype"]]
            path = self.folder / self.entries[shard]["file"]
            try:
                empty = b == a  # numpy cannot map zero bytes
                self._maps[key] = (
                    np.zeros(shape, dtype)
                    if empty
                    else np.memmap(path, dtype, "r", start + a, shape)
                )
            except (OSError, ValueError) as e:
                raise DataError(f"pairs shard {path} became unreadable ({e})") from None
        return self._maps[key]

    def rows(self, idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise, target, cond) of pairs ``idx``, in that order."""
        rows = np.asarray(idx, dtype=np.int64).reshape(-1)
        return tuple(self.gather(c, rows) for c in COLUMNS)

    def gather(self, name: str, rows: np.ndarray) -> torch.Tensor:
        """Rows ``rows`` of column ``name``, in that order."""
        if len(rows) and (rows.min() < 0 or rows.max() >= self.total):
            raise IndexError(f"pair index out of range 0..{self.total - 1}")
        shard = np.searchsorted(self.bounds, rows, side="right") - 1
        first = self._map(0, name)
        out = np.empty((len(rows), *first.shape[1:]), first.dtype)
        for k in np.unique(shard):
            sel = shard == k
            self._still_whole(int(k))
            try:
                out[sel] = self._map(int(k), name)[rows[sel] - self.bounds[k]]
            except OSError as e:  # a shard cut short under a running job
                path = self.folder / self.entries[int(k)]["file"]
                raise DataError(f"pairs shard {path} became unreadable ({e})") from None
        t = torch.from_numpy(out)
        return t.view(torch.bfloat16) if self.layout(0)[name]["dtype"] == "BF16" else t


def open_pairs(folder: Path, teacher=None, limit: int | None = None) -> Pairs:
    """Open a pairs folder for reading by row: the manifest checked (and, with ``teacher``, that
    it was made by that teacher), every shard's presence and size checked; the sha256 check is
    :meth:`Pairs.verify`, which the processes of a run share."""
    folder = Path(folder)
    if folder.is_file():
        raise UserError(f"--pairs {folder} is a file; pass the folder made by `dmdctl make-pairs`")
    if not folder.is_dir():
        raise UserError(f"pairs folder not found: {folder} (make one with `dmdctl make-pairs`)")
    manifest = read_manifest(folder)
    if manifest is None:
        raise UserError(
            f"{folder} has no {MANIFEST}; is it a pairs folder made by `dmdctl make-pairs`?"
        )
    if not manifest["shards"]:
        raise UserError(
            f"{folder} holds no complete shard yet; run `dmdctl make-pairs` to finish it"
        )
    if teacher is not None:
        mt = manifest["teacher"]
        if mt["kind"] != teacher.name or list(manifest["sample_shape"]) != list(
            teacher.sample_shape
        ):
            raise UserError(
                f"{folder} was made by a '{mt['kind']}' teacher with samples of shape "
                f"{tuple(manifest['sample_shape'])}, not this '{teacher.name}' teacher "
                f"{tuple(teacher.sample_shape)}"
            )
        if mt["sha256"] != teacher.sha256:
            raise UserError(
                f"{folder} was made by a different teacher file (sha256 {mt['sha256'][:12]}…, "
                f"this teacher {teacher.sha256[:12]}…); make pairs with this teacher"
            )
    available = sum(e["count"] for e in manifest["shards"])
    if limit is not None and limit > available:
        raise UserError(
            f"--num-pairs {limit} but {folder} holds only {available} complete pairs; pass "
            f"--num-pairs {available} or less (0 uses all), or make more with `dmdctl make-pairs`"
        )
    entries, total = [], 0
    for entry in sorted(manifest["shards"], key=shard_index):
        entries.append(entry)
        total += entry["count"]
        if limit is not None and total >= limit:
            break
    pairs = Pairs(folder, manifest, entries, limit)
    pairs.check_sizes()
    return pairs


def load_pairs(folder: Path, teacher=None, limit: int | None = None) -> Pairs:
    """Open a pairs folder and check every shard's sha256 (one process; a training run shares
    the check between its processes instead)."""
    pairs = open_pairs(folder, teacher, limit)
    pairs.verify(range(len(pairs.entries)))
    return pairs
