"""The Stable Diffusion teacher kind (``--teacher sd15``, or any SD1.x/2.x-style pipeline).

Unlike the built-in kinds, the teacher is not a dmdctl file but a diffusers pipeline folder or
hub id; generator files still hold the UNet's weights with the configs needed to rebuild it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .base import TeacherKind


class StableDiffusion(TeacherKind):
    name = "sd"
    default_preset = "sd15"
    default_steps = 50

    def presets(self) -> dict[str, dict]:
        from ..sd.pipeline import SD15_HUB_ID

        # real-score CFG 1.75 and 10 fake-score updates per generator step: DMD2's SD1.5 recipe
        # (its public scripts: lr 1e-5 at batch 2048 on 64 GPUs); pairs: the pipeline's default
        # sampler (PNDM, 50 steps, CFG 7.5) as in DMD (v1)
        return {
            "sd15": {
                "pipeline": SD15_HUB_ID,
                "real_guidance": 1.75,
                "pairs_scheduler": "pndm",
                "pairs_steps": 50,
                "pairs_guidance": 7.5,
                # `dmdctl distill --teacher sd15` defaults (flags and --config override them)
                "distill": {
                    "lr": 1e-5,
                    "fake_lr": 1e-5,
                    "fake_updates": 10,
                    "warmup": 500,
                    "batch_size": 32,
                    "pair_batch_size": 32,
                    "mixed_precision": "bf16",
                    "plot_samples": 16,
                },
            }
        }

    def build(self, config: dict) -> nn.Module:
        from ..sd.pipeline import build_denoiser

        return build_denoiser(config)

    def sample_shape(self, config: dict) -> tuple[int, ...]:
        side = int(config["resolution"]) // int(config["vae_scale"])
        return (int(config["latent_channels"]), side, side)

    def save_plot(self, panels, path: Path, config: dict, labels=None) -> Path:
        """Panels of decoded images in [-1, 1] (callers decode latents with the VAE first)."""
        from ..plots import image_grid_panels

        return image_grid_panels(panels, path, None, per_row=8, scale=1)


def is_sd_name(name: str | None) -> bool:
    from . import get_kind

    return name is not None and get_kind(name).name == StableDiffusion.name
