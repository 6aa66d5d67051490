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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dmdctl.data.shards import ShardWriter
from dmdctl.errors import UserError
from dmdctl.files import sha256_file

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
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path} is not valid JSON ({e}); delete the folder and make the pairs again"
        ) from None
    except OSError as e:
        raise UserError(f"{path} is unreadable ({e.strerror or e})") from None
    if not isinstance(data, dict) or data.get("format") != PAIRS_FORMAT:
        raise UserError(f"{path} is not a dmdctl pairs manifest")
    return data


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
    path = Path(folder) / entry["file"]
    if not path.is_file():
        raise UserError(
            f"pairs shard {path} is listed in the manifest but missing; run the same "
            "`dmdctl make-pairs` command again to remake it"
        )
    if sha256_file(path) != entry["sha256"]:
        raise UserError(
            f"pairs shard {path} is corrupt or truncated (sha256 differs from the manifest); "
            "run the same `dmdctl make-pairs` command again to remake it"
        )
    return path


@dataclass
class Pairs:
    """All pairs of a folder in memory (verified against the manifest)."""

    noise: torch.Tensor
    target: torch.Tensor
    cond: torch.Tensor
    manifest: dict

    def __len__(self) -> int:
        return self.noise.shape[0]


def load_pairs(folder: Path, teacher=None, limit: int | None = None) -> Pairs:
    """Load and verify a pairs folder; with ``teacher``, check it was made by that teacher."""
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
    parts: dict[str, list[torch.Tensor]] = {"noise": [], "target": [], "cond": []}
    total = 0
    for entry in sorted(manifest["shards"], key=shard_index):
        data = load_file(str(verify_shard(folder, entry)))
        for k in parts:
            parts[k].append(data[k])
        total += entry["count"]
        if limit is not None and total >= limit:
            break
    out = {k: torch.cat(v)[:limit] for k, v in parts.items()}
    return Pairs(out["noise"], out["target"], out["cond"], manifest)
