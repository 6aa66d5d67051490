"""What a teacher kind provides to the commands, and a loaded teacher."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dmdctl.core.codec import IdentityCodec


class TeacherKind:
    """A family of teachers (one architecture, its data, metrics and plots).

    Built-in kinds also own their data set and a ``train`` function for ``train-teacher``.
    """

    name: str = ""
    default_preset: str = ""
    builtin: bool = False
    # default number of Heun steps of the teacher's sampler (N=18 -> 35 NFE)
    default_steps: int = 18
    # whether the kind's name (or a teacher file/folder of this kind given without --teacher)
    # brings the default preset's distill recipe; kinds whose presets differ in kind (edm's
    # ImageNet and CIFAR-10) bring one only when a preset is named
    default_recipe_applies: bool = False
    # text-to-image kinds: conditioned on prompt embeddings, sampled to PNG files with prompts,
    # scored from those images (eval-fid --images), sampled themselves by their own pipeline
    text_to_image: bool = False
    # video kinds (Wan): samples are 5-D latents [C, F, H, W]; `sample` writes videos
    video: bool = False
    # what to tell a user who names the kind without a teacher file (None: train one)
    missing_path_hint: str | None = None
    # train-teacher's defaults for this kind (built-in kinds only)
    train_defaults: dict = {}

    def presets(self) -> dict[str, dict]:
        raise NotImplementedError

    def default_preset_for(self, config: dict) -> str:
        """The preset whose recipe applies to a teacher of this kind with this config."""
        return self.default_preset

    def default_steps_for(self, config: dict) -> int:
        """make-pairs' default sampler steps for this teacher (``--steps 0``)."""
        return self.default_steps

    def build(self, config: dict) -> nn.Module:
        raise NotImplementedError

    def sample_shape(self, config: dict) -> tuple[int, ...]:
        raise NotImplementedError

    def num_classes(self, config: dict) -> int:
        return 0

    def codec_for(self, config: dict):
        """The codec between the space this kind's networks denoise and images (the identity
        for pixel and point teachers; latent teachers return a VAE codec)."""
        return IdentityCodec()

    def default_path(self) -> Path | None:
        return None

    def real_data(self, config: dict):
        """The GAN's default real samples (a :class:`dmdctl.data.real.RealData`), or None when
        ``--real-data`` must name them."""
        return None

    def feature_name(self) -> str:
        return "identity"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def reference_stats(self, config: dict):
        """(mu, sigma, description) of the data, or None when there is no built-in reference."""
        return None

    def quality_metrics(
        self, config: dict, samples: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict:
        return {}

    def save_plot(
        self,
        panels: list[tuple[str, torch.Tensor]],
        path: Path,
        config: dict,
        labels: torch.Tensor | None = None,
    ) -> Path:
        """One PNG with a panel per (title, samples); ``labels`` are the samples' classes."""
        raise NotImplementedError


class OfKind:
    """Something made of a teacher kind and its network config (a teacher, a generator): the
    shape of one sample and the number of classes follow from the two."""

    kind: TeacherKind
    config: dict

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.kind.sample_shape(self.config))

    @property
    def num_classes(self) -> int:
        return int(self.kind.num_classes(self.config))


@dataclass
class Teacher(OfKind):
    """A loaded teacher: its denoiser and everything the commands need to know about it."""

    kind: TeacherKind
    config: dict
    denoiser: nn.Module
    path: Path | None = None
    sha256: str = ""

    @property
    def text_conditioned(self) -> bool:
        """Text-to-image teachers take prompt embeddings; the others class labels (or nothing)."""
        return self.kind.text_to_image

    @property
    def name(self) -> str:
        return self.kind.name

    @property
    def sigma_min(self) -> float:
        return float(self.denoiser.sigma_min)

    @property
    def sigma_max(self) -> float:
        return float(self.denoiser.sigma_max)

    @property
    def codec(self):
        return self.kind.codec_for(self.config)

    def identity(self) -> dict:
        return {
            "kind": self.name,
            "path": str(self.path) if self.path else None,
            "sha256": self.sha256,
            "config": self.config,
        }
