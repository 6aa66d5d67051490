"""The pixel/latent split: a codec maps between the space the teacher denoises in and images.

Pixel teachers use :class:`IdentityCodec`; latent teachers (Stable Diffusion) plug a VAE in
here so one training loop serves both.
"""

from __future__ import annotations

import torch


class IdentityCodec:
    """For teachers that denoise the data itself (points, pixels)."""

    latent = False

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z
