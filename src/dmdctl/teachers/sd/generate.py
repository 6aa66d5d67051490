"""Text-to-image with a distilled one-step SD generator, and its export as a diffusers pipeline.

``dmdctl sample`` and the exported pipeline compute the same thing: the UNet at t = T-1 on the
unscaled noise, the x0 conversion, the VAE decoder, ``(x / 2 + 0.5).clamp(0, 1)``. The export swaps
the teacher pipeline's UNet for the distilled one and its scheduler for ``LCMScheduler``, which
with one inference step runs t = 999 and returns (to ~1e-9) the x0 prediction.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dmdctl.core.sampling import seeded_noise
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
    tok, enc = sdp.load_text_encoder(folder)
    emb = sdp.encode_prompts(tok, enc, prompts, device)
    del enc
    codec = sdp.VAECodec(sdp.load_vae(folder).to(device), config["scaling_factor"])
    side = int(config["resolution"]) // int(config["vae_scale"])
    shape = (int(config["latent_channels"]), side, side)
    generator.to(device)
    out = []
    for i in range(0, len(seeds), batch_size):
        z = seeded_noise(seeds[i : i + batch_size], shape, device)
        x0 = generator(z, emb[i : i + batch_size].to(device))
        out.append((codec.decode(x0) / 2 + 0.5).clamp(0, 1).cpu())
        if progress_cb:
            progress_cb(z.shape[0])
    return torch.cat(out)


def model_card(source: str, teacher_sha256: str, train_config: dict | None, out: Path) -> str:
    cfg = json.dumps(train_config or {}, indent=2, sort_keys=True)
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [stable-diffusion, distillation, dmd, one-step]
---

# One-step text-to-image generator distilled with dmdctl (DMD)

Distilled from `{source}` (pipeline identity sha256 `{teacher_sha256}`) with Distribution
Matching Distillation (Yin et al., CVPR 2024). The UNet maps pure noise to an image in
**one network evaluation**; the scheduler in this folder is `LCMScheduler`, which with one
inference step runs the UNet at t=999 and returns its x0 prediction.

## Usage

```python
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{out}", torch_dtype=torch.float16).to("cuda")
image = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=0).images[0]
```

Use `guidance_scale=0`: guidance was distilled into the generator (the real score used CFG
during training). `dmdctl sample --generator ...` gives the same images for the same noise.

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
) -> Path:
    """A folder that stock diffusers loads: the teacher's parts, the distilled UNet, LCMScheduler."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

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
        pipe = StableDiffusionPipeline.from_pretrained(
            folder, use_safetensors=True, local_files_only=True
        )
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the pipeline {folder}: {str(e).splitlines()[0]}") from None
    pipe.register_modules(
        unet=denoiser.unet, scheduler=LCMScheduler.from_config(pipe.scheduler.config)
    )
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "README.md").write_text(
        model_card(str(config["pipeline"]), teacher_sha256, train_config, out)
    )
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
