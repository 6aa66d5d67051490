"""``dmdctl export``: the (EMA) generator of a run or checkpoint as one safetensors file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dmdctl.commands import show
from dmdctl.core.generator import load_generator, save_generator
from dmdctl.errors import UserError
from dmdctl.settings.export import ExportConfig
from dmdctl.teachers import GENERATOR_FORMAT, get_kind, read_metadata
from dmdctl.training import lora
from dmdctl.training.checkpoint import (
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint_state,
)


def _checkpoint_of(source: Path) -> Path | None:
    if (source / "state.json").is_file():
        return source
    if list_checkpoints(source / "checkpoints"):
        return find_checkpoint(source, "latest")
    return None


def generator_file_of(source: Path, ema: bool) -> Path | None:
    """The generator file an export reads: ``source`` itself, or a run folder's EMA generator
    (not for a checkpoint folder, which holds its own generator.safetensors, nor for --no-ema,
    which reads the checkpoint). None: export from a checkpoint."""
    if source.is_file():
        return source
    run_file = source / "generator.safetensors"
    if ema and run_file.is_file() and not (source / "state.json").is_file():
        return run_file
    return None


def generator_metadata(path: Path) -> dict:
    """A generator file's metadata (refused in one line when it is not one)."""
    meta = read_metadata(path)
    if meta.get("format") != GENERATOR_FORMAT:
        raise UserError(f"{path} is not a dmdctl generator file")
    return meta


def _from_checkpoint(source: Path, ema: bool, teacher_path=None, offline=False):
    """(checkpoint folder, its state, the generator's denoiser with EMA or raw weights; of a
    LoRA run: the teacher's network with the adapters, training/lora.py)."""
    ckpt = _checkpoint_of(source)
    if ckpt is None:
        raise UserError(f"{source} holds no checkpoint (no state.json, no checkpoints/step-*)")
    state, load = load_checkpoint(ckpt)
    if lora.is_lora_checkpoint(state):
        weights = load("ema" if ema else "generator")
        return ckpt, state, lora.checkpoint_network(state, weights, teacher_path, offline)
    denoiser = get_kind(state["teacher_kind"]).build(state["teacher_config"])
    weights = load("ema" if ema else "generator")
    denoiser.load_state_dict({k: v.to(denoiser.state_dict()[k].dtype) for k, v in weights.items()})
    return ckpt, state, denoiser


def export(cfg: ExportConfig) -> dict:
    source = Path(cfg.source)
    out = Path(cfg.out)
    if not source.exists():
        raise UserError(f"nothing to export at {source}: no such file or folder")
    if cfg.format == "diffusers":
        return _export_diffusers(cfg, source, out)
    if cfg.format == "lora":
        return lora.export(cfg, source, out)
    if source.is_file():
        generator_metadata(source)
        if source.resolve() != out.resolve():
            shutil.copyfile(source, out)
        gen = load_generator(out)
        return {"out": str(out), "from": str(source), "kind": gen.kind.name}
    ckpt, state, denoiser = _from_checkpoint(source, cfg.ema, cfg.teacher_path, cfg.offline)
    kind = get_kind(state["teacher_kind"])
    extra = {}
    if lora.is_lora_checkpoint(state):  # the merged network and the adapters
        denoiser = lora.GeneratorFileState(denoiser)
        extra = lora.file_metadata(lora.LoraSpec.from_meta(state["lora"]["generator"]))
    save_generator(
        denoiser,
        kind.name,
        state["teacher_config"],
        state["teacher_sha256"],
        out,
        extra={
            "step": str(state["step"]),
            "ema": str(cfg.ema).lower(),
            "checkpoint": str(ckpt),
            "train_config": state.get("config", {}),
            **extra,
        },
        sigmas=state.get("generator_sigmas"),
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
    from dmdctl.teachers.sd.generate import export_diffusers

    train_config = None
    path = generator_file_of(source, cfg.ema)
    if path is not None:
        meta = generator_metadata(path)
        kind_name = meta.get("kind")
        if not get_kind(str(kind_name)).text_to_image:
            raise UserError(
                f"--format diffusers is for Stable Diffusion generators; {path} holds a "
                f"'{kind_name}' generator (use --format safetensors)"
            )
        gen = load_generator(path)
        denoiser, config, sha = gen.fn.denoiser, gen.config, meta["teacher_sha256"]
        sigmas = gen.fn.sigmas
        what = str(path)
        if "train_config" in meta:
            train_config = json.loads(meta["train_config"])
    else:
        ckpt = _checkpoint_of(source)
        if (
            ckpt is not None
            and not get_kind(str(read_checkpoint_state(ckpt).get("teacher_kind"))).text_to_image
        ):
            raise UserError(
                f"--format diffusers is for Stable Diffusion generators; {ckpt} is not an SD "
                "run (use --format safetensors)"
            )
        ckpt, state, denoiser = _from_checkpoint(source, cfg.ema, cfg.teacher_path, cfg.offline)
        if lora.is_lora_checkpoint(state):
            denoiser = lora.merged(denoiser)  # a full UNet
        config, sha, what = state["teacher_config"], state["teacher_sha256"], str(ckpt)
        train_config = state.get("config")
        sigmas = state.get("generator_sigmas") or [denoiser.sigma_max]
    from dmdctl.teachers.sd.generate import PIPELINE_CLASSES, step_scheduler_name, usage_call

    arch = config.get("arch", "sd")
    timesteps = denoiser.step_values(list(sigmas))
    folder = export_diffusers(
        denoiser.eval(), config, sha, out, cfg.teacher_path, cfg.offline, train_config, timesteps
    )
    steps = "1 step" if len(timesteps) == 1 else f"{len(timesteps)} steps"
    scheduler = step_scheduler_name(arch, timesteps)
    return {
        "out": str(folder),
        "from": what,
        "format": "diffusers",
        "scheduler": f"{scheduler} ({steps}, t={','.join(f'{t:g}' for t in timesteps)})",
        "usage": f"{PIPELINE_CLASSES[arch]}.from_pretrained('{folder}')"
        f"(prompt, {usage_call(timesteps, arch)})",
    }


def run(cfg: ExportConfig) -> int | None:
    """Run the command on resolved settings (its help: :data:`dmdctl.settings.export.HELP`)."""

    show("export", export(cfg))
    return None
