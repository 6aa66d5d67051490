"""NVlabs EDM2 teachers (``--teacher edm2``): magnitude-preserving UNets with EDM
preconditioning, ImageNet-512 in Stable Diffusion's VAE latents and ImageNet-64 in pixels.

A teacher file comes from ``dmdctl convert-edm CKPT.pkl -o teacher.safetensors`` (the pickle is
read as data: :mod:`dmdctl.teachers.edm2.checkpoint`); its config holds the network's init
arguments and the encoder (the VAE and its latent scaling, for ImageNet-512).

The real score can be guided as EDM2 guides its sampler: ``D_g + w (D - D_g)`` with a second,
*guiding* network D_g -- an unconditional EDM2 net (classifier-free guidance; the published
ImageNet-512 CFG settings guide with the XS unconditional net) or a smaller, less-trained
conditional one (autoguidance, Karras et al., NeurIPS 2024). :class:`GuidedEDM2` does that.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dmdctl.core.codec import IdentityCodec
from dmdctl.core.denoiser import EDMPrecond, broadcast_sigma
from dmdctl.errors import UserError
from dmdctl.teachers.base import TeacherKind
from dmdctl.teachers.edm.kind import DMD2_IMAGENET64
from dmdctl.teachers.source import SourceCheckpoint

EDM2_RANGE = {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}
SAMPLER_STEPS = 32  # generate_images.py: --steps 32 (63 NFE), sigma 0.002..80, rho 7, Heun


def network_config(size: str, latent: bool) -> dict:
    """The published network of a size (``xs``..``xxl``), ImageNet-512 latents or ImageNet-64."""
    from dmdctl.teachers.edm2.networks import SIZES

    dropout = 0.0  # distilled without dropout (trained: 0 for xs/s, 0.1 for m and larger)
    encoder = (
        {
            "class": "StabilityVAEEncoder",
            "vae": "stabilityai/sd-vae-ft-mse",
            # encoders.py defaults: scale = 0.5 / raw_std, bias = -raw_mean * scale
            "scale": [0.5 / s for s in (4.17, 4.62, 3.71, 3.28)],
            "bias": [
                -m * 0.5 / s
                for m, s in zip((5.81, 3.25, 0.12, -2.15), (4.17, 4.62, 3.71, 3.28), strict=True)
            ],
        }  # fmt: skip
        if latent
        else {"class": "StandardRGBEncoder"}
    )
    return {
        "img_resolution": 64,
        "img_channels": 4 if latent else 3,
        "label_dim": 1000,
        "logvar_channels": 128,
        "model_kwargs": {"model_channels": SIZES[size], "dropout": dropout},
        **EDM2_RANGE,
        "encoder": encoder,
    }


# EDM2's published sampling settings (NVlabs/edm2 generate_images.py, config_presets; metric
# from its comments; nets under .../edm2/posthoc-reconstructions/): main net, guiding net,
# guidance. Each distill preset below guides its real score the way one of these does.
SAMPLING = {
    "edm2-img512-s-autog-fid": ("edm2-img512-s-2147483-0.070.pkl", "edm2-img512-xs-0134217-0.125.pkl", 2.10, "FID 1.34"),  # noqa: E501
    "edm2-img512-xxl-autog-fid": ("edm2-img512-xxl-0939524-0.075.pkl", "edm2-img512-m-0268435-0.155.pkl", 2.05, "FID 1.25"),  # noqa: E501
    "edm2-img512-s-guid-fid": ("edm2-img512-s-2147483-0.025.pkl", "edm2-img512-xs-uncond-2147483-0.025.pkl", 1.40, "FID 2.23"),  # noqa: E501
    "edm2-img64-s-autog-fid": ("edm2-img64-s-1073741-0.045.pkl", "edm2-img64-xs-0134217-0.110.pkl", 1.70, "FID 1.01"),  # noqa: E501
}  # fmt: skip

# preset -> (network size, latent?, EDM2 sampling setting its teacher and real score follow)
PRESETS = {
    "edm2-img512-s-autog": ("s", True, "edm2-img512-s-autog-fid"),
    "edm2-img512-xxl-autog": ("xxl", True, "edm2-img512-xxl-autog-fid"),
    "edm2-img512-s-guid": ("s", True, "edm2-img512-s-guid-fid"),
    "edm2-img64-s-autog": ("s", False, "edm2-img64-s-autog-fid"),
}


def recipe_of(name: str) -> dict:
    size, latent, sampling = PRESETS[name]
    net, gnet, guidance, metric = SAMPLING[sampling]
    # The DMD2-style recipe applied to EDM2 teachers. DMD2 published no EDM2 run: these are the
    # values of its ImageNet-64 script (imagenet_lr2e-6_scratch.sh; docs/RECIPES.md, where each
    # value's source is listed and ours are marked), the edm-imagenet64 preset's own, with the
    # real score guided as EDM2's published sampling settings guide their teachers
    # (generate_images.py's presets).
    distill = dict(DMD2_IMAGENET64)
    if guidance != 1.0:
        distill["real_guidance"] = guidance
    return {
        "checkpoint": net,
        "guiding_checkpoint": gnet,
        "guidance": "none" if gnet is None else (
            "classifier-free (unconditional net)" if "uncond" in gnet else "autoguidance"
        ),
        "edm2_sampling": f"{sampling}: Heun {SAMPLER_STEPS} steps ({2 * SAMPLER_STEPS - 1} NFE), "
        f"guidance {guidance:g}, {metric} (EDM2's generate_images.py)",
        "distill": distill,
    }  # fmt: skip


class EDM2Precond(EDMPrecond):
    """NVIDIA's EDM2 ``Precond``: EDM preconditioning around the EDM2 UNet, plus the learned
    log-variance u(sigma) of EDM2's loss (:meth:`logvar`), which denoising does not use."""

    def logvar(self, sigma) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
        return self.backbone.logvar(s.log() / 4)

    def prepare_training(self) -> None:
        """A copy about to be trained (generator, fake score): the log-variance head is frozen
        (dmdctl's losses do not use it) and the weights are force-normalised, as EDM2's first
        training forward pass would."""
        for p in self.backbone.uncertainty_parameters():
            p.requires_grad_(False)
        self.backbone.force_weight_norm_()

    def after_optimizer_step(self) -> None:
        """EDM2's forced weight normalisation, once the optimiser has moved the weights (the
        weights EDM2's next training forward would normalise before use)."""
        self.backbone.force_weight_norm_()


