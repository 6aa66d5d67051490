"""Stable Diffusion's discrete eps/v-prediction UNet as a sigma-space denoiser ``D(x, sigma, c)``.

SD defines ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` at integer timesteps t = 0..T-1.
In the EDM convention used by the rest of dmdctl, ``x_sigma = x0 + sigma eps`` with
``sigma_t = sqrt((1 - abar_t) / abar_t)``, so ``x_t = sqrt(abar_t) x_sigma`` (docs/METHOD.md section 1).
The wrapper snaps each sigma to the nearest timestep (in log sigma; exact for the timestep grid
that distillation draws from), runs the UNet on ``x_t`` and turns its prediction into x0.
"""

from __future__ import annotations

import torch
from torch import nn

from dmdctl.core.denoiser import Denoiser, FlowDenoiser, broadcast_sigma

PREDICTION_TYPES = ("epsilon", "v_prediction")


def alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """The training noise schedule a diffusers scheduler config describes (float64)."""
    from diffusers import DDPMScheduler

    keep = {
        k: scheduler_config[k]
        for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        if scheduler_config.get(k) is not None
    }
    betas = DDPMScheduler(**keep).betas.double()
    return torch.cumprod(1 - betas, 0)


class SDDenoiser(Denoiser):
    """``D(x_sigma, sigma, text_embeddings) -> x0`` around a diffusers ``UNet2DConditionModel``."""

    def __init__(self, unet: nn.Module, abar: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        self.unet = unet
        self.prediction_type = prediction_type
        abar = abar.double()
        sigmas = ((1 - abar) / abar).sqrt()
        # not in the state dict: they follow from the scheduler config kept with the weights
        self.register_buffer("abar", abar.float(), persistent=False)
        self.register_buffer("sigmas", sigmas.float(), persistent=False)
        self.register_buffer("log_sigmas", sigmas.log().float(), persistent=False)
        self.sigma_min = float(sigmas[0])
        self.sigma_max = float(sigmas[-1])
        self.sigma_data = 0.5  # unused by SD; kept so callers that read it get a number

    step_unit = "timestep"

    def input_scale_at(self, sigma: float) -> float:
        """A generator step at timestep t takes pure noise as x_t: x_sigma = z / sqrt(abar_t),
        and 1 / sqrt(abar_t) = sqrt(1 + sigma_t^2)."""
        t = int(self.timesteps(torch.tensor([float(sigma)]))[0])
        return float(1 / self.abar.double()[t].sqrt())

    def step_sigmas(self, values: list[float]) -> list[float]:
        """Timesteps (DMD2's 999, 749, 499, 249) as sigmas."""
        n = len(self.sigmas)
        bad = [v for v in values if float(v) != int(v) or not 0 <= int(v) < n]
        if bad:
            raise ValueError(f"timesteps must be integers in 0..{n - 1}, got {bad[0]:g}")
        return [float(self.sigmas[int(v)]) for v in values]

    def bottleneck(self) -> nn.Module:
        return self.unet.mid_block  # DMD2's GAN head reads the mid block's output

    @property
    def network(self) -> nn.Module:
        """The diffusers model inside (what LoRA adapters go on, what an export writes)."""
        return self.unet

    def step_values(self, sigmas: list[float]) -> list[int]:
        """A generator's steps as the pipeline names them: integer timesteps."""
        return [int(t) for t in self.timesteps(torch.tensor(sigmas, dtype=torch.float32))]

    def training_sigmas(self, levels: int) -> torch.Tensor:
        """The teacher's own noise levels, one per timestep, ascending (DMD's timestep grid;
        ``levels`` does not apply)."""
        return self.sigmas.detach().clone()

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Weight turning ``|D - x0|^2`` into the UNet's own training loss (eps- or v-MSE)."""
        s2 = sigma.float() ** 2
        return 1 / s2 if self.prediction_type == "epsilon" else 1 / s2 + 1

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma.float().log()[:, None] - self.log_sigmas[None]).abs().argmin(dim=1)

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def unet_output(self, x_t: torch.Tensor, t, cond=None) -> torch.Tensor:
        """The UNet's raw prediction (eps or v, float32) at timesteps ``t`` on ``x_t``."""
        dtype = next(self.unet.parameters()).dtype
        emb = cond.to(dtype) if cond is not None else None
        return self.unet(x_t.to(dtype), t, encoder_hidden_states=emb).sample.float()

    def forward(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        s = broadcast_sigma(sigma, x)
        t = self.timesteps(s.flatten())
        ab = self.abar[t].reshape(s.shape)
        x_t = x.float() * ab.sqrt()
        out = self.unet_output(x_t, t, cond)
        if self.prediction_type == "epsilon":
            x0 = (x_t - (1 - ab).sqrt() * out) / ab.sqrt()
        else:
            x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * out
        return x0.to(x.dtype)


class SDXLDenoiser(SDDenoiser):
    """SDXL's UNet: besides the token embeddings it takes the second text encoder's pooled
    embedding and the micro-conditioning ``time_ids`` (original size, crop corner, target size).

    A condition is one tensor ``[N, L + 1, D]``: the L token embeddings (both encoders' penultimate
    hidden states, concatenated) and one more row holding the pooled embedding in its first
    ``pooled_dim`` entries, zero after. Everything that indexes, caches, batches or concatenates
    prompt embeddings (prompt tables, real data, guidance) then handles SDXL unchanged. The
    ``time_ids`` are fixed: ``(H, W, 0, 0, H, W)`` at the teacher's resolution, as diffusers'
    pipeline builds them by default and as DMD2 trains with.
    """

    def __init__(
        self,
        unet: nn.Module,
        abar: torch.Tensor,
        prediction_type: str,
        pooled_dim: int,
        time_ids: list[float],
    ):
        super().__init__(unet, abar, prediction_type)
        self.pooled_dim = int(pooled_dim)
        self.register_buffer("time_ids", torch.tensor([time_ids], dtype=torch.float32), False)

    def unet_output(self, x_t: torch.Tensor, t, cond=None) -> torch.Tensor:
        if cond is None:
            raise ValueError("an SDXL UNet needs a condition (token and pooled embeddings)")
        dtype = next(self.unet.parameters()).dtype
        emb, pooled = unpack_sdxl_condition(cond.to(dtype), self.pooled_dim)
        added = {"text_embeds": pooled, "time_ids": self.time_ids.to(dtype).expand(len(emb), -1)}
        out = self.unet(x_t.to(dtype), t, encoder_hidden_states=emb, added_cond_kwargs=added)
        return out.sample.float()


def pack_sdxl_condition(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """``[N, L, D]`` token embeddings and ``[N, P]`` pooled ones (P <= D) as one ``[N, L+1, D]``."""
    n, _, d = tokens.shape
    if pooled.shape[-1] > d:
        raise ValueError(f"pooled embedding ({pooled.shape[-1]}) wider than the tokens' ({d})")
    row = tokens.new_zeros(n, 1, d)
    row[:, 0, : pooled.shape[-1]] = pooled
    return torch.cat([tokens, row], dim=1)


def unpack_sdxl_condition(cond: torch.Tensor, pooled_dim: int):
    return cond[:, :-1], cond[:, -1, :pooled_dim]


class SD3Denoiser(FlowDenoiser):
    """SD3's flow-matching MMDiT (``SD3Transformer2DModel``) as a denoiser: the velocity at
    ``timestep = 1000 t`` on ``x_t``, given the token embeddings (CLIP + T5) and the pooled CLIP
    embedding, packed in one condition tensor as for SDXL (:func:`pack_sdxl_condition`). The DM
    loss's grid is the scheduler's shifted training timesteps (SD3: shift 3)."""

    # the GAN head reads the image tokens of the middle joint block ([N, tokens, C])
    bottleneck_output = 1

    def __init__(self, transformer: nn.Module, shift: float, pooled_dim: int, levels: int = 1000):
        super().__init__(None, time_scale=levels, shift=shift, levels=levels)
        self.transformer = transformer
        self.pooled_dim = int(pooled_dim)

    @property
    def network(self) -> nn.Module:
        return self.transformer

    def bottleneck(self) -> nn.Module:
        blocks = self.transformer.transformer_blocks
        return blocks[len(blocks) // 2]

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def unet_output(self, x_t: torch.Tensor, timestep, cond=None) -> torch.Tensor:
        """The transformer's velocity (float32) at the pipeline's ``timestep`` (1000 t)."""
        if cond is None:
            raise ValueError("an SD3 transformer needs a condition (token and pooled embeddings)")
        dtype = next(self.transformer.parameters()).dtype
        emb, pooled = unpack_sdxl_condition(cond.to(dtype), self.pooled_dim)
        t = torch.as_tensor(timestep, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        out = self.transformer(
            hidden_states=x_t.to(dtype),
            encoder_hidden_states=emb,
            pooled_projections=pooled,
            timestep=t,
        )
        return out.sample.float()

    def velocity_at(self, x_t: torch.Tensor, t, cond=None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        return self.unet_output(x_t, t * self.time_scale, cond)


class GuidedDenoiser(nn.Module):
    """Classifier-free guidance in x0 space: ``x0_u + w (x0_c - x0_u)``, u = the empty prompt.

    x0 is affine in the UNet's eps (or v) output at fixed x_t, so this equals guidance applied
    to the prediction, the way pipelines do it. Both branches run as one batch.
    """

    def __init__(self, denoiser: nn.Module, scale: float, uncond: torch.Tensor):
        super().__init__()
        self.denoiser = denoiser
        self.scale = float(scale)
        self.register_buffer("uncond", uncond.reshape(1, *uncond.shape[-2:]), persistent=False)
        for k in ("sigma_min", "sigma_max", "sigma_data"):
            setattr(self, k, getattr(denoiser, k))

    def forward(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, sigma, cond)
        n = x.shape[0]
        s = broadcast_sigma(sigma, x).flatten()
        u = self.uncond.to(device=cond.device, dtype=cond.dtype).expand(n, -1, -1)
        out = self.denoiser(torch.cat([x, x]), torch.cat([s, s]), torch.cat([u, cond]))
        x_u, x_c = out.chunk(2)
        return x_u + self.scale * (x_c - x_u)
