"""The generator file format, and the sources of samples (a generator or the teacher's sampler).

A generator file is a safetensors state dict of the generator's denoiser with metadata
``format = dmdctl.generator``, the teacher ``kind``, its ``config`` (JSON), ``sigma_max`` (the
first step's noise level) and, for a few-step generator, ``denoising_sigmas`` (JSON list of its
steps' levels): loadable with ``safetensors.torch.load_file`` alone, and by every dmdctl command.

A LoRA run's file holds the merged network and, besides, the adapter tensors (keys under
:data:`ADAPTER_PREFIX`, peft's layout) with the LoRA config in the metadata under
:data:`LORA_META_KEY` (what ``export --format lora`` writes out); the loaders leave the adapter
tensors out. The adapters themselves are made and trained in ``training/lora.py``.

This module sits above the teachers (a file names its teacher kind) and below training, metrics
and the commands, which all read or write generator files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dmdctl.core.denoiser import StepGenerator
from dmdctl.core.sampling import class_labels, heun_nfe, seeded_noise_draws, teacher_sampler
from dmdctl.errors import UserError
from dmdctl.teachers import (
    GENERATOR_FORMAT,
    build_network,
    load_state,
    read_metadata,
    resolve_teacher,
    save_network,
)
from dmdctl.teachers.base import OfKind, Teacher, TeacherKind

# a LoRA run's generator file: the adapter tensors' keys start with this (the loaders drop them)
ADAPTER_PREFIX = "lora_adapter."
LORA_META_KEY = "lora"  # its metadata: {"rank", "alpha", "targets"} as JSON


def without_adapters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A generator file's network weights (its adapter tensors left out)."""
    return {k: v for k, v in state.items() if not k.startswith(ADAPTER_PREFIX)}


def read_adapters(path: Path) -> dict[str, torch.Tensor]:
    """A LoRA run's adapter tensors in a generator file (keys relative to the network)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {
            k[len(ADAPTER_PREFIX) :]: f.get_tensor(k)
            for k in f.keys()
            if k.startswith(ADAPTER_PREFIX)
        }


def generator_metadata(path: Path) -> dict:
    """A generator file's metadata (refused in one line when it is not one)."""
    meta = read_metadata(path)
    if meta.get("format") != GENERATOR_FORMAT:
        raise UserError(f"{path} is not a dmdctl generator file")
    return meta


def load_generator_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, the network's weights) of a generator file, its adapter tensors left out."""
    meta, state = load_state(path, GENERATOR_FORMAT)
    return meta, without_adapters(state)


def generator_file_of(source: Path, ema: bool) -> Path | None:
    """The generator file an export reads: ``source`` itself, or a run folder's EMA generator
    (not for a checkpoint folder, which holds its own generator.safetensors, nor for --no-ema,
    which reads the checkpoint). None: read the checkpoint."""
    if source.is_file():
        return source
    run_file = source / "generator.safetensors"
    if ema and run_file.is_file() and not (source / "state.json").is_file():
        return run_file
    return None


def save_generator(
    denoiser: nn.Module,
    kind: str,
    config: dict,
    teacher_sha256: str,
    path: Path,
    extra: dict | None = None,
    sigmas: list[float] | None = None,
) -> Path:
    """``sigmas``: the generator's steps (default: one step at the denoiser's sigma_max)."""
    sigmas = [float(s) for s in (sigmas or [denoiser.sigma_max])]
    meta = {"sigma_max": repr(sigmas[0]), "teacher_sha256": teacher_sha256}
    if len(sigmas) > 1 or sigmas[0] != float(denoiser.sigma_max):
        meta["denoising_sigmas"] = json.dumps(sigmas)
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
        if self.decodes:
            self.codec.vae.to(device)
        return self

    @property
    def codec(self):
        return self.kind.codec_for(self.config)

    @property
    def decodes(self) -> bool:
        """Whether samples come out as images decoded from the network's latents (EDM2's
        ImageNet-512; text-to-image kinds decode through their own pipelines)."""
        return bool(getattr(self.codec, "latent", False)) and not self.kind.text_to_image

    @property
    def draws(self) -> int:
        """Noise draws per sample: 1, or a few-step generator's steps (its renoising)."""
        return int(getattr(self.fn, "num_steps", 1))

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, cond=None, noise=None) -> torch.Tensor:
        """Samples for noise ``z``: images in [-1, 1] for a latent kind (decoded), else what
        the network makes."""
        if noise is not None and len(noise):
            x = self.fn(z, cond, noise)
        else:
            x = self.fn(z, cond)
        return self.codec.decode(x) if self.decodes else x


def teacher_source(teacher: Teacher, steps: int) -> Source:
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    return Source(
        teacher.kind,
        teacher.config,
        f"teacher {teacher.name} Heun {steps} steps",
        heun_nfe(steps),
        teacher_sampler(teacher.denoiser, steps),
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
    meta, kind, config, denoiser = build_network(path, *load_generator_state(path))
    sigmas = json.loads(meta.get("denoising_sigmas") or "null") or [float(meta["sigma_max"])]
    gen = StepGenerator(denoiser, sigmas).eval().requires_grad_(False)
    steps = f", {len(sigmas)} steps" if len(sigmas) > 1 else ""
    return Source(kind, config, f"generator {path.name}{steps}", len(sigmas), gen)


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
        noise = seeded_noise_draws(
            seeds[i : i + batch_size], source.sample_shape, source.draws, device
        )
        z = noise[0]
        c = labels[i : i + batch_size].to(device) if source.num_classes else None
        out.append(source(z, c, noise[1:]).float().cpu())
        if progress_cb:
            progress_cb(z.shape[0])
    return torch.cat(out), labels


def guided_teacher(teacher: Teacher, guide_path, scale: float, mode: str = "auto") -> Teacher:
    """An EDM2 teacher whose denoiser is guided by the teacher file ``guide_path`` at ``scale``,
    ``D_g + w (D - D_g)``: what EDM2's sampler runs (``sample`` / ``eval-fid`` of the teacher)."""
    from dataclasses import replace

    from dmdctl.teachers import load_teacher
    from dmdctl.teachers.edm2.kind import GuidedEDM2, guide_mode

    if teacher.kind.name != "edm2":
        raise UserError(f"--guide-net is for EDM2 teachers, not '{teacher.name}'")
    guide = load_teacher(Path(guide_path), expected="edm2")
    conditional = guide_mode(teacher.config, guide.config, mode, guide_path)
    den = GuidedEDM2(teacher.denoiser, guide.denoiser, scale, conditional).eval()
    return replace(teacher, denoiser=den)


def source_from(cfg) -> object:
    """The source of samples named by a config with generator/teacher/teacher_path/steps (and,
    for EDM2 teachers, guide_net/guide_mode/guidance: the guided sampler EDM2 publishes)."""
    if cfg.generator:
        return load_generator(Path(cfg.generator))
    teacher = resolve_teacher(cfg.teacher, Path(cfg.teacher_path) if cfg.teacher_path else None)
    guide = getattr(cfg, "guide_net", None)
    if guide is None:
        return teacher_source(teacher, cfg.steps)
    scale = float(cfg.guidance)
    source = teacher_source(guided_teacher(teacher, guide, scale, cfg.guide_mode), cfg.steps)
    source.description += f", guidance {scale:g} by {Path(guide).name}"
    return source