class GuidedEDM2(nn.Module):
    """The guided denoiser of EDM2's sampler: ``D_g(x) + w (D(x) - D_g(x))``.

    ``guide`` is an unconditional net (``conditional=False``: classifier-free guidance, the
    labels are not given to it) or a conditional one trained less / smaller (autoguidance: the
    same labels). ``w = 1`` is the main net alone.
    """

    def __init__(self, denoiser: nn.Module, guide: nn.Module, scale: float, conditional: bool):
        super().__init__()
        self.denoiser = denoiser
        self.guide = guide
        self.scale = float(scale)
        self.conditional = bool(conditional)
        for k in ("sigma_min", "sigma_max", "sigma_data"):
            setattr(self, k, getattr(denoiser, k))

    def forward(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        d = self.denoiser(x, sigma, cond)
        if self.scale == 1.0:
            return d
        s = broadcast_sigma(sigma, x).flatten()
        g = self.guide(x, s, cond if self.conditional else None)
        return torch.lerp(g.float(), d.float(), self.scale).to(d.dtype)


def guide_mode(teacher_config: dict, guide_config: dict, mode: str, path) -> bool:
    """Whether the guiding net takes the labels (autoguidance) or not (classifier-free
    guidance), checked against what it is; ``mode`` auto|cfg|autoguidance."""
    for key in ("img_resolution", "img_channels", "sigma_data"):
        if guide_config.get(key) != teacher_config.get(key):
            raise UserError(
                f"--guide-net {path}: its {key} is {guide_config.get(key)}, the teacher's "
                f"{teacher_config.get(key)}"
            )
    if guide_config.get("encoder") != teacher_config.get("encoder"):
        raise UserError(f"--guide-net {path} works in another space (encoder) than the teacher")
    uncond = int(guide_config["label_dim"]) == 0
    if mode == "auto":
        mode = "cfg" if uncond else "autoguidance"
    if mode == "cfg" and not uncond:
        raise UserError(
            f"--guide-mode cfg needs an unconditional guiding net, but {path} has "
            f"{guide_config['label_dim']} classes (use --guide-mode autoguidance)"
        )
    if mode == "autoguidance" and int(guide_config["label_dim"]) != int(
        teacher_config["label_dim"]
    ):
        raise UserError(
            f"--guide-mode autoguidance needs a guiding net with the teacher's "
            f"{teacher_config['label_dim']} classes; {path} has {guide_config['label_dim']}"
        )
    return mode == "autoguidance"


# No DMD2 or EDM2 run gives a distillation length for these teachers: no preset sets `steps`.
SOURCES: dict[str, SourceCheckpoint] = {}


class EDM2(TeacherKind):
    name = "edm2"
    default_preset = "edm2-img512-s-autog"
    builtin = False
    default_steps = SAMPLER_STEPS
    missing_path_hint = (
        "convert an NVlabs EDM2 checkpoint first: "
        "`dmdctl convert-edm edm2-img512-s-2147483-0.070.pkl -o teacher.safetensors`, "
        "then pass --teacher-path teacher.safetensors"
    )

    def __init__(self):
        self._codecs: dict[str, object] = {}

    def presets(self) -> dict[str, dict]:
        return {
            name: dict(network_config(size, latent), recipe=recipe_of(name))
            for name, (size, latent, _) in PRESETS.items()
        }

    def default_steps_for(self, config: dict) -> int:
        return SAMPLER_STEPS

    def build(self, config: dict) -> EDM2Precond:
        from dmdctl.teachers.edm2.networks import EDM2Backbone

        return EDM2Precond(
            EDM2Backbone(config), config["sigma_data"], config["sigma_min"], config["sigma_max"]
        )

    def sample_shape(self, config: dict) -> tuple[int, ...]:
        r = int(config["img_resolution"])
        return (int(config["img_channels"]), r, r)

    def num_classes(self, config: dict) -> int:
        return int(config["label_dim"])

    def codec_for(self, config: dict):
        """Pixels: the identity; ImageNet-512 latents: the SD VAE with EDM2's scaling (loaded on
        first use, one per VAE and scaling)."""
        enc = config.get("encoder") or {}
        if enc.get("class", "StandardRGBEncoder") == "StandardRGBEncoder":
            return IdentityCodec()
        key = json.dumps(enc, sort_keys=True)
        if key not in self._codecs:
            from dmdctl.teachers.edm2.encoders import codec_for

            self._codecs[key] = codec_for(enc)
        return self._codecs[key]

    def feature_name(self) -> str:
        return "raw samples (use eval-fid --features inception for FID)"

    def save_plot(
        self, panels, path: Path, config: dict, labels: torch.Tensor | None = None
    ) -> Path:
        from dmdctl.plots import image_grid_panels

        # images (latents are decoded before plotting); 1000 classes: a plain grid
        return image_grid_panels(panels, path, None, num_classes=0)
