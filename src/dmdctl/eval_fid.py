"""``dmdctl eval-fid``: Fréchet distance of a generator or the teacher's sampler to reference statistics."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import write_config
from .errors import UserError, require
from .fid import FeatureStats, frechet_distance, load_stats_npz
from .files import sha256_file
from .generator import generate, load_generator, teacher_source
from .make_pairs import pick_device
from .sampling import class_labels
from .teachers import resolve_teacher
from .ui import progress

EVAL_SEED_START = 1_000_000  # far from make-pairs' default seeds: never score the training noise


@dataclass
class EvalFidConfig:
    generator: str | None = None
    teacher: str | None = None
    teacher_path: str | None = None
    steps: int = 18
    num_samples: int = 10000
    seed: int = EVAL_SEED_START
    batch_size: int = 1000
    ref: str | None = None
    json: str | None = None
    grid: str | None = None
    device: str = "auto"

    def validate(self) -> None:
        require(self.num_samples >= 2, f"--num-samples must be at least 2, got {self.num_samples}")
        require(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        require(self.steps > 0, f"--steps must be positive, got {self.steps}")
        require(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        require(
            self.generator is not None or self.teacher_path is not None or self.teacher is not None,
            "nothing to score: pass --generator FILE, or --teacher-path FILE with --steps N",
        )
        require(
            not (self.generator and self.teacher_path),
            "pass either --generator or --teacher-path, not both",
        )


def source_from(cfg) -> object:
    """The source of samples named by a config with generator/teacher/teacher_path/steps."""
    if cfg.generator:
        return load_generator(Path(cfg.generator))
    teacher = resolve_teacher(cfg.teacher, Path(cfg.teacher_path) if cfg.teacher_path else None)
    return teacher_source(teacher, cfg.steps)


def evaluate(cfg: EvalFidConfig, source=None, show_progress: bool = True) -> dict:
    source = source or source_from(cfg)
    kind, tconfig = source.kind, source.config
    if cfg.ref:
        mu_ref, sigma_ref = load_stats_npz(Path(cfg.ref))
        reference = {"path": str(cfg.ref), "sha256": sha256_file(Path(cfg.ref))}
    else:
        ref = kind.reference_stats(tconfig)
        if ref is None:
            raise UserError(
                f"teacher '{kind.name}' has no built-in reference; pass --ref STATS.npz"
            )
        mu_ref, sigma_ref, desc = ref
        reference = {"builtin": desc}
    device = pick_device(cfg.device)
    source.to(device)
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_samples))
    labels = class_labels(seeds, cfg.seed, source.num_classes)
    stats = None
    metrics_samples = []
    t0 = time.perf_counter()
    with progress(transient=True, disable=None if show_progress else True) as bar:
        task = bar.add_task(f"eval {source.description}", total=cfg.num_samples, info="")
        for i in range(0, cfg.num_samples, cfg.batch_size):
            sl = slice(i, i + cfg.batch_size)
            x, _ = generate(source, seeds[sl], cfg.batch_size, labels[sl], device=device)
            f = kind.features(x)
            stats = stats or FeatureStats(f.shape[1])
            stats.update(f)
            metrics_samples.append(x)
            bar.advance(task, x.shape[0])
    gen_seconds = time.perf_counter() - t0
    if stats.dim != mu_ref.shape[0]:
        raise UserError(
            f"reference has {mu_ref.shape[0]}-d statistics but features are {stats.dim}-d"
        )
    result = {
        "fid": frechet_distance(stats.mu, stats.sigma, mu_ref, sigma_ref),
        "num_samples": stats.n,
        "reference": reference,
        "features": kind.feature_name(),
        "source": source.description,
        "nfe": source.nfe,
        "seed_start": cfg.seed,
        "seconds": round(gen_seconds, 2),
    }
    samples = torch.cat(metrics_samples)
    result.update(kind.quality_metrics(tconfig, samples, labels))
    if cfg.grid:
        result["grid"] = str(
            kind.save_plot(
                [(source.description, samples[:100])], Path(cfg.grid), tconfig, labels=labels[:100]
            )
        )
    if cfg.json:
        path = Path(cfg.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        write_config(cfg, path.parent, name=path.stem + ".config.toml")
    return result


def result_rows(result: dict) -> list[tuple[str, object]]:
    ref = result["reference"]
    rows = [
        ("FID", result["fid"]),
        ("samples", result["num_samples"]),
        ("reference", ref.get("path") or ref.get("builtin")),
        ("features", result["features"]),
        ("source", result["source"]),
        ("NFE", result["nfe"]),
    ]
    rows += [(k, v) for k, v in result.items() if k in ("modes_covered", "frac_within_3std")]
    return rows
