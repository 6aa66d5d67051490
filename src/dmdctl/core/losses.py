"""The losses of DMD (docs/METHOD.md sections 4-5) as pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmdctl.core.denoiser import broadcast_sigma, edm_weight


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def dm_normaliser(x: torch.Tensor, mu_real: torch.Tensor) -> torch.Tensor:
    """w = 1 / mean_{C,H,W} |x - mu_real|, in fp32, guarded against 0 and NaN."""
    scale = _per_sample_mean((x.float() - mu_real.float()).abs())
    scale = torch.nan_to_num(scale, nan=1.0).clamp_min(1e-8)
    return (1.0 / scale).reshape(-1, *([1] * (x.ndim - 1)))


def dm_loss(x: torch.Tensor, mu_real: torch.Tensor, mu_fake: torch.Tensor) -> torch.Tensor:
    """Distribution matching loss with the stop-gradient trick.

    ``0.5 * mean((x - stopgrad(x - grad))^2)`` with ``grad = (mu_fake - mu_real) * w``, so that
    ``d loss / d x = grad / x.numel()``: the KL gradient, carried into the generator.
    """
    grad = (mu_fake.float() - mu_real.float()) * dm_normaliser(x, mu_real)
    grad = torch.nan_to_num(grad)
    target = (x.float() - grad).detach()
    return 0.5 * F.mse_loss(x.float(), target, reduction="mean")


def edm_denoising_loss(
    denoiser,
    x: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    cond=None,
    sigma_data: float = 0.5,
    weight_fn=None,
) -> torch.Tensor:
    """Denoising score matching, mean over the batch.

    EDM weighting by default; ``weight_fn(sigma)`` replaces it (SD: ``sigma^-2`` makes this
    exactly the eps-prediction MSE the UNet was trained with).
    """
    s = broadcast_sigma(sigma, x)
    pred = denoiser(x + s * noise, sigma, cond)
    return denoising_error(pred, x, sigma, sigma_data, weight_fn)


def denoising_error(
    pred: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_data: float = 0.5,
    weight_fn=None,
) -> torch.Tensor:
    """The weighted error of a denoiser's prediction ``pred`` of ``x`` at levels ``sigma``."""
    per = _per_sample_mean((pred.float() - x.float()) ** 2)
    w = weight_fn(sigma.float()) if weight_fn is not None else edm_weight(sigma.float(), sigma_data)
    return (w * per).mean()


def regression_loss(
    kind: str, pred: torch.Tensor, target: torch.Tensor, huber_c: float = 0.03, lpips_fn=None
) -> torch.Tensor:
    """Regression of G(z) onto the teacher's ODE output y for the same noise, mean over the batch.

    ``l2``: per-sample mean squared error. ``pseudo-huber``: sqrt(||d||^2/D + c^2) - c per sample
    (as in consistency models / DMD2). ``lpips``: the given LPIPS module on images.
    """
    if kind == "l2":
        return _per_sample_mean((pred.float() - target.float()) ** 2).mean()
    if kind == "pseudo-huber":
        d2 = _per_sample_mean((pred.float() - target.float()) ** 2)
        return (torch.sqrt(d2 + huber_c**2) - huber_c).mean()
    if kind == "lpips":
        if lpips_fn is None:
            raise ValueError("lpips regression needs an LPIPS module")
        return lpips_fn(pred, target).mean()
    raise ValueError(f"unknown regression loss {kind!r}")
