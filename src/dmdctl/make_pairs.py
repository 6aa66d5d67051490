"""``dmdctl make-pairs``: run the teacher's deterministic ODE sampler on seeded noise."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import write_config
from .errors import require
from .pairs import DTYPES, PairWriter
from .sampling import class_labels, heun_nfe, heun_sample, karras_sigmas, seeded_noise
from .teachers import resolve_teacher
from .ui import progress


@dataclass
class MakePairsConfig:
    teacher: str | None = None
    teacher_path: str | None = None
    out: str = "runs/pairs"
    num_pairs: int = 4096
    seed: int = 0
    steps: int = 18
    rho: float = 7.0
    shard_size: int = 1024
    batch_size: int = 1024
    dtype: str = "float32"
    device: str = "auto"

    def validate(self) -> None:
        require(self.num_pairs > 0, f"--num-pairs must be positive, got {self.num_pairs}")
        require(self.steps > 0, f"--steps must be positive, got {self.steps}")
        require(self.shard_size > 0, f"--shard-size must be positive, got {self.shard_size}")
        require(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        require(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        require(
            self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"
        )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_pairs(cfg: MakePairsConfig) -> dict:
    teacher = resolve_teacher(cfg.teacher, Path(cfg.teacher_path) if cfg.teacher_path else None)
    device = pick_device(cfg.device)
    sigmas = karras_sigmas(cfg.steps, teacher.sigma_min, teacher.sigma_max, cfg.rho)
    settings = {
        "teacher": {"kind": teacher.name, "sha256": teacher.sha256, "config": teacher.config},
        "sampler": {
            "name": "heun",
            "steps": cfg.steps,
            "nfe": heun_nfe(cfg.steps),
            "sigma_min": teacher.sigma_min,
            "sigma_max": teacher.sigma_max,
            "rho": cfg.rho,
        },
        "seed_start": cfg.seed,
        "num_pairs": cfg.num_pairs,
        "shard_size": cfg.shard_size,
        "dtype": cfg.dtype,
        "sample_shape": list(teacher.sample_shape),
        "num_classes": teacher.num_classes,
    }
    out = Path(cfg.out)
    writer = PairWriter(out, settings)
    write_config(cfg, out)
    denoiser = teacher.denoiser.to(device)
    start = writer.next_shard
    t0 = time.perf_counter()
    made = 0
    with progress() as bar:
        task = bar.add_task(
            "make-pairs",
            total=cfg.num_pairs,
            completed=sum(e["count"] for e in writer.shards),
            info="",
        )
        for index in range(start, writer.num_shards):
            seeds = writer.shard_seeds(index)
            noise = seeded_noise(seeds, teacher.sample_shape)
            cond = class_labels(seeds, cfg.seed, teacher.num_classes)
            targets = []
            for i in range(0, len(seeds), cfg.batch_size):
                z = noise[i : i + cfg.batch_size].to(device)
                c = cond[i : i + cfg.batch_size].to(device) if teacher.num_classes else None
                targets.append(heun_sample(denoiser, z, sigmas, c).cpu())
                bar.advance(task, z.shape[0])
            writer.write_shard(
                index,
                {
                    "noise": noise,
                    "target": torch.cat(targets).to(DTYPES[cfg.dtype]),
                    "cond": cond,
                    "seed": torch.tensor(seeds, dtype=torch.int64),
                },
            )
            made += len(seeds)
            bar.update(task, info=f"shard {index + 1}/{writer.num_shards}")
    elapsed = time.perf_counter() - t0
    return {
        "out": str(out),
        "pairs": cfg.num_pairs,
        "made_now": made,
        "resumed_after_shard": start if start else "-",
        "shards": writer.num_shards,
        "nfe_per_pair": heun_nfe(cfg.steps),
        "pairs_per_s": round(made / elapsed, 1) if made else "-",
    }
