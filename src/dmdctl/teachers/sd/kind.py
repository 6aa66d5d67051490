"""The Stable Diffusion teacher kind (``--teacher sd15`` / ``sdxl`` / ``sd3`` / ``flux-dev``, or
any SD1.x/2.x-, SDXL-, SD3- or FLUX.1-style pipeline; the architecture is read from the pipeline,
presets say which they expect).

Unlike the built-in kinds, the teacher is not a dmdctl file but a diffusers pipeline folder or
hub id; generator files still hold the UNet's weights with the configs needed to rebuild it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dmdctl.teachers.base import TeacherKind
from dmdctl.teachers.source import SourceCheckpoint

# The DMD2 checkpoints the presets' lengths come from: iterations from the checkpoint names in
# the model zoos of experiments/sdv1.5/README.md and experiments/sdxl/README.md (tianweiy/DMD2 at
# 8d8fa55), ratios from each script's --dfake_gen_update_ratio (docs/RECIPES.md, "Steps and
# iterations"). Each preset's `steps` is its checkpoint's `steps`.
SOURCES = {
    # ..._dfake10_from_scratch.sh: checkpoint_model_039000
    "sd15": SourceCheckpoint("DMD2's SD1.5 stage-1 checkpoint", 39_000, 10, 9.28),
    # ..._gan1e-3_noode_resume_fixdata.sh, from checkpoint_model_039000 to _041000
    "sd15-gan": SourceCheckpoint(
        "DMD2's SD1.5 stage-2 checkpoint, 2,000 iterations past stage 1", 2_000, 10, 8.35
    ),
    # ..._denoising4step_..._backsim_scratch.sh: checkpoint_model_019000
    "sdxl": SourceCheckpoint("DMD2's SDXL 4-step checkpoint", 19_000, 5, 19.32),
    # ..._backsim_scratch_lora.sh: checkpoint_model_016000
    "sdxl-lora": SourceCheckpoint("DMD2's SDXL 4-step LoRA checkpoint", 16_000, 5, 19.68),
    # ..._cond399_..._1step_..._noode.sh: checkpoint_model_024000 (after the regression stage)
    "sdxl-1step": SourceCheckpoint("DMD2's SDXL 1-step checkpoint", 24_000, 5, 19.01),
    # NVIDIA FastGen, fastgen/configs/experiments/Flux/config_dmd2.py: trainer.max_iter 5000,
    # each iteration one update of either network, the generator's every 5th
    # (student_update_freq): 1,000 generator and 4,000 fake-score updates; no published FID
    "flux-dev": SourceCheckpoint(
        "NVIDIA FastGen's FLUX.1-dev DMD2 config: max_iter 5,000 = 1,000 generator and 4,000 "
        "fake-score updates, no checkpoint or FID published",
        4_000,
        4,
    ),
}


class StableDiffusion(TeacherKind):
    name = "sd"
    default_preset = "sd15"
    default_steps = 50
    text_to_image = True

    # a bare pipeline folder (or `--teacher sd`) gets the default preset's recipe
    default_recipe_applies = True

    def presets(self) -> dict[str, dict]:
        """SD1.5, SDXL, SD3 and FLUX.1 recipes; every value and its source is listed in
        RECIPES.md."""
        from dmdctl.teachers.sd.flux import FLUX_HUB_ID
        from dmdctl.teachers.sd.pipeline import SD3_HUB_ID, SD15_HUB_ID, SDXL_HUB_ID

        # what both recipes share: DMD2's optimiser set-up and DM-loss range, no EMA, and our
        # memory and precision choices
        common = {
            "lr": 1e-5,
            "fake_lr": 1e-5,
            "batch_size": 2048,
            "lr_schedule": "constant",
            "warmup": 0,
            "weight_decay": 0.01,
            "grad_clip": 10.0,
            "min_step_frac": 0.02,
            "max_step_frac": 0.98,
            "ema_decay": 0.0,
            "grad_checkpointing": True,
            "mixed_precision": "bf16",
            "plot_samples": 16,
        }
        # DMD2's public SDXL scripts (experiments/sdxl/): 64 GPUs x batch 2, real CFG 8, TTUR 5,
        # GAN 5e-3 / classifier 1e-2, lr 5e-7; pairs from Euler (trailing), 50 steps, CFG 8
        sdxl = dict(
            common,
            batch_size=128,
            lr=5e-7,
            fake_lr=5e-7,
            reg_weight=0.0,
            real_guidance=8.0,
            fake_updates=5,
            gan_weight=5e-3,
            gan_classifier_weight=1e-2,
        )
        sdxl_pairs = {"scheduler": "euler-trailing", "steps": 50, "guidance": 8.0}
        return {
            # DMD2 (Yin et al. 2024), stage 1 of its public SD1.5 script: no regression, no GAN
            "sd15": {
                "pipeline": SD15_HUB_ID,
                "source": SOURCES["sd15"],
                "distill": dict(
                    common,
                    reg_weight=0.0,
                    real_guidance=1.75,
                    fake_updates=10,
                    steps=SOURCES["sd15"].steps,
                ),
            },
            # DMD2's SD1.5 stage 2: from the stage-1 run (--init-from), the GAN on real images
            # at lr 5e-7 (..._lr5e-7_..._gan1e-3_noode_resume_fixdata.sh)
            "sd15-gan": {
                "pipeline": SD15_HUB_ID,
                "source": SOURCES["sd15-gan"],
                "distill": dict(
                    common,
                    reg_weight=0.0,
                    real_guidance=1.75,
                    fake_updates=10,
                    steps=SOURCES["sd15-gan"].steps,
                    lr=5e-7,
                    fake_lr=5e-7,
                    gan_weight=1e-3,
                    gan_classifier_weight=1e-2,
                ),
            },
            # DMD (Yin et al. 2023), text-to-image: LPIPS regression on pairs made at the real
            # score's own guidance, one fake-score update per generator update
            "sd15-dmd": {
                "pipeline": SD15_HUB_ID,
                "pairs": {"scheduler": "pndm", "steps": 50, "guidance": 3.0},
                "distill": dict(
                    common,
                    reg_loss="lpips",
                    reg_weight=0.25,
                    real_guidance=3.0,
                    fake_updates=1,
                    pair_batch_size=2048,
                ),
            },
            # DMD2's SDXL 4-step generator (..._denoising4step_..._backsim_scratch.sh)
            "sdxl": {
                "pipeline": SDXL_HUB_ID,
                "arch": "sdxl",
                "pairs": sdxl_pairs,
                "source": SOURCES["sdxl"],
                "distill": dict(
                    sdxl, denoising_steps="999,749,499,249", steps=SOURCES["sdxl"].steps
                ),
            },
            # DMD2's SDXL 4-step LoRA generator (..._backsim_scratch_lora.sh: --generator_lora,
            # lr 5e-5; rank 64, alpha 8 from train_sd.py's defaults); the fake score is full
            "sdxl-lora": {
                "pipeline": SDXL_HUB_ID,
                "arch": "sdxl",
                "pairs": sdxl_pairs,
                "source": SOURCES["sdxl-lora"],
                "distill": dict(
                    sdxl,
                    denoising_steps="999,749,499,249",
                    steps=SOURCES["sdxl-lora"].steps,
                    lr=5e-5,
                    fake_lr=5e-5,
                    lora_rank=64,
                    lora_alpha=8.0,
                ),
            },
            # SD3 medium (flow matching): no public DMD recipe was found; DMD2's SDXL values, the
            # pipeline's own CFG and sampler, 4 steps at the shift-3 images of 1/.75/.5/.25 (ours)
            "sd3": {
                "pipeline": SD3_HUB_ID,
                "arch": "sd3",
                "pairs": {"scheduler": "flow-euler", "steps": 28, "guidance": 7.0},
                "distill": dict(
                    sdxl,
                    real_guidance=7.0,
                    gan_weight=0.0,
                    denoising_steps="1,0.9,0.75,0.5",
                ),
            },
            # DMD2's SDXL 1-step generator at conditioning timestep 399, from a generator
            # pretrained by regression on pairs (..._cond399_..._1step_..._noode.sh)
            "sdxl-1step": {
                "pipeline": SDXL_HUB_ID,
                "arch": "sdxl",
                "pairs": sdxl_pairs,
                "source": SOURCES["sdxl-1step"],
                "distill": dict(sdxl, conditioning_timestep=399, steps=SOURCES["sdxl-1step"].steps),
            },
            # FLUX.1-dev, 4 steps: NVIDIA FastGen's FLUX DMD2 config
            # (fastgen/configs/experiments/Flux/config_dmd2.py) where dmdctl has the setting:
            # lr 1e-5 for both networks, the guidance input 3.5 on all three networks, 4 student
            # steps, 4 fake updates per generator update (student_update_freq 5), 5000
            # iterations = 1000 generator updates, the GAN at 0.03, bf16; the rest ours
            "flux-dev": {
                "pipeline": FLUX_HUB_ID,
                "arch": "flux",
                "pairs": {"scheduler": "flow-euler", "steps": 28, "guidance": 3.5},
                "source": SOURCES["flux-dev"],
                "distill": dict(
                    common,
                    batch_size=16,
                    reg_weight=0.0,
                    real_guidance=3.5,
                    fake_updates=4,
                    steps=SOURCES["flux-dev"].steps,
                    denoising_steps="1,0.75,0.5,0.25",
                    gan_weight=3e-2,
                    gan_classifier_weight=1e-2,
                ),
            },
        }

    def preset_arch(self, name: str) -> str:
        """The pipeline architecture a preset is written for ("sd", "sdxl", "sd3" or "flux")."""
        return self.presets().get(name, {}).get("arch", "sd")

    def default_preset_for(self, config: dict) -> str:
        arch = config.get("arch")
        return {"sdxl": "sdxl", "sd3": "sd3", "flux": "flux-dev"}.get(arch, self.default_preset)

    def build(self, config: dict) -> nn.Module:
        from dmdctl.teachers.sd.pipeline import build_denoiser

        return build_denoiser(config)

    def sample_shape(self, config: dict) -> tuple[int, ...]:
        side = int(config["resolution"]) // int(config["vae_scale"])
        return (int(config["latent_channels"]), side, side)

    def save_plot(self, panels, path: Path, config: dict, labels=None) -> Path:
        """Panels of decoded images in [-1, 1] (callers decode latents with the VAE first)."""
        from dmdctl.plots import image_grid_panels

        return image_grid_panels(panels, path, None, per_row=8, scale=1)
