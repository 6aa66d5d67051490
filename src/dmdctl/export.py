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

FORMATS = ("safetensors", "diffusers")


@dataclass
class ExportConfig:
    source: str | None = None
    out: str = "generator.safetensors"
    ema: bool = True
    format: str = "safetensors"
    # --format diffusers: the teacher pipeline to take the VAE/text encoder from (default: the
    # one recorded in the generator)
    teacher_path: str | None = None
    offline: bool = False

    def validate(self) -> None:
        require(
            self.source is not None,
            "pass the run folder, checkpoint folder or generator file to export",
        )
        require(
            self.format in FORMATS,
            f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}",
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
    if cfg.format == "diffusers":
        return _export_diffusers(cfg, source, out)
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


def _export_diffusers(cfg: ExportConfig, source: Path, out: Path) -> dict:
    """Stable Diffusion generators: a pipeline folder stock diffusers loads (see sd/generate.py)."""
    from .sd.generate import export_diffusers

    train_config = None
    # a run folder's generator.safetensors is its EMA generator; --no-ema reads the checkpoint
    if source.is_file() or (cfg.ema and (source / "generator.safetensors").is_file()):
        path = source if source.is_file() else source / "generator.safetensors"
        meta = read_metadata(path)
        if meta.get("format") != GENERATOR_FORMAT:
            raise UserError(f"{path} is not a dmdctl generator file")
        kind_name = meta.get("kind")
        if kind_name != "sd":
            raise UserError(
                f"--format diffusers is for Stable Diffusion generators; {path} holds a "
                f"'{kind_name}' generator (use --format safetensors)"
            )
        gen = load_generator(path)
        denoiser, config, sha = gen.fn.denoiser, gen.config, meta["teacher_sha256"]
        what = str(path)
        run_cfg = (path.parent / "config.toml") if path.parent.is_dir() else None
    else:
        ckpt = _checkpoint_of(source)
        if ckpt is None:
            raise UserError(f"{source} holds no checkpoint (no state.json, no checkpoints/step-*)")
        state, load = load_checkpoint(ckpt)
        if state["teacher_kind"] != "sd":
            raise UserError(
                f"--format diffusers is for Stable Diffusion generators; {ckpt} is a "
                f"'{state['teacher_kind']}' run (use --format safetensors)"
            )
        config = state["teacher_config"]
        denoiser = get_kind("sd").build(config)
        weights = load("ema" if cfg.ema else "generator")
        denoiser.load_state_dict(
            {k: v.to(denoiser.state_dict()[k].dtype) for k, v in weights.items()}
        )
        sha, what = state["teacher_sha256"], str(ckpt)
        train_config = state.get("config")
        run_cfg = None
    if train_config is None and run_cfg is not None and run_cfg.is_file():
        import tomllib

        train_config = tomllib.loads(run_cfg.read_text())
    folder = export_diffusers(
        denoiser.eval(), config, sha, out, cfg.teacher_path, cfg.offline, train_config
    )
    return {
        "out": str(folder),
        "from": what,
        "format": "diffusers",
        "scheduler": "LCMScheduler (1 step, t=999)",
        "usage": f"StableDiffusionPipeline.from_pretrained('{folder}')"
        "(prompt, num_inference_steps=1, guidance_scale=0)",
    }
