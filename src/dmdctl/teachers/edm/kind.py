"""NVlabs EDM teachers (``--teacher edm``): ADM and DDPM++/NCSN++ networks with EDM preconditioning.

A teacher file comes from ``dmdctl convert-edm CKPT.pkl -o teacher.safetensors``, which reads the
published pickle as data (see :mod:`dmdctl.teachers.edm.pickle_loader`); its config holds the network's
init arguments. The presets describe the two published class-conditional teachers the DMD
papers distil, with the papers' sampler and training settings next to them (``recipe``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dmdctl.core.denoiser import EDMPrecond
from dmdctl.teachers.base import TeacherKind
from dmdctl.teachers.source import SourceCheckpoint

EDM_RANGE = {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}

IMAGENET64 = {
    "architecture": "DhariwalUNet",
    "img_resolution": 64,
    "img_channels": 3,
    "label_dim": 1000,
    "model_kwargs": {
        "model_channels": 192,
        "channel_mult": [1, 2, 3, 4],
        "channel_mult_emb": 4,
        "num_blocks": 3,
        "attn_resolutions": [32, 16, 8],
        "dropout": 0.0,
    },
    **EDM_RANGE,
}

CIFAR10 = {
    "architecture": "SongUNet",
    "img_resolution": 32,
    "img_channels": 3,
    "label_dim": 10,
    "model_kwargs": {
        "augment_dim": 9,
        "model_channels": 128,
        "channel_mult": [2, 2, 2],
        "channel_mult_emb": 4,
        "num_blocks": 4,
        "attn_resolutions": [16],
        "dropout": 0.0,
        "embedding_type": "positional",
        "channel_mult_noise": 1,
        "encoder_type": "standard",
        "decoder_type": "standard",
        "resample_filter": [1, 1],
    },
    **EDM_RANGE,
}

# The DMD2 checkpoints the ImageNet presets' lengths come from: iterations from the checkpoint
# names in experiments/imagenet/README.md's model zoo (tianweiy/DMD2 at 8d8fa55; its "Iters"
# column rounds them to 410k and 200k), ratio 5 from each script's --dfake_gen_update_ratio
# (docs/RECIPES.md, "Steps and iterations"). Each preset's `steps` is its checkpoint's `steps`.
SOURCES = {
    # imagenet_lr2e-6_scratch.sh: checkpoint_model_405500
    "edm-imagenet64": SourceCheckpoint(
        "DMD2's ImageNet-64 checkpoint without GAN", 405_500, 5, 2.61
    ),
    # imagenet_gan_classifier_genloss3e-3_diffusion1000_lr2e-6_scratch.sh: checkpoint_model_193500
    "edm-imagenet64-gan": SourceCheckpoint(
        "DMD2's ImageNet-64 GAN checkpoint from scratch", 193_500, 5, 1.51
    ),
}
# not a preset: ..._lr5e-7_resume.sh continues the no-GAN checkpoint (405,500) with the GAN at
# lr 5e-7 to checkpoint_model_548000, FID 1.28 (docs/RECIPES.md: --init-from with --steps 28500)
GAN_RESUMED = SourceCheckpoint(
    "DMD2's ImageNet-64 GAN checkpoint resumed at lr 5e-7", 142_500, 5, 1.28
)

# DMD2's ImageNet-64 run without GAN (the public script imagenet_lr2e-6_scratch.sh; sources of
# every value in docs/RECIPES.md): the edm-imagenet64 recipe, and the one the EDM2 presets apply
DMD2_IMAGENET64 = {
    "reg_weight": 0.0,
    "lr": 2e-6,
    "fake_lr": 2e-6,
    "batch_size": 280,
    "fake_updates": 5,
    "weight_decay": 0.01,
    "lr_schedule": "constant",
    "warmup": 14,
    "grad_clip": 10.0,
    "min_step_frac": 0.02,
    "max_step_frac": 0.98,
    "ema_decay": 0.0,
    "mixed_precision": "bf16",
}

# The papers' settings; every FID names its source. "dmdctl" marks our own choices.
RECIPES = {
    "edm-imagenet64": {
        "checkpoint": "edm-imagenet-64x64-cond-adm.pkl (NVlabs EDM)",
        "parameters": 295_899_267,
        "pairs_sampler": "Heun, N=40 steps (79 NFE), sigma 0.002..80, rho 7 (DMD paper)",
        "teacher_fid": "1.36 with EDM's stochastic sampler, 256 steps / 511 NFE (EDM paper)",
        "dmd_fid": "2.62 at 1 NFE (DMD paper, ImageNet 64x64 class-conditional)",
        "dmd2_fid": (
            "1.28 at 1 NFE (DMD2 paper: the no-GAN run resumed with the GAN at lr 5e-7); "
            "2.61 without GAN"
        ),
        # DMD2's ImageNet-64 run without GAN, for as long as its checkpoint trained
        "source": SOURCES["edm-imagenet64"],
        "distill": {"steps": SOURCES["edm-imagenet64"].steps, **DMD2_IMAGENET64},
    },
    "edm-cifar10": {
        "checkpoint": "edm-cifar10-32x32-cond-vp.pkl (NVlabs EDM, DDPM++ architecture)",
        "parameters": 55_735_299,
        "pairs_sampler": "Heun, N=18 steps (35 NFE), sigma 0.002..80, rho 7 (EDM and DMD papers)",
        "teacher_fid": "1.79 at 35 NFE (EDM paper, class-conditional CIFAR-10)",
        "dmd_fid": "2.66 at 1 NFE (DMD paper, class-conditional CIFAR-10)",
        # DMD (v1) CIFAR-10: sources of every value (and which are ours) in docs/RECIPES.md
        "distill": {
            "lr": 5e-5,
            "fake_lr": 5e-5,
            "batch_size": 392,
            "pair_batch_size": 392,
            "reg_weight": 0.25,
            "reg_loss": "lpips",
            "lpips_size": 224,
            "fake_updates": 1,
            "lr_schedule": "constant",
            "warmup": 0,
        },
    },
}


class EDM(TeacherKind):
    name = "edm"
    default_preset = "edm-imagenet64"
    builtin = False
    default_steps = 18
    missing_path_hint = (
        "convert an NVlabs EDM checkpoint first: "
        "`dmdctl convert-edm CHECKPOINT.pkl -o teacher.safetensors`, "
        "then pass --teacher-path teacher.safetensors"
    )

    def presets(self) -> dict[str, dict]:
        # DMD2's ImageNet-64 GAN script: the no-GAN recipe plus the classifier head
        # (imagenet_gan_classifier_genloss3e-3_diffusion1000_lr2e-6_scratch.sh; docs/RECIPES.md)
        gan = dict(RECIPES["edm-imagenet64"], source=SOURCES["edm-imagenet64-gan"])
        gan["distill"] = dict(
            gan["distill"],
            steps=SOURCES["edm-imagenet64-gan"].steps,
            gan_weight=3e-3,
            gan_classifier_weight=1e-2,
        )
        return {
            "edm-imagenet64": dict(IMAGENET64, recipe=RECIPES["edm-imagenet64"]),
            "edm-imagenet64-gan": dict(IMAGENET64, recipe=gan),
            "edm-cifar10": dict(CIFAR10, recipe=RECIPES["edm-cifar10"]),
        }

    def default_steps_for(self, config: dict) -> int:
        """EDM's deterministic sampler: N=18 (35 NFE) at 32x32, N=40 (79 NFE) at 64x64 and up."""
        return 18 if int(config["img_resolution"]) <= 32 else 40

    def build(self, config: dict) -> EDMPrecond:
        from dmdctl.teachers.edm.networks import EDMBackbone

        return EDMPrecond(
            EDMBackbone(config), config["sigma_data"], config["sigma_min"], config["sigma_max"]
        )

    def sample_shape(self, config: dict) -> tuple[int, ...]:
        r = int(config["img_resolution"])
        return (int(config["img_channels"]), r, r)

    def num_classes(self, config: dict) -> int:
        return int(config["label_dim"])

    def feature_name(self) -> str:
        return "raw pixels (use eval-fid --features inception for FID)"

    def save_plot(
        self, panels, path: Path, config: dict, labels: torch.Tensor | None = None
    ) -> Path:
        from dmdctl.plots import image_grid_panels

        k = int(config["label_dim"])
        # one row per class reads well up to CIFAR-10's 10; ImageNet's 1000 get a plain grid
        if k > 20:
            labels, k = None, 0
        return image_grid_panels(panels, path, labels, num_classes=k)
