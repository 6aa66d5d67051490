"""Text-to-video with a distilled Wan generator, and its export as a diffusers ``WanPipeline``.

``dmdctl sample`` and the exported pipeline compute the same thing: the transformer at the
generator's first time (t = 1 by default) on the unscaled noise, x0 = x_t - t v; for a few-step
generator, at each next time the x0 estimate renoised with fresh noise; then the video VAE
(``latents / (1 / std) + mean``), ``(video / 2 + 0.5).clamp(0, 1)`` as WanPipeline's video
processor does. A one-step export runs with ``FlowMatchEulerDiscreteScheduler`` (its one step
from t = 1 to 0 is x_1 - v); a few-step one with ``FlowMatchLCMScheduler``. Videos are written
as mp4 (imageio with its ffmpeg plugin, the ``video`` extra) and as a PNG strip of frames.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dmdctl.errors import UserError
from dmdctl.teachers.wan import pipeline as wp

STRIP_FRAMES = 8  # frames in a PNG strip (evenly spaced, first and last included)


def check_mp4_writer() -> None:
    """``sample`` writes mp4 files (and ``prepare-real`` reads clips) with imageio's ffmpeg
    plugin: refused before anything is written when it is missing."""
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise UserError(
            "video teachers' videos are written and read as mp4 with imageio and "
            "imageio-ffmpeg, which are not installed: pip install 'dmdctl[video]'"
        ) from None


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``[3, F, H, W]`` in [0, 1] -> ``[F, H, W, 3]`` uint8 (rounded, as PNG files are)."""
    return (video.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def write_mp4(video: torch.Tensor, path: Path, fps: int = wp.FPS) -> Path:
    """One video ``[3, F, H, W]`` in [0, 1] as an H.264 mp4 (ffmpeg through imageio)."""
    import imageio

    frames = to_uint8_frames(video)
    imageio.mimwrite(str(path), list(frames), fps=fps, codec="libx264", macro_block_size=16)
    return Path(path)


def strip_indices(frames: int, n: int = STRIP_FRAMES) -> list[int]:
    """Up to ``n`` evenly spaced frame indices, the first and the last included."""
    if frames <= n:
        return list(range(frames))
    return [round(i * (frames - 1) / (n - 1)) for i in range(n)]


def write_strip(video: torch.Tensor, path: Path) -> list[int]:
    """A PNG of a video's frames side by side (:func:`strip_indices`); returns the indices."""
    from PIL import Image

    frames = to_uint8_frames(video)
    idx = strip_indices(len(frames))
    Image.fromarray(np.concatenate([frames[i] for i in idx], axis=1)).save(path)
    return idx


def save_video_grid(panels, path: Path) -> Path:
    """Sample plots of video teachers: per panel, one row of strip frames per video ``[N, 3, F,
    H, W]`` in [-1, 1] (at most 8 videos)."""
    from dmdctl.plots import image_grid_panels

    rows = []
    for title, x in panels:
        x = x[:8]
        idx = strip_indices(x.shape[2])
        frames = x[:, :, idx].permute(0, 2, 1, 3, 4).reshape(-1, *x.shape[1:2], *x.shape[3:])
        rows.append((title, frames))
    return image_grid_panels(rows, Path(path), None, per_row=len(idx), scale=1)


@torch.no_grad()
def text_to_video_batches(
    generator: nn.Module,
    folder: Path,
    config: dict,
    prompts,
    seeds: list[int],
    device,
    batch_size=1,
):
    """Videos ``[n, 3, frames, H, W]`` in [0, 1], float32, one batch at a time; prompt i
    (``prompts[i]``) with noise seed i."""
    from dmdctl.teachers.sd.generate import decoded_batches

    encoder = wp.WanPromptEncoder(folder, config).to(device)
    codec = wp.WanVAECodec(wp.load_vae(folder).to(device), config)
    shape = wp.latent_shape(config)
    yield from decoded_batches(generator, encoder, codec, shape, prompts, seeds, device, batch_size)


def text_to_video(generator, folder, config, prompts, seeds, device, batch_size=1) -> torch.Tensor:
    """All videos of :func:`text_to_video_batches` at once (for a few videos)."""
    return torch.cat(
        list(text_to_video_batches(generator, folder, config, prompts, seeds, device, batch_size))
    )


# --- export as a diffusers WanPipeline -------------------------------------------------------
def step_scheduler_name(steps: list) -> str:
    """One step at t = 1: FlowMatchEulerDiscreteScheduler (one Euler step from t = 1 to 0 is
    x_1 - v: the generator); a few steps: FlowMatchLCMScheduler (x0 = x_t - t v at each given
    time, renoised to the next)."""
    return "FlowMatchEulerDiscreteScheduler" if list(steps) == [1.0] else "FlowMatchLCMScheduler"


def step_scheduler(steps: list, scheduler_config: dict):
    """(scheduler, its name) for a generator's steps, made from the teacher's config; shift 1,
    so the sigmas a call passes are the generator's t values exactly."""
    import diffusers

    name = step_scheduler_name(steps)
    keep = {"num_train_timesteps": int(scheduler_config.get("num_train_timesteps", 1000))}
    return getattr(diffusers, name)(shift=1.0, **keep), name


def usage_call(steps: list, config: dict) -> str:
    """The pipeline call of a model card (the video size the generator was trained at)."""
    size = f"num_frames={config['num_frames']}, height={config['height']}, width={config['width']}"
    return f"num_inference_steps={len(steps)}, guidance_scale=1.0, {size}"


def set_steps_code(steps: list) -> str:
    """What a few-step export needs before the call: WanPipeline hands its scheduler only the
    number of steps, so the generator's times are bound to ``set_timesteps`` as its sigmas."""
    if list(steps) == [1.0]:
        return ""
    return (
        "pipe.scheduler.set_timesteps = functools.partial(pipe.scheduler.set_timesteps, "
        f"sigmas={list(steps)})\n"
    )


def describe_steps(steps: list, scheduler: str) -> str:
    if list(steps) == [1.0]:
        return (
            f"at t = 1 (pure noise); the scheduler in this folder is `{scheduler}`, whose one "
            "step from t = 1 to 0 is x_1 - v: exactly the generator, so the pipeline gives "
            "`dmdctl sample`'s videos for the same seed"
        )
    return (
        f"at times t = {list(steps)}; the scheduler in this folder is `{scheduler}`: the "
        "transformer's velocity v gives x0 = x_t - t v, renoised to the next time. WanPipeline "
        "passes its scheduler only the number of steps, so the times are bound to "
        "`set_timesteps` as shown; and it does not pass `generator` to the scheduler's step, so "
        "the renoising noise comes from torch's global RNG (seed it with `torch.manual_seed`). "
        "`dmdctl sample` draws that noise from each seed's own generator: the two give "
        "different videos for the same seed, from the same distribution"
    )


def model_card(
    source: str, teacher_sha256: str, train_config, out, steps: list, config: dict, scheduler: str
) -> str:
    cfg = json.dumps(train_config or {}, indent=2, sort_keys=True)
    k = len(steps)
    what = "one network evaluation" if k == 1 else f"{k} network evaluations"
    preset = (train_config or {}).get("teacher")
    named = f"`{source}`" + (f" (dmdctl preset `{preset}`)" if preset not in (None, "wan") else "")
    imports = "import functools\n" if k > 1 else ""
    return f"""---
library_name: diffusers
pipeline_tag: text-to-video
tags: [wan, distillation, dmd, {"one-step" if k == 1 else "few-step"}]
---

# {"One" if k == 1 else str(k)}-step text-to-video generator distilled with dmdctl (DMD)

Distilled from {named} (pipeline identity sha256 `{teacher_sha256}`) with Distribution
Matching Distillation (Yin et al., CVPR 2024; DMD2, NeurIPS 2024). The transformer maps pure
noise to a video in **{what}**, {describe_steps(steps, scheduler)}.

## Usage

```python
{imports}import torch
from diffusers import WanPipeline
from diffusers.utils import export_to_video

pipe = WanPipeline.from_pretrained("{out}", torch_dtype=torch.bfloat16).to("cuda")
{set_steps_code(steps)}video = pipe("a cat walks on the grass", {usage_call(steps, config)}).frames[0]
export_to_video(video, "video.mp4", fps={wp.FPS})
```

Use `guidance_scale=1.0` (no guidance): guidance was distilled into the generator (the real
score used CFG during training). The generator was trained at {config["num_frames"]} frames of
{config["height"]}x{config["width"]}.

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
    steps: list | None = None,
) -> Path:
    """A WanPipeline folder that stock diffusers loads: the teacher's parts, the distilled
    transformer and the scheduler that runs its steps (:func:`step_scheduler`)."""
    from diffusers import WanPipeline

    from dmdctl.teachers.sd.generate import (
        check_export,
        load_pipeline,
        pipeline_folder_for,
        save_pipeline_folder,
    )

    folder = pipeline_folder_for(config, teacher_path, offline)
    out = check_export(folder, wp.pipeline_identity(folder), teacher_sha256, out)
    pipe = load_pipeline(WanPipeline, folder)
    steps = list(steps if steps is not None else denoiser.step_values([denoiser.sigma_max]))
    scheduler, name = step_scheduler(steps, pipe.scheduler.config)
    pipe.register_modules(transformer=denoiser.network, scheduler=scheduler)
    card = model_card(
        str(config["pipeline"]), teacher_sha256, train_config, out, steps, config, name
    )
    return save_pipeline_folder(pipe, card, out)


def lora_model_card(pipeline: str, teacher_sha256: str, train_config, out, steps, spec, config):
    """The README.md of ``export --format lora`` for a Wan run."""
    scheduler = step_scheduler_name(steps)
    cfg = json.dumps(train_config or {}, indent=2, sort_keys=True)
    k = len(steps)
    imports = "import functools\n" if k > 1 else ""
    return f"""---
library_name: diffusers
base_model: {pipeline}
tags: [lora, wan, distillation, dmd, {"one-step" if k == 1 else "few-step"}]
---

# LoRA for a {"one" if k == 1 else str(k)}-step text-to-video generator distilled with dmdctl (DMD)

LoRA adapters (rank {spec.rank}, alpha {spec.alpha:g}) on the transformer of `{pipeline}`
(pipeline identity sha256 `{teacher_sha256}`), trained with Distribution Matching Distillation.
With them the transformer maps pure noise to a video {describe_steps(steps, scheduler)}.

## Usage

```python
{imports}import torch
from diffusers import {scheduler}, WanPipeline

pipe = WanPipeline.from_pretrained("{pipeline}", torch_dtype=torch.bfloat16).to("cuda")
pipe.scheduler = {scheduler}(shift=1.0)
pipe.load_lora_weights("{out}")
{set_steps_code(steps)}video = pipe("a cat walks on the grass", {usage_call(steps, config)}).frames[0]
```

Target modules: {", ".join(spec.targets)}.

## Training configuration

```json
{cfg}
```
"""


def write_diffusers_lora(adapters: dict[str, torch.Tensor], spec, out: Path, card: str) -> None:
    """``out/pytorch_lora_weights.safetensors`` by WanPipeline's own writer, with the LoRA config
    as its metadata (so ``load_lora_weights`` applies alpha/rank), and a README.md."""
    from diffusers import WanPipeline

    WanPipeline.save_lora_weights(
        str(out),
        transformer_lora_layers=adapters,
        transformer_lora_adapter_metadata=spec.peft_config().to_dict(),
        safe_serialization=True,
    )
    (out / "README.md").write_text(card)
