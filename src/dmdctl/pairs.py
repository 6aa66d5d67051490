"""The pairs store: sharded safetensors of (noise z, teacher ODE output y, condition).

Layout of a pairs folder::

    manifest.json            settings, teacher identity, one entry per complete shard (sha256)
    pairs-00000.safetensors  tensors: noise [n,...] f32, target [n,...], cond [n] i64, seed [n] i64
    ...

Pair ``i`` always comes from seed ``seed_start + i`` (one RNG per seed), and shards hold fixed
seed ranges, so a re-run that finds a manifest continues after the last complete shard and
produces byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError
from .files import atomic_write_bytes, sha256_file

MANIFEST = "manifest.json"
PAIRS_FORMAT = "dmdctl.pairs"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def shard_name(index: int) -> str:
    return f"pairs-{index:05d}.safetensors"


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
    if data.get("format") != PAIRS_FORMAT:
        raise UserError(f"{path} is not a dmdctl pairs manifest")
    return data


class PairWriter:
    """Writes shards in seed order and keeps the manifest in step with what is on disk."""

    def __init__(self, folder: Path, settings: dict):
        self.folder = Path(folder)
        self.settings = settings
        self.folder.mkdir(parents=True, exist_ok=True)
        existing = read_manifest(self.folder)
        if existing is None:
            self.shards: list[dict] = []
        else:
            self._check_same_settings(existing)
            self.shards = existing["shards"]
            for entry in self.shards:
                verify_shard(self.folder, entry)

    def _check_same_settings(self, existing: dict) -> None:
        for key, value in self.settings.items():
            if existing.get(key) != value:
                raise UserError(
                    f"{self.folder} already holds pairs made with a different '{key}' "
                    f"({existing.get(key)!r} there, {value!r} now); use another --out or the same settings"
                )

    @property
    def num_shards(self) -> int:
        s = self.settings
        return -(-s["num_pairs"] // s["shard_size"])

    def shard_seeds(self, index: int) -> list[int]:
        s = self.settings
        first = index * s["shard_size"]
        last = min(first + s["shard_size"], s["num_pairs"])
        return [s["seed_start"] + i for i in range(first, last)]

    @property
    def next_shard(self) -> int:
        return len(self.shards)

    def write_shard(self, index: int, tensors: dict[str, torch.Tensor]) -> dict:
        if index != self.next_shard:
            raise RuntimeError(
                f"shards must be written in order (expected {self.next_shard}, got {index})"
            )
        path = self.folder / shard_name(index)
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
            tmp.replace(path)
        except (OSError, SafetensorError) as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"could not write {path}: {e}") from None
        entry = {
            "file": path.name,
            "first_seed": int(tensors["seed"][0]),
            "count": int(tensors["seed"].numel()),
            "sha256": sha256_file(path),
        }
        self.shards.append(entry)
        self._write_manifest()
        return entry

    def _write_manifest(self) -> None:
        data = {
            "format": PAIRS_FORMAT,
            "version": 1,
            **self.settings,
            "complete": len(self.shards) == self.num_shards,
            "shards": self.shards,
        }
        atomic_write_bytes(self.folder / MANIFEST, (json.dumps(data, indent=2) + "\n").encode())


def verify_shard(folder: Path, entry: dict) -> Path:
    path = Path(folder) / entry["file"]
    if not path.is_file():
        raise UserError(f"pairs shard {path} is listed in the manifest but missing")
    if sha256_file(path) != entry["sha256"]:
        raise UserError(
            f"pairs shard {path} is corrupt or truncated (sha256 differs from the manifest)"
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
    parts: dict[str, list[torch.Tensor]] = {"noise": [], "target": [], "cond": []}
    total = 0
    for entry in manifest["shards"]:
        data = load_file(str(verify_shard(folder, entry)))
        for k in parts:
            parts[k].append(data[k])
        total += entry["count"]
        if limit is not None and total >= limit:
            break
    out = {k: torch.cat(v)[:limit] for k, v in parts.items()}
    return Pairs(out["noise"], out["target"], out["cond"], manifest)
