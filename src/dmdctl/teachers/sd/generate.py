"""Text-to-image with a distilled SD generator, and its export as a diffusers pipeline.

``dmdctl sample`` and the exported pipeline compute the same thing: the UNet at the generator's
first timestep (999 by default) on the unscaled noise, the x0 conversion; for a few-step
generator, at each next timestep the x0 estimate renoised with fresh noise (drawn from the same
per-seed RNG, in the same order); then the VAE decoder, ``(x / 2 + 0.5).clamp(0, 1)``. The export
swaps the teacher pipeline's UNet for the distilled one and its scheduler for ``LCMScheduler``,
which run with the generator's timesteps does exactly these steps (its boundary-condition
scalings differ from pure x0 by ~1e-8 at t >= 249).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dmdctl.errors import UserError
from dmdctl.teachers.sd import pipeline as sdp


def pipeline_folder_for(config: dict, teacher_path: str | None, offline: bool) -> Path:
    """The teacher pipeline a generator came from (its VAE, text encoder, tokenizer)."""
    return sdp.resolve_pipeline_folder(str(teacher_path or config["pipeline"]), offline)


@torch.no_grad()
def text_to_image(
    generator: nn.Module,
    folder: Path,
    config: dict,
    prompts: list[str],
    seeds: list[int],
    device,
    batch_size: int = 8,
    progress_cb=None,
) -> torch.Tensor:
    """Images in [0, 1], [N, 3, H, W], float32; prompt i with noise seed i."""
    encoder = sdp.load_text_encoder(folder)
    emb = encoder(prompts, device)
    del encoder
    codec = sdp.VAECodec(sdp.load_vae(folder).to(device), config["scaling_factor"], config)
    side = int(config["resolution"]) // int(config["vae_scale"])
    shape = (int(config["latent_channels"]), side, side)
    generator.to(device)
    out = []
    for i in range(0, len(seeds), batch_size):
        x0 = generator.sample(
            seeds[i : i + batch_size], emb[i : i + batch_size].to(device), shape, device
        )
        out.append((codec.decode(x0) / 2 + 0.5).clamp(0, 1).cpu())
        if progress_cb:
            progress_cb(x0.shape[0])
    return torch.cat(out)


def usage_call(timesteps: list[int]) -> str:
    """How to run an exported pipeline with the generator's own steps."""
    return f"timesteps={timesteps}, guidance_scale=0"


PIPELINE_CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def model_card(
    source: str,
    teacher_sha256: str,
    train_config: dict | None,
    out: Path,
    timesteps: list[int],
    arch: str = "sd",
) -> str:
    cls = PIPELINE_CLASSES[arch]
    cfg = json.dumps(train_config or {}, indent=2, sort_keys=True)
    k = len(timesteps)
    what = "one network evaluation" if k == 1 else f"{k} network evaluations"
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [{"stable-diffusion-xl" if arch == "sdxl" else "stable-diffusion"}, distillation, dmd, {"one-step" if k == 1 else "few-step"}]
---

# {"One" if k == 1 else str(k)}-step text-to-image generator distilled with dmdctl (DMD)

Distilled from `{source}` (pipeline identity sha256 `{teacher_sha256}`) with Distribution
Matching Distillation (Yin et al., CVPR 2024; DMD2, NeurIPS 2024). The UNet maps pure noise to an
image in **{what}**, at timesteps {timesteps}; the scheduler in this folder is `LCMScheduler`,
which at each of these timesteps takes the UNet's x0 prediction and renoises it to the next one.

## Usage

```python
import torch
from diffusers import {cls}

pipe = {cls}.from_pretrained("{out}", torch_dtype=torch.float16).to("cuda")
image = pipe("a photo of a cat", {usage_call(timesteps)}).images[0]
```

Use `guidance_scale=0`: guidance was distilled into the generator (the real score used CFG
during training). `dmdctl sample --generator ...` gives the same images for the same seeds
(`generator=torch.Generator().manual_seed(seed)`, one prompt per call).

## Training configuration

```json
{cfg}
```
"""


def export_diffusers(
    denoiser: nn.Module,
    config: dict,
    teacher_sha256: str,
    out: Path,
    teacher_path: str | None = None,
    offline: bool = False,
    train_config: dict | None = None,
    timesteps: list[int] | None = None,
) -> Path:
    """A folder that stock diffusers loads: the teacher's parts, the distilled UNet, LCMScheduler."""
    import diffusers
    from diffusers import LCMScheduler

    folder = pipeline_folder_for(config, teacher_path, offline)
    if sdp.pipeline_identity(folder) != teacher_sha256:
        raise UserError(
            f"{folder} is not the pipeline this generator was distilled from (its sha256 "
            "differs); pass --teacher-path with the teacher's pipeline"
        )
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose another --out")
    sdp.quiet_loaders()
    try:
        cls = getattr(diffusers, PIPELINE_CLASSES[config.get("arch", "sd")])
        pipe = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the pipeline {folder}: {str(e).splitlines()[0]}") from None
    timesteps = list(timesteps or [int(pipe.scheduler.config.num_train_timesteps) - 1])
    sched = dict(pipe.scheduler.config)
    k = len(timesteps)
    n_train = int(sched.get("num_train_timesteps", 1000))
    if timesteps == [(n_train // k) * i - 1 for i in range(k, 0, -1)]:
        # LCM's own schedule for k steps is exactly these (999/749/499/249 for k=4): then
        # num_inference_steps=k alone runs them
        sched["original_inference_steps"] = k
    pipe.register_modules(unet=denoiser.unet, scheduler=LCMScheduler.from_config(sched))
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "README.md").write_text(
        model_card(
            str(config["pipeline"]),
            teacher_sha256,
            train_config,
            out,
            timesteps,
            config.get("arch", "sd"),
        )
    )
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
