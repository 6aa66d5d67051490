"""Noise schedules and deterministic samplers, as small pure functions over a denoiser."""

from __future__ import annotations

from collections.abc import Callable

import torch

Denoiser = Callable[..., torch.Tensor]


def karras_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """The EDM schedule: ``num_steps`` decreasing sigmas from sigma_max to sigma_min, then 0.

    Computed in float64 (rounding in float32 shifts the smallest sigmas visibly).
    """
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    if num_steps == 1:
        ramp = torch.zeros(1, dtype=torch.float64)
    else:
        ramp = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def heun_nfe(num_steps: int) -> int:
    """Network evaluations of :func:`heun_sample`: 2N - 1 (no correction on the last step)."""
    return 2 * num_steps - 1


@torch.no_grad()
def heun_sample(
    denoiser: Denoiser, z: torch.Tensor, sigmas: torch.Tensor, cond=None
) -> torch.Tensor:
    """Deterministic Heun (2nd order) ODE sampler of EDM, starting at ``x = z * sigmas[0]``.

    With ``sigmas = karras_sigmas(1, ...)`` this is one Euler step: ``D(z * sigma_max)``.
    """
    sig = [float(s) for s in sigmas]
    x = z.to(torch.float64) * sig[0]
    for s, s_next in zip(sig[:-1], sig[1:], strict=True):
        d = (x - denoiser(x.to(z.dtype), s, cond).to(torch.float64)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = (x_next - denoiser(x_next.to(z.dtype), s_next, cond).to(torch.float64)) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d2)
        x = x_next
    return x.to(z.dtype)


def seeded_noise(
    seeds: list[int] | torch.Tensor, shape: tuple[int, ...], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One RNG per seed (as in EDM): any sample can be regenerated alone from its seed."""
    return seeded_noise_draws(seeds, shape, 1, device)[0]


def seeded_noise_draws(
    seeds: list[int] | torch.Tensor,
    shape: tuple[int, ...],
    draws: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[draws, N, *shape]``: per seed, one RNG drawing its starting noise and then each later
    step's renoising noise, in that order: the order in which a diffusers pipeline with
    ``generator=torch.Generator().manual_seed(seed)`` draws its latents and then LCMScheduler's
    noise (so an exported few-step generator gives the same images)."""
    out = torch.empty((draws, len(seeds), *shape), dtype=torch.float32)
    gen = torch.Generator()
    # normal_ in place on each row draws exactly what torch.randn(shape) draws, at half the
    # per-seed cost (no temporary, no indexed copy): it is most of make-pairs' overhead on toy2d
    if draws == 1:  # one row per seed: the plain loop is ~30% cheaper per seed (make-pairs)
        for row, s in zip(out[0].unbind(0), seeds, strict=True):
            gen.manual_seed(int(s))
            row.normal_(generator=gen)
        return out.to(device)
    # each draw its own call: one normal_ over [draws, ...] draws other numbers for some shapes
    for rows, s in zip(out.unbind(1), seeds, strict=True):
        gen.manual_seed(int(s))
        for row in rows.unbind(0):
            row.normal_(generator=gen)
    return out.to(device)


def dmd_sigma_grid(
    sigma_min: float, sigma_max: float, levels: int = 1000, rho: float = 7.0
) -> torch.Tensor:
    """A discrete grid of ``levels`` noise levels, ascending, on the Karras curve.

    DMD draws its noise level as an index into a grid like this (the teacher's "timesteps"),
    restricted to roughly the 2%..98% range of indices.
    """
    return karras_sigmas(levels, sigma_min, sigma_max, rho)[:-1].flip(0).float()


def class_labels(seeds: list[int], seed_start: int, num_classes: int) -> torch.Tensor:
    """Balanced labels, a function of the seed alone (so any pair can be regenerated)."""
    if num_classes <= 0:
        return torch.full((len(seeds),), -1, dtype=torch.int64)
    return torch.tensor([(s - seed_start) % num_classes for s in seeds], dtype=torch.int64)


class HeunSampler:
    """The deterministic sampler of the built-in and EDM teachers: Heun's method on the Karras
    schedule with ``steps`` levels (NFE = 2N-1). ``settings`` describes it for a pairs manifest."""

    def __init__(self, denoiser, steps: int, rho: float = 7.0):
        self.denoiser = denoiser
        sigma_min, sigma_max = float(denoiser.sigma_min), float(denoiser.sigma_max)
        self.sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
        self.nfe = heun_nfe(steps)
        self.settings = {
            "name": "heun",
            "steps": steps,
            "nfe": self.nfe,
            "sigma_min": sigma_min,
            "sigma_max": sigma_max,
            "rho": rho,
        }

    def __call__(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        return heun_sample(self.denoiser, z, self.sigmas, cond)


def flow_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift of flow-matching schedules (SD3: 3.0): ``s t / (1 + (s - 1) t)``."""
    return shift * t / (1 + (shift - 1) * t)


def flow_times(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """``num_steps`` decreasing times from 1 (pure noise), uniform before the shift, then 0
    (float64), as diffusers' FlowMatchEulerDiscreteScheduler spaces them."""
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    t = torch.arange(num_steps, 0, -1, dtype=torch.float64) / num_steps
    return torch.cat([flow_shift(t, shift), torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def flow_heun_sample(denoiser, z: torch.Tensor, times: torch.Tensor, cond=None) -> torch.Tensor:
    """Heun's method on a flow teacher's ODE ``dx_t/dt = v`` from ``x_1 = z`` (no correction on
    the last step, as EDM's Heun). One step is one Euler step: ``z - v(z, 1)``."""
    ts = [float(t) for t in times]
    x = z.to(torch.float64)
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        v = denoiser.velocity_at(x.to(z.dtype), t, cond).to(torch.float64)
        x_next = x + (t_next - t) * v
        if t_next > 0:
            v2 = denoiser.velocity_at(x_next.to(z.dtype), t_next, cond).to(torch.float64)
            x_next = x + (t_next - t) * 0.5 * (v + v2)
        x = x_next
    return x.to(z.dtype)


class FlowHeunSampler:
    """The deterministic sampler of flow-matching teachers: Heun on the flow's ODE in t, over
    ``steps`` intervals from t = 1 (NFE = 2N-1)."""

    def __init__(self, denoiser, steps: int):
        self.denoiser = denoiser
        self.times = flow_times(steps, float(getattr(denoiser, "shift", 1.0)))
        self.nfe = heun_nfe(steps)
        self.settings = {"name": "flow-heun", "steps": steps, "nfe": self.nfe}

    def __call__(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        return flow_heun_sample(self.denoiser, z, self.times, cond)


def teacher_sampler(denoiser, steps: int, rho: float = 7.0):
    """The teacher's own deterministic sampler: Heun on the Karras schedule (EDM-style
    teachers; ``rho`` shapes its schedule) or Heun on the flow ODE (flow-matching teachers)."""
    if getattr(denoiser, "step_unit", "sigma") == "t":
        return FlowHeunSampler(denoiser, steps)
    return HeunSampler(denoiser, steps, rho)
