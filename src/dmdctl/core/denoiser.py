"""The one interface every teacher is wrapped to: ``D(x, sigma, cond) -> x0``.

``x`` is a noisy sample ``x0 + sigma * eps`` (EDM convention), ``sigma`` a tensor with one value
per sample (or a scalar), ``cond`` class labels (int64, -1 or None for unconditional) or other
conditioning the backbone understands. Samplers, the DMD loss and the trainer only ever call
this interface, so they do not know which network they drive.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dmdctl.core.sampling import dmd_sigma_grid, flow_shift, seeded_noise_draws


def edm_scalings(sigma: torch.Tensor, sigma_data: float):
    """EDM preconditioning (Karras et al. 2022, Table 1): c_skip, c_out, c_in, c_noise."""
    s2 = sigma**2
    d2 = sigma_data**2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1 / (s2 + d2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def broadcast_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Sigma as a float32 tensor of shape [N, 1, 1, ...] matching ``x``."""
    if torch.is_tensor(sigma):
        sigma = sigma.to(device=x.device, dtype=torch.float32)
    else:  # a Python number (the generator's sigma_max): a fill on the device, no host copy/sync
        sigma = torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def freeze_in_dtype(module: nn.Module, device, dtype: torch.dtype | None) -> nn.Module:
    """Move a frozen network to ``device`` with only its *weights* in ``dtype``.

    ``module.to(device, dtype)`` would cast every floating buffer too: a noise schedule stored as
    a buffer (SD's ``abar``/``sigmas``, Fourier frequencies) would become bf16, collapsing
    neighbouring timesteps and biasing the x0 conversion. Buffers keep their dtype (fp32);
    autocast, or the wrapper itself, casts at the point of use.
    """
    module.to(device)
    if dtype is not None:
        for p in module.parameters():
            p.data = p.data.to(dtype)
    return module.eval().requires_grad_(False)


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's loss weight (sigma^-2 + sigma_data^-2): unit effective weight at every noise level."""
    return sigma.pow(-2) + sigma_data**-2


class Denoiser(nn.Module):
    """What every teacher's network is used through: ``D(x_sigma, sigma, cond) -> x0`` on
    ``x_sigma = x0 + sigma * eps``, with ``sigma_min``, ``sigma_max`` and ``sigma_data``.

    These hooks have the defaults of a continuous-time (EDM) teacher; a discrete-time teacher
    (Stable Diffusion) overrides them:

    - ``input_scale_at(sigma)``: what a generator whose first step is at ``sigma`` multiplies
      its unit noise by (``sigma``; SD: ``1/sqrt(abar_t)``, i.e. the noise *is* x_t, the input
      a diffusers pipeline gives its UNet);
    - ``step_sigmas(values)``: a generator's denoising steps as the user names them (sigmas;
      SD: integer timesteps) turned into sigmas;
    - ``training_sigmas(levels)``: the DM loss's noise-level grid (DMD's grid of ``levels``
      levels; SD: its own timesteps);
    - ``loss_weight(sigma)``: the fake score's denoising-loss weight (EDM's; SD: the weight that
      makes it the UNet's own eps- or v-MSE);
    - ``bottleneck()``: the module whose output the GAN head of DMD2 reads (the backbone's).
    """

    sigma_min: float
    sigma_max: float
    sigma_data: float = 0.5

    step_unit = "sigma"  # what --denoising-steps lists for this teacher

    def input_scale_at(self, sigma: float) -> float:
        return float(sigma)

    def step_sigmas(self, values: list[float]) -> list[float]:
        """Sigmas of a generator's steps, checked to lie in the teacher's range (their order is
        checked where the steps are parsed and by :class:`StepGenerator`)."""
        sig = [float(v) for v in values]
        lo, hi = float(self.sigma_min), float(self.sigma_max)
        bad = [v for v in sig if not lo <= v <= hi * (1 + 1e-6)]
        if bad:
            raise ValueError(f"sigmas must lie in [{lo:g}, {hi:g}], got {bad[0]:g}")
        return sig

    def bottleneck(self) -> nn.Module:
        fn = getattr(getattr(self, "backbone", None), "bottleneck", None)
        if fn is None:
            raise ValueError(f"{type(self).__name__} exposes no bottleneck features for a GAN head")
        return fn()

    def training_sigmas(self, levels: int) -> torch.Tensor:
        return dmd_sigma_grid(self.sigma_min, self.sigma_max, levels)

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return edm_weight(sigma, self.sigma_data)


