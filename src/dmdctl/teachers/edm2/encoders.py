"""EDM2's two encoders as dmdctl codecs: the space the network denoises <-> images in [-1, 1].

- ``StandardRGBEncoder`` (ImageNet-64): the network sees pixels in [-1, 1] (``x / 127.5 - 1``
  of uint8 images): dmdctl's own pixel convention, so the codec is the identity.
- ``StabilityVAEEncoder`` (ImageNet-512): Stable Diffusion's VAE (diffusers ``AutoencoderKL``,
  ``stabilityai/sd-vae-ft-mse`` in the published pickles) run on images **in [0, 1]** (as
  NVIDIA's encoder feeds it), its latents mapped to the network's by ``z = raw * scale + bias``
  per channel (``scale = 0.5 / raw_std``, ``bias = -raw_mean * scale``: the latents get mean 0,
  std 0.5). Decoding inverts the map, runs the VAE decoder and clamps its output to [0, 1].
  NVIDIA's encoder samples ``mean + std * noise`` of the latent distribution when it encodes a
  training image; this codec encodes to the mean (deterministic real samples for the GAN).

The VAE is loaded with diffusers from a hub id or a local folder (an ``AutoencoderKL`` folder, or a
pipeline folder with ``vae/``), on first use; it runs in float32, in batches of
:data:`VAE_BATCH` images.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dmdctl.core.codec import IdentityCodec
from dmdctl.errors import UserError

VAE_BATCH = 8  # images per VAE call (NVIDIA's encoder runs 8, its sampler's decoder 4)


def vae_folder(source: str) -> tuple[str, str | None]:
    """(what from_pretrained reads, its subfolder) for a VAE source: a local AutoencoderKL
    folder, a local pipeline folder (its ``vae/``), or a hub id."""
    p = Path(source).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return str(p), None
        if (p / "vae" / "config.json").is_file():
            return str(p), "vae"
        raise UserError(
            f"{p} holds no VAE: pass an AutoencoderKL folder (config.json and weights) or a "
            "diffusers pipeline folder with vae/"
        )
    if p.exists():
        raise UserError(f"{p} is a file; the VAE is a folder (or a hub id)")
    from dmdctl.teachers.sd.pipeline import looks_like_hub_id

    if not looks_like_hub_id(str(source)):
        raise UserError(f"VAE not found: {source} (not a folder, not a hub id)")
    return str(source), None


def load_vae(source: str, offline: bool = False):
    """The frozen AutoencoderKL of ``source`` (local folder, or hub id: downloaded only when
    online, as diffusers does; offline mode reads the local cache)."""
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()
    path, sub = vae_folder(source)
    local = Path(path).is_dir() or offline or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true")
    try:
        vae = AutoencoderKL.from_pretrained(
            path, subfolder=sub, local_files_only=local, torch_dtype=torch.float32,
            use_safetensors=True,  # never a pickled .bin
        )  # fmt: skip
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load the EDM2 teacher's VAE {source!r} ({str(e).splitlines()[0]}); "
            "convert the pickle with --vae DIR to use a local copy"
        ) from None
    return vae.eval().requires_grad_(False)


class StabilityVAECodec:
    """EDM2 latents <-> images in [-1, 1] through the SD VAE (see the module docstring)."""

    latent = True

    def __init__(self, encoder: dict, vae=None, offline: bool = False):
        self.source = str(encoder["vae"])
        self.scale = torch.tensor(encoder["scale"], dtype=torch.float32).view(1, -1, 1, 1)
        self.bias = torch.tensor(encoder["bias"], dtype=torch.float32).view(1, -1, 1, 1)
        self._vae = vae
        self.offline = offline

    @property
    def vae(self):
        if self._vae is None:
            self._vae = load_vae(self.source, self.offline)
        return self._vae

    def _device(self):
        return next(self.vae.parameters()).device

    def image_resolution(self, latent_resolution: int) -> int:
        """The images' side for latents of this side (the VAE halves it per level)."""
        return int(latent_resolution) * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def vae_files(self) -> tuple[Path, Path]:
        """(config.json, weights) of the VAE: a local folder's, or the hub cache's copy (what
        a real-data store's latents depend on)."""
        _ = self.vae  # loaded (for a hub id: now in the cache)
        path, sub = vae_folder(self.source)
        if Path(path).is_dir():
            folder = Path(path) / (sub or "")
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise UserError(f"{folder} has no .safetensors weights")
            return folder / "config.json", files[0]
        from huggingface_hub import try_to_load_from_cache

        found = [
            try_to_load_from_cache(path, name)
            for name in ("config.json", "diffusion_pytorch_model.safetensors")
        ]
        if not all(isinstance(f, str) for f in found):
            raise UserError(f"the VAE {self.source} is not in the local hub cache")
        return Path(found[0]), Path(found[1])

    def identity(self) -> dict:
        """What latents made by this codec depend on, besides the VAE's files."""
        return {
            "edm2_scale": self.scale.flatten().tolist(),
            "edm2_bias": self.bias.flatten().tolist(),
        }

    def to_raw(self, z: torch.Tensor) -> torch.Tensor:
        """The network's latents as the VAE's own (``(z - bias) / scale``)."""
        return (z.float() - self.bias.to(z.device)) / self.scale.to(z.device)

    def from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.float() * self.scale.to(raw.device) + self.bias.to(raw.device)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (the VAE decodes to [0, 1], clamped, as NVIDIA's encoder does)."""
        raw, dev = self.to_raw(z), self._device()
        out = [
            self.vae.decode(b.to(dev)).sample.float().clamp(0, 1).to(z.device)
            for b in raw.split(VAE_BATCH)
        ]
        return torch.cat(out) * 2 - 1

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents of images in [-1, 1]: the VAE sees them in [0, 1]; the mean of its latent
        distribution, mapped by scale and bias."""
        dev = self._device()
        x01 = (x.float() + 1) / 2
        raw = [
            self.vae.encode(b.to(dev)).latent_dist.mean.float().to(x.device)
            for b in x01.split(VAE_BATCH)
        ]
        return self.from_raw(torch.cat(raw))


def codec_for(encoder: dict | None, offline: bool = False):
    """The codec of an ``edm2`` teacher config's ``encoder`` entry."""
    if not encoder or encoder.get("class") == "StandardRGBEncoder":
        return IdentityCodec()
    if encoder.get("class") != "StabilityVAEEncoder":
        raise UserError(f"unknown EDM2 encoder {encoder.get('class')!r}")
    return StabilityVAECodec(encoder, offline=offline)
