"""The Wan 2.1 text-to-video teacher kind (``--teacher wan-t2v-1.3b``, or any ``WanPipeline``
folder given as ``--teacher-path``).

Like the Stable Diffusion kind, the teacher is a diffusers pipeline folder or hub id, and
generator files hold the transformer's weights with the configs needed to rebuild it. Samples
are 5-D latents ``[C, F, H, W]``; decoded, videos ``[3, frames, H, W]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from dmdctl.teachers.base import TeacherKind
from dmdctl.teachers.sd.teacher import PipelineTeacher


class Wan(TeacherKind):
    name = "wan"
    default_preset = "wan-t2v-1.3b"
    default_steps = 50  # WanPipeline's num_inference_steps
    text_to_image = True  # conditioned on prompts (the videos are text-to-video)
    video = True
    default_recipe_applies = True

    def presets(self) -> dict[str, dict]:
        """Wan 2.1 T2V 1.3B; every value and its source is listed in docs/RECIPES.md."""
        from dmdctl.teachers.wan.pipeline import WAN_T2V_13B_HUB_ID

        return {
            # CausVid's bidirectional DMD on Wan 2.1 T2V 1.3B (tianweiy/CausVid,
            # configs/wan_bidirectional_dmd.yaml: 3 steps 1000/757/522, timestep shift 8, real
            # CFG 3.5 with Wan's negative prompt, lr 2e-6, 5 critic updates per generator
            # update; 64 GPUs x batch 1 in its README); FastVideo's Wan 1.3B DMD script has the
            # same DMD values
            "wan-t2v-1.3b": {
                "pipeline": WAN_T2V_13B_HUB_ID,
                "pairs": {"scheduler": "unipc", "steps": 50, "guidance": 3.5},
                "distill": {
                    "denoising_steps": "1,0.757,0.522",
                    "flow_shift": 8.0,
                    "real_guidance": 3.5,
                    "lr": 2e-6,
                    "fake_lr": 2e-6,
                    "fake_updates": 5,
                    "batch_size": 64,
                    "reg_weight": 0.0,
                    "gan_weight": 0.0,
                    "lr_schedule": "constant",
                    "warmup": 0,
                    "weight_decay": 0.01,
                    "grad_clip": 10.0,
                    "min_step_frac": 0.02,
                    "max_step_frac": 0.98,
                    "ema_decay": 0.0,
                    "grad_checkpointing": True,
                    "mixed_precision": "bf16",
                    "plot_samples": 4,
                },
            },
        }

    def build(self, config: dict) -> nn.Module:
        from dmdctl.teachers.wan.pipeline import build_denoiser

        return build_denoiser(config)

    def sample_shape(self, config: dict) -> tuple[int, ...]:
        from dmdctl.teachers.wan.pipeline import latent_shape

        return latent_shape(config)

    def save_plot(self, panels, path: Path, config: dict, labels=None) -> Path:
        """Decoded videos ``[N, 3, frames, H, W]`` in [-1, 1]: one row of frames per video."""
        from dmdctl.teachers.wan.generate import save_video_grid

        return save_video_grid(panels, path)


@dataclass
class WanTeacher(PipelineTeacher):
    """A diffusers ``WanPipeline`` as a teacher (5-D latents, UMT5 prompt embeddings)."""

    @property
    def codec(self):
        """The video VAE, loaded on first use."""
        if self._codec is None:
            from dmdctl.teachers.wan.pipeline import WanVAECodec, load_vae

            self._codec = WanVAECodec(load_vae(self.folder), self.config)
        return self._codec

    def text_encoder(self):
        from dmdctl.teachers.wan.pipeline import WanPromptEncoder

        return WanPromptEncoder(self.folder, self.config)


def load_wan_teacher(
    source: str, kind: Wan, offline: bool = False, video_size: str | None = None
) -> WanTeacher:
    """A WanPipeline folder or hub id as a teacher of ``kind`` (the registry's Wan kind), at the
    video size ``video_size`` (FRAMESxHEIGHTxWIDTH; WanPipeline's default when None)."""
    from dmdctl.errors import UserError
    from dmdctl.teachers.sd.pipeline import resolve_pipeline_folder
    from dmdctl.teachers.wan import pipeline as wp

    folder = resolve_pipeline_folder(str(source), offline)
    if not wp.is_wan_folder(folder):
        raise UserError(
            f"{source} is not a Wan pipeline (its transformer is not {wp.WAN_TRANSFORMER}); "
            "--teacher wan-t2v-1.3b takes a WanPipeline folder or hub id"
        )
    if Path(source).expanduser().exists():  # recorded resolved: sample and export work anywhere
        source = str(Path(source).expanduser().resolve())
    config = wp.wan_config(folder, str(source), video_size)
    sha = wp.pipeline_identity(folder)
    denoiser = wp.build_denoiser(config, wp.load_transformer(folder))
    denoiser.eval().requires_grad_(False)
    return WanTeacher(kind, config, denoiser, None, sha, folder=folder, source=str(source))
