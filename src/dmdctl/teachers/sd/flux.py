"""FLUX.1 (``FluxPipeline`` folders: FLUX.1-dev, FLUX.1-schnell and their fine-tunes) as a
flow-matching teacher.

What FLUX adds to SD3's flow-matching path (docs/METHOD.md, section 1):

- the transformer reads the latents as 2x2 patches, "packed" into a token sequence
  ``[N, (H/2)(W/2), 4C]`` in row-major order, with 3-d position ids per token (0, row, column)
  for the image and zeros for the text, as ``FluxPipeline`` builds them. dmdctl keeps latents
  unpacked ``[N, C, H, W]`` everywhere (noise, pairs, real data, the VAE); the denoiser packs
  before the transformer and unpacks its velocity;
- the condition is T5's token embeddings and CLIP's pooled embedding (``encode_prompt``), packed
  into one ``[N, L + 1, D]`` tensor as for SDXL and SD3 (``pack_sdxl_condition``);
- the scheduler's shift depends on the resolution (``use_dynamic_shifting``): the pipeline
  computes ``mu`` from the number of image tokens (``calculate_shift``) and shifts its times by
  ``exp(mu)`` (``time_shift_type="exponential"``; ``mu`` itself for "linear"), which is a fixed
  shift for a fixed resolution: the teacher's resolution is its VAE config's ``sample_size``
  (1024 for FLUX.1, FluxPipeline's default size too);
- FLUX.1-dev is guidance-distilled: its transformer takes the guidance scale as an input
  (``guidance_embeds``), one pass instead of CFG's two. :func:`embed_guidance` gives the run's
  guidance value to the real score, the generator and the fake score alike (docs/RECIPES.md,
  ``flux-dev``). A transformer without that input (FLUX.1-schnell) takes no guidance value; CFG
  on it is two passes with the encoded empty prompt, FluxPipeline's ``true_cfg_scale`` with
  ``negative_prompt=""``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from dmdctl.core.denoiser import FlowDenoiser
from dmdctl.teachers.sd.denoiser import unpack_sdxl_condition

FLUX_HUB_ID = "black-forest-labs/FLUX.1-dev"
FLUX_MAX_SEQUENCE_LENGTH = 512  # T5 tokens: FluxPipeline's default
FLUX_DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` latents as FLUX's tokens ``[N, (H/2)(W/2), 4C]`` (2x2 patches, row-major;
    each token's features ordered channel, then patch row, then patch column)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for ``[N, C, h, w]`` latents."""
    n, _, d = tokens.shape
    x = tokens.reshape(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, d // 4, h, w)


def image_ids(h: int, w: int, device=None) -> torch.Tensor:
    """Position ids ``[(h/2)(w/2), 3]`` of the packed tokens of ``[.., h, w]`` latents: (0, row,
    column) of each 2x2 patch."""
    rows = torch.arange(h // 2, device=device, dtype=torch.float32)
    cols = torch.arange(w // 2, device=device, dtype=torch.float32)
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


def dynamic_shift(scheduler_config: dict, image_tokens: int) -> tuple[float, float]:
    """(mu, shift) of a resolution-dependent schedule for ``image_tokens`` packed tokens: ``mu``
    on the line through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as
    FluxPipeline computes it; the times are then shifted as ``s t / (1 + (s - 1) t)`` with
    ``s = exp(mu)`` (or ``s = mu`` for the scheduler's "linear" time shift)."""
    c = scheduler_config
    lo, hi = int(c.get("base_image_seq_len", 256)), int(c.get("max_image_seq_len", 4096))
    base, top = float(c.get("base_shift", 0.5)), float(c.get("max_shift", 1.15))
    slope = (top - base) / (hi - lo)
    intercept = base - slope * lo
    mu = image_tokens * slope + intercept
    linear = c.get("time_shift_type", "exponential") == "linear"
    return mu, (mu if linear else math.exp(mu))


class FluxDenoiser(FlowDenoiser):
    """FLUX.1's transformer (``FluxTransformer2DModel``) as a denoiser: the velocity on packed
    ``x_t`` at the pipeline's timestep (``1000 t``, handed to the transformer as ``t``), given
    T5's tokens and CLIP's pooled embedding (one packed condition tensor) and, for a
    guidance-distilled transformer, the guidance value :attr:`guidance`."""

    # the GAN head reads the image tokens of the middle block of all (double- and single-stream)
    # blocks: FLUX.1-dev's 28th of 57, NVIDIA FastGen's default for its FLUX discriminator
    bottleneck_output = 1

    def __init__(
        self,
        transformer: nn.Module,
        shift: float,
        pooled_dim: int,
        levels: int = 1000,
        guidance: float | None = None,
        mu: float | None = None,
    ):
        super().__init__(None, time_scale=levels, shift=shift, levels=levels)
        self.mu = mu  # the resolution-dependent schedule's mu (None: a fixed shift)
        self.transformer = transformer
        self.pooled_dim = int(pooled_dim)
        self.guidance_embeds = bool(getattr(transformer.config, "guidance_embeds", False))
        self.guidance = None if guidance is None else float(guidance)

    @property
    def network(self) -> nn.Module:
        return self.transformer

    def bottleneck(self) -> nn.Module:
        blocks = [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]
        return blocks[len(blocks) // 2]

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def unet_output(self, x_t: torch.Tensor, timestep, cond=None) -> torch.Tensor:
        """The transformer's velocity (float32, unpacked like ``x_t``) at the pipeline's
        ``timestep`` (1000 t), called as FluxPipeline calls it."""
        if cond is None:
            raise ValueError("a FLUX transformer needs a condition (T5 tokens, pooled CLIP)")
        dtype = next(self.transformer.parameters()).dtype
        emb, pooled = unpack_sdxl_condition(cond.to(dtype), self.pooled_dim)
        n, _, h, w = x_t.shape
        t = torch.as_tensor(timestep, device=x_t.device).reshape(-1).float().expand(n)
        guidance = None
        if self.guidance_embeds:
            if self.guidance is None:
                raise ValueError("a guidance-distilled FLUX transformer needs a guidance value")
            guidance = torch.full((n,), self.guidance, dtype=torch.float32, device=x_t.device)
        out = self.transformer(
            hidden_states=pack_latents(x_t.to(dtype)),
            encoder_hidden_states=emb,
            pooled_projections=pooled,
            timestep=t / 1000,
            img_ids=image_ids(h, w, x_t.device),
            txt_ids=torch.zeros(emb.shape[1], 3, device=x_t.device),
            guidance=guidance,
        )
        return unpack_latents(out.sample.float(), h, w)

    def velocity_at(self, x_t: torch.Tensor, t, cond=None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        return self.unet_output(x_t, t * self.time_scale, cond)

    def scheduler_kwargs(self, steps: int) -> dict:
        """What FluxPipeline hands its scheduler's ``set_timesteps`` for ``steps`` steps: the
        times ``linspace(1, 1/steps, steps)`` and, for a resolution-dependent schedule, ``mu``."""
        import numpy as np

        kwargs = {"sigmas": np.linspace(1.0, 1 / steps, steps)}
        if self.mu is not None:
            kwargs["mu"] = self.mu
        return kwargs


def flux_config(folder: Path, source: str, tcfg: dict, sched: dict, vae_cfg: dict) -> dict:
    """The teacher config of a FluxPipeline folder (what rebuilds the denoiser without it), from
    its transformer, scheduler and VAE configs."""
    from dmdctl.errors import UserError

    vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    resolution = int(vae_cfg.get("sample_size") or 1024)
    side = resolution // vae_scale
    if resolution % vae_scale or side % 2:
        raise UserError(
            f"{folder}: the VAE's sample_size {resolution} does not give latents of an even side "
            f"(VAE scale {vae_scale}); FLUX packs 2x2 latent patches"
        )
    mu, shift = None, float(sched.get("shift", 1.0))
    if sched.get("use_dynamic_shifting"):
        mu, shift = dynamic_shift(sched, (side // 2) ** 2)
    embeds = bool(tcfg.get("guidance_embeds", False))
    return {
        "pipeline": source,
        "arch": "flux",
        "transformer_config": tcfg,
        "scheduler_config": sched,
        "prediction_type": "flow",
        "shift": shift,
        "mu": mu,
        "num_train_timesteps": int(sched.get("num_train_timesteps", 1000)),
        "latent_channels": int(tcfg.get("in_channels", 64)) // 4,
        "vae_scale": vae_scale,
        "scaling_factor": float(vae_cfg.get("scaling_factor", 0.3611)),
        "shift_factor": float(vae_cfg.get("shift_factor") or 0.0),
        "resolution": resolution,
        "pooled_dim": int(tcfg.get("pooled_projection_dim", 768)),
        "joint_attention_dim": int(tcfg.get("joint_attention_dim", 4096)),
        "max_sequence_length": FLUX_MAX_SEQUENCE_LENGTH,
        "guidance_embeds": embeds,
        # the guidance input of a guidance-distilled transformer: FluxPipeline's default until a
        # run sets its own (embed_guidance), which its generator file then records
        "guidance": FLUX_DEFAULT_GUIDANCE if embeds else None,
    }


def build_flux_denoiser(config: dict, transformer: nn.Module | None = None) -> FluxDenoiser:
    if transformer is None:
        from diffusers import FluxTransformer2DModel

        cfg = {k: v for k, v in config["transformer_config"].items() if not k.startswith("_")}
        transformer = FluxTransformer2DModel.from_config(cfg)
    return FluxDenoiser(
        transformer,
        config["shift"],
        config["pooled_dim"],
        config["num_train_timesteps"],
        config.get("guidance"),
        config.get("mu"),
    )


def embed_guidance(teacher, scale: float) -> float:
    """A run's real-score guidance ``scale`` on a guidance-distilled FLUX teacher becomes the
    transformer's guidance input, for the real score, and for the generator and the fake score
    copied from it (as NVIDIA FastGen's FLUX DMD2 recipe conditions all three); it is recorded in
    the teacher config, which the generator file keeps. Returns the scale left for two-pass CFG:
    1.0 there, ``scale`` unchanged for every other teacher."""
    d = teacher.denoiser
    if not getattr(d, "guidance_embeds", False):
        return scale
    d.guidance = float(scale)
    teacher.config["guidance"] = float(scale)
    return 1.0
