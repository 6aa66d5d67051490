"""``dmdctl export``: the (EMA) generator of a run or checkpoint as one safetensors file."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import find_checkpoint, list_checkpoints, load_checkpoint
from .denoiser import OneStepGenerator
from .errors import UserError, require
from .generator import load_generator, save_generator
from .teachers import GENERATOR_FORMAT, get_kind, read_metadata


@dataclass
class ExportConfig:
    source: str | None = None
    out: str = "generator.safetensors"
    ema: bool = True
    format: str = "safetensors"

    def validate(self) -> None:
        require(
            self.source is not None,
            "pass the run folder, checkpoint folder or generator file to export",
        )
        require(
            self.format == "safetensors",
            f"--format {self.format!r} is not available for this teacher (available: safetensors)",
        )


def _checkpoint_of(source: Path) -> Path | None:
    if (source / "state.json").is_file():
        return source
    if list_checkpoints(source / "checkpoints"):
        return find_checkpoint(source, "latest")
    return None


def export(cfg: ExportConfig) -> dict:
    source = Path(cfg.source)
    out = Path(cfg.out)
    if not source.exists():
        raise UserError(f"nothing to export at {source}: no such file or folder")
    if source.is_file():
        if read_metadata(source).get("format") != GENERATOR_FORMAT:
            raise UserError(f"{source} is not a dmdctl generator file")
        if source.resolve() != out.resolve():
            shutil.copyfile(source, out)
        gen = load_generator(out)
        return {"out": str(out), "from": str(source), "kind": gen.kind.name}
    ckpt = _checkpoint_of(source)
    if ckpt is None:
        raise UserError(f"{source} holds no checkpoint (no state.json, no checkpoints/step-*)")
    state, load = load_checkpoint(ckpt)
    kind = get_kind(state["teacher_kind"])
    config = state["teacher_config"]
    denoiser = kind.build(config)
    weights = load("ema" if cfg.ema else "generator")
    denoiser.load_state_dict({k: v.to(denoiser.state_dict()[k].dtype) for k, v in weights.items()})
    gen = OneStepGenerator(denoiser, denoiser.sigma_max)
    save_generator(
        gen.denoiser,
        kind.name,
        config,
        state["teacher_sha256"],
        out,
        extra={"step": str(state["step"]), "ema": str(cfg.ema).lower(), "checkpoint": str(ckpt)},
    )
    return {
        "out": str(out),
        "from": str(ckpt),
        "kind": kind.name,
        "step": state["step"],
        "weights": "EMA" if cfg.ema else "raw generator",
    }
