"""``dmdctl export``: the (EMA) generator of a run or checkpoint as one safetensors file, a
diffusers pipeline folder (``--format diffusers``) or a LoRA run's adapters (``--format lora``).

The generator file format is ``dmdctl/generators.py``; the LoRA adapters ``training/lora.py``;
what stock diffusers loads (pipelines, LoRA weights, model cards) ``teachers/sd/generate.py``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dmdctl.commands import show
from dmdctl.errors import UserError
from dmdctl.generators import (
    LORA_META_KEY,
    generator_file_of,
    generator_metadata,
    load_generator,
    read_adapters,
    save_generator,
)
from dmdctl.settings.export import ExportConfig
from dmdctl.teachers import get_kind
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
        return _export_lora(cfg, source, out)
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

    path = generator_file_of(source, cfg.ema)
    if path is not None:
        meta = generator_metadata(path)
        kind_name = meta.get("kind")
        if not get_kind(str(kind_name)).text_to_image:
            raise UserError(
                f"--format diffusers is for Stable Diffusion generators; {path} holds a "
                f"'{kind_name}' generator (use --format safetensors)"
            )
        denoiser, config, sha, sigmas, train_config = _file_generator(path, meta)
        what = str(path)
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
        config, sha, sigmas, train_config = _checkpoint_generator(state, denoiser)
        what = str(ckpt)
    from dmdctl.teachers.sd.generate import PIPELINE_CLASSES, step_scheduler_name, usage_call

    arch = config.get("arch", "sd")
    timesteps = denoiser.step_values(list(sigmas))
    if arch == "wan":  # a video pipeline (teachers/wan/generate.py)
        from dmdctl.teachers.wan import generate as wan

        export_diffusers = wan.export_diffusers
    folder = export_diffusers(
        denoiser.eval(), config, sha, out, cfg.teacher_path, cfg.offline, train_config, timesteps
    )
    steps = "1 step" if len(timesteps) == 1 else f"{len(timesteps)} steps"
    if arch == "wan":
        return {
            "out": str(folder),
            "from": what,
            "format": "diffusers",
            "scheduler": f"{wan.step_scheduler_name(timesteps)} ({steps}, "
            f"t={','.join(f'{t:g}' for t in timesteps)})",
            "usage": f"see {folder / 'README.md'}: WanPipeline.from_pretrained('{folder}')"
            f"(prompt, {wan.usage_call(timesteps, config)})",
        }
    scheduler = step_scheduler_name(arch, timesteps)
    return {
        "out": str(folder),
        "from": what,
        "format": "diffusers",
        "scheduler": f"{scheduler} ({steps}, t={','.join(f'{t:g}' for t in timesteps)})",
        "usage": f"{PIPELINE_CLASSES[arch]}.from_pretrained('{folder}')"
        f"(prompt, {usage_call(timesteps, arch, config)})",
    }


def _file_generator(path: Path, meta: dict):
    """(denoiser, teacher config, teacher sha256, step sigmas, training config) of a generator
    file."""
    gen = load_generator(path)
    train_config = json.loads(meta["train_config"]) if "train_config" in meta else None
    return gen.fn.denoiser, gen.config, meta["teacher_sha256"], gen.fn.sigmas, train_config


def _checkpoint_generator(state: dict, denoiser):
    """(teacher config, teacher sha256, step sigmas, training config) of a checkpoint."""
    sigmas = state.get("generator_sigmas") or [denoiser.sigma_max]
    return state["teacher_config"], state["teacher_sha256"], sigmas, state.get("config")


def _no_adapters(what) -> UserError:
    return UserError(
        f"--format lora: {what} holds no LoRA adapters (a run without --lora-rank); "
        "export it with --format diffusers or safetensors"
    )


def _export_lora(cfg: ExportConfig, source: Path, out: Path) -> dict:
    """The adapters of a LoRA run's generator (its EMA generator file, or a checkpoint) as
    ``pytorch_lora_weights.safetensors`` + README.md (for ``pipe.load_lora_weights``)."""
    from dmdctl.teachers.sd.generate import (
        PIPELINE_CLASSES,
        lora_model_card,
        step_scheduler_name,
        usage_call,
        write_diffusers_lora,
    )

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose another --out")
    path = generator_file_of(source, cfg.ema)
    if path is not None:
        meta = generator_metadata(path)
        if LORA_META_KEY not in meta:
            raise _no_adapters(path)
        spec = lora.LoraSpec.from_meta(json.loads(meta[LORA_META_KEY]))
        adapters = read_adapters(path)
        denoiser, config, sha, sigmas, train_config = _file_generator(path, meta)
        what = str(path)
    else:
        ckpt = _checkpoint_of(source)
        if ckpt is None:
            raise UserError(f"{source} holds no checkpoint (no state.json, no checkpoints/step-*)")
        state, load = load_checkpoint(ckpt)
        if not lora.is_lora_checkpoint(state):
            raise _no_adapters(ckpt)
        spec = lora.LoraSpec.from_meta(state["lora"]["generator"])
        weights = load("ema" if cfg.ema else "generator")
        denoiser = lora.checkpoint_network(state, weights, base=False)
        adapters = lora.adapter_state(denoiser)
        config, sha, sigmas, train_config = _checkpoint_generator(state, denoiser)
        what = str(ckpt)
    timesteps = denoiser.step_values(list(sigmas))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pipeline, arch = str(config.get("pipeline", "")), config.get("arch", "sd")
    if arch == "wan":  # WanPipeline's LoRA writer (teachers/wan/generate.py)
        from dmdctl.teachers.wan import generate as wan

        card = wan.lora_model_card(pipeline, sha, train_config, out, timesteps, spec, config)
        wan.write_diffusers_lora(adapters, spec, tmp, card)
    else:
        card = lora_model_card(pipeline, sha, train_config, out, timesteps, spec, config)
        write_diffusers_lora(adapters, spec, tmp, card, arch)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    if arch == "wan":
        return {
            "out": str(out),
            "from": what,
            "format": "lora",
            "lora": f"rank {spec.rank}, alpha {spec.alpha:g}, {len(adapters)} tensors",
            "usage": f"see {out / 'README.md'}: WanPipeline.from_pretrained('{pipeline}'); "
            f"pipe.load_lora_weights('{out}')",
        }
    scheduler = step_scheduler_name(arch, timesteps)
    return {
        "out": str(out),
        "from": what,
        "format": "lora",
        "lora": f"rank {spec.rank}, alpha {spec.alpha:g}, {len(adapters)} tensors",
        "usage": f"{PIPELINE_CLASSES[arch]}.from_pretrained('{pipeline}'); scheduler {scheduler}; "
        f"pipe.load_lora_weights('{out}'); pipe(prompt, {usage_call(timesteps, arch, config)})",
    }


def run(cfg: ExportConfig) -> int | None:
    """Run the command on resolved settings (its help: :data:`dmdctl.settings.export.HELP`)."""

    show("export", export(cfg))
    return None