class EDMPrecond(Denoiser):
    """Wraps a raw backbone ``F(c_in * x, c_noise, cond)`` into an EDM denoiser.

    The backbone sees inputs of unit variance and predicts a scaled residual; the wrapper owns
    sigma_data and the sigma range, so samplers and losses never see the backbone directly.
    """

    def __init__(
        self,
        backbone: nn.Module,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ):
        super().__init__()
        self.backbone = backbone
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond=None) -> torch.Tensor:
        sigma = broadcast_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        dtype = x.dtype
        f = self.backbone((c_in * x).to(dtype), c_noise.flatten(), cond)
        return (c_skip * x + c_out * f.to(torch.float32)).to(dtype)


class FlowDenoiser(Denoiser):
    """A flow-matching (rectified-flow) velocity network as ``D(x_sigma, sigma, cond) -> x0``.

    The network predicts ``v = eps - x0`` on ``x_t = (1 - t) x0 + t eps``, t in [0, 1], so
    ``x0 = x_t - t v``. The same noisy sample in dmdctl's convention is
    ``x_sigma = x_t / (1 - t) = x0 + sigma eps`` with ``sigma = t / (1 - t)``: exact both ways,
    for every t < 1. t = 1 (pure noise, where a flow generator starts) is sigma = inf; there
    the input is taken to be x_t itself (``input_scale_at(inf) = 1``): the generator's first step
    ``x0 = z - v(z, 1)`` is then exactly one Euler step of the flow from t = 1 to 0, which is what
    diffusers' ``FlowMatchEulerDiscreteScheduler`` runs in one step.

    The network (``backbone``, as for :class:`EDMPrecond`) is called as
    ``backbone(x_t, t * time_scale, cond)`` and returns the velocity (SD3's transformer takes
    ``1000 t``). The DM loss's grid is the teacher's training timesteps ``i / levels``
    (i = 1..levels-1; pure noise left out), mapped through the schedule's ``shift``.
    """

    step_unit = "t"

    def __init__(
        self,
        backbone: nn.Module | None,
        time_scale: float = 1.0,
        shift: float = 1.0,
        levels: int = 1000,
        sigma_data: float = 0.5,
    ):
        super().__init__()
        self.backbone = backbone
        self.time_scale = float(time_scale)
        self.levels = int(levels)
        self.sigma_data = float(sigma_data)
        self.set_shift(shift)
        self.sigma_max = math.inf

    def set_shift(self, shift: float) -> None:
        """The time shift of the training grid (the DM loss's and the fake score's levels;
        ``distill --flow-shift`` sets a recipe's instead of the scheduler's)."""
        self.shift = float(shift)
        t_min = float(flow_shift(torch.tensor(1.0 / self.levels, dtype=torch.float64), self.shift))
        self.sigma_min = t_min / (1 - t_min)

    @staticmethod
    def t_of(sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (1 + 1 / sigma)  # 1 at sigma = inf

    def input_scale_at(self, sigma: float) -> float:
        """Pure noise is x_t at the first step's t: ``x_sigma = z / (1 - t) = (1 + sigma) z``;
        at t = 1 the input is the noise itself (see the class docstring)."""
        return 1.0 if math.isinf(sigma) else 1.0 + float(sigma)

    def step_sigmas(self, values: list[float]) -> list[float]:
        """Steps given as t in (0, 1] (1: pure noise), as sigmas."""
        bad = [v for v in values if not 0 < float(v) <= 1]
        if bad:
            raise ValueError(f"flow-matching steps are t values in (0, 1], got {bad[0]:g}")
        return [math.inf if float(v) == 1 else float(v) / (1 - float(v)) for v in values]

    def training_sigmas(self, levels: int) -> torch.Tensor:
        """The teacher's own training timesteps, shifted, as ascending sigmas (``levels`` does
        not apply)."""
        i = torch.arange(1, self.levels, dtype=torch.float64)
        t = flow_shift(i / self.levels, self.shift)
        return (t / (1 - t)).float()

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """``|v_pred - v|^2 = |x0_pred - x0|^2 / t^2``: the weight that makes the fake score's
        loss the flow-matching (velocity) loss the teacher was trained with."""
        return self.t_of(sigma.float()).pow(-2)

    def step_values(self, sigmas: list[float]) -> list[float]:
        """A generator's steps as t values (1.0 for pure noise)."""
        return [1.0 if math.isinf(s) else round(float(s) / (1 + float(s)), 6) for s in sigmas]

    def velocity_at(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """The network's velocity (float32) on ``x_t`` at times ``t`` ([N] or scalar)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).reshape(-1)
        t = t.expand(x_t.shape[0]) if t.numel() == 1 else t
        return self.backbone(x_t, t * self.time_scale, cond).float()

    def forward(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        s = broadcast_sigma(sigma, x)
        t = self.t_of(s)
        x_t = torch.where(torch.isinf(s), x.float(), x.float() * (1 - t))
        v = self.velocity_at(x_t.to(x.dtype), t.flatten(), cond)
        return (x_t - t * v).to(x.dtype)


class StepGenerator(nn.Module):
    """DMD's one-step generator and DMD2's few-step generator, over the teacher's denoiser.

    ``sigmas`` are its steps, decreasing. The first step denoises pure noise:
    ``x0 = D(input_scale * z, sigmas[0])``; each next step k renoises the estimate to its level
    and denoises again, ``x0 = D(x0 + sigmas[k] * eps_k, sigmas[k])``, with fresh noise eps_k
    (for SD exactly ``LCMScheduler``'s step: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps). One
    step at ``sigma_max`` is DMD's ``G(z) = D(sigma_max z)``; one step at a lower level is DMD2's
    "conditioning timestep" (SDXL one-step: t = 399 on pure noise).
    """

    def __init__(self, denoiser: nn.Module, sigmas: list[float]):
        super().__init__()
        self.denoiser = denoiser
        sigmas = [float(s) for s in sigmas]
        if not sigmas or any(b >= a for a, b in zip(sigmas, sigmas[1:], strict=False)):
            raise ValueError(f"a generator's sigmas must be decreasing, got {sigmas}")
        self.sigmas = sigmas
        self.sigma_max = sigmas[0]  # the first step's level (the one-step generator's only one)
        # discrete-time teachers (SD) take pure noise as x_t itself: x_sigma = z / sqrt(abar_t),
        # slightly more than sigma * z; the same input a diffusers pipeline gives its UNet
        self.input_scale = float(denoiser.input_scale_at(sigmas[0]))

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    def forward(self, z: torch.Tensor, cond=None, noise=None, at=None) -> torch.Tensor:
        """Samples from unit noise ``z``; ``noise`` holds the K-1 renoising draws of a K-step
        generator (a sequence of tensors like ``z``).

        With ``at`` (one sigma per sample) it is one denoising step on inputs ``z`` already at
        those levels: what training differentiates through (backward simulation made them).
        """
        if at is not None:
            return self.denoiser(z, at, cond)
        x = self.denoiser(z * self.input_scale, self.sigmas[0], cond)
        if len(self.sigmas) > 1:
            if noise is None or len(noise) < len(self.sigmas) - 1:
                raise ValueError(f"a {len(self.sigmas)}-step generator needs renoising draws")
            for s, eps in zip(self.sigmas[1:], noise, strict=False):
                x = self.denoiser(x + s * eps.to(x.dtype), s, cond)
        return x

    def sample(self, seeds, cond, shape, device) -> torch.Tensor:
        """Samples for the given seeds (each seed's RNG draws its noise, then each step's)."""
        noise = seeded_noise_draws(seeds, shape, self.num_steps, device)
        return self(noise[0], cond, noise[1:])


class OneStepGenerator(StepGenerator):
    """DMD's generator: the denoiser evaluated at sigma_max on pure noise, ``G(z) = D(sigma_max z)``."""

    def __init__(self, denoiser: nn.Module, sigma_max: float):
        super().__init__(denoiser, [sigma_max])


def fourier_embedding(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """[sin, cos] of ``2 pi x @ freqs``; used by small backbones to see fine structure."""
    proj = 2 * math.pi * x @ freqs
    return torch.cat([proj.sin(), proj.cos()], dim=-1)
