"""Generator files and the sources of samples (a one-step generator or the teacher's sampler).

A generator file is a safetensors state dict of the generator's denoiser with metadata
``format = dmdctl.generator``, the teacher ``kind``, its ``config`` (JSON) and ``sigma_max``:
loadable with ``safetensors.torch.load_file`` alone, and by every dmdctl command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dmdctl.core.denoiser import OneStepGenerator
from dmdctl.core.sampling import HeunSampler, class_labels, heun_nfe, seeded_noise
from dmdctl.errors import UserError
from dmdctl.teachers import (
    GENERATOR_FORMAT,
    OfKind,
    Teacher,
    load_network,
    resolve_teacher,
    save_network,
)
from dmdctl.teachers.base import TeacherKind


def save_generator(
    denoiser: nn.Module,
    kind: str,
    config: dict,
    teacher_sha256: str,
    path: Path,
    extra: dict | None = None,
) -> Path:
    meta = {"sigma_max": repr(float(denoiser.sigma_max)), "teacher_sha256": teacher_sha256}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
    return save_network(denoiser, GENERATOR_FORMAT, kind, config, path, meta)


@dataclass
class Source(OfKind):
    """Something that turns noise (and labels) into samples, with a name and an NFE count."""

    kind: TeacherKind
    config: dict
    description: str
    nfe: int
    fn: object

    def to(self, device) -> Source:
        if isinstance(self.fn, nn.Module):
            self.fn.to(device)
        else:
            self.fn.denoiser.to(device)
        return self

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        return self.fn(z, cond)


def teacher_source(teacher: Teacher, steps: int) -> Source:
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    return Source(
        teacher.kind,
        teacher.config,
        f"teacher {teacher.name} Heun {steps} steps",
        heun_nfe(steps),
        HeunSampler(teacher.denoiser, steps),
    )


def load_generator(path: Path) -> Source:
    path = Path(path)
    if path.is_dir():
        # a distill run folder: its exported EMA generator
        candidate = path / "generator.safetensors"
        if not candidate.is_file():
            raise UserError(
                f"{path} has no generator.safetensors; pass a generator file "
                "(`dmdctl export RUN -o gen.safetensors`)"
            )
        path = candidate
    meta, kind, config, denoiser = load_network(path, GENERATOR_FORMAT)
    gen = OneStepGenerator(denoiser, float(meta["sigma_max"])).eval().requires_grad_(False)
    return Source(kind, config, f"generator {path.name}", 1, gen)


@torch.no_grad()
def generate(
    source: Source,
    seeds: list[int],
    batch_size: int = 1000,
    labels: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress_cb=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples for the given seeds (one RNG per seed) and labels (balanced by default)."""
    if labels is None:
        labels = class_labels(list(seeds), seeds[0] if len(seeds) else 0, source.num_classes)
    out = []
    for i in range(0, len(seeds), batch_size):
        z = seeded_noise(seeds[i : i + batch_size], source.sample_shape, device)
        c = labels[i : i + batch_size].to(device) if source.num_classes else None
        out.append(source(z, c).float().cpu())
        if progress_cb:
            progress_cb(z.shape[0])
    return torch.cat(out), labels


def source_from(cfg) -> object:
    """The source of samples named by a config with generator/teacher/teacher_path/steps."""
    if cfg.generator:
        return load_generator(Path(cfg.generator))
    teacher = resolve_teacher(cfg.teacher, Path(cfg.teacher_path) if cfg.teacher_path else None)
    return teacher_source(teacher, cfg.steps)
