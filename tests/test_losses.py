"""DMD's distribution matching loss, the EDM denoising loss and the regression losses."""

from __future__ import annotations

import math

import pytest
import torch

from dmdctl.core.losses import dm_loss, dm_normaliser, edm_denoising_loss, regression_loss


def normaliser(x: torch.Tensor, mu_real: torch.Tensor) -> torch.Tensor:
    """w = 1 / mean over C, H, W of |x - mu_real|, one value per sample, shaped [N, 1, 1, 1]."""
    n = x.shape[0]
    w = torch.stack([1.0 / (x[i] - mu_real[i]).abs().mean() for i in range(n)])
    return w.reshape(n, 1, 1, 1)


def batch(seed: int = 0, shape=(4, 3, 5, 5)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    mu_real = x + 0.3 * torch.randn(shape, generator=gen)
    mu_fake = x + 0.3 * torch.randn(shape, generator=gen)
    return x, mu_real, mu_fake


# ---------------------------------------------------------------- dm_loss


def test_dm_loss_gradient_is_normalised_score_difference():
    x, mu_real, mu_fake = batch()
    # scale the samples differently so that a wrong (global) normaliser would show
    x = x * torch.tensor([0.2, 1.0, 3.0, 10.0]).reshape(-1, 1, 1, 1)
    mu_real = x + torch.randn_like(x) * torch.tensor([0.01, 0.1, 1.0, 2.0]).reshape(-1, 1, 1, 1)
    x = x.clone().requires_grad_(True)
    loss = dm_loss(x, mu_real, mu_fake)
    assert loss.ndim == 0
    (grad,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        want = (mu_fake - mu_real) * normaliser(x, mu_real) / x.numel()
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6 / x.numel())
    # the per-sample weighting is really per sample
    w = normaliser(x.detach(), mu_real).flatten()
    assert w.max() / w.min() > 10


def test_dm_loss_value_is_half_mean_squared_gradient():
    x, mu_real, mu_fake = batch(1)
    g = (mu_fake - mu_real) * normaliser(x, mu_real)
    assert dm_loss(x, mu_real, mu_fake).item() == pytest.approx(
        0.5 * (g**2).mean().item(), rel=1e-5
    )


def test_dm_loss_stops_gradient_into_teacher_outputs():
    x, mu_real, mu_fake = batch(2)
    x = x.clone().requires_grad_(True)
    mu_real = mu_real.clone().requires_grad_(True)
    mu_fake = mu_fake.clone().requires_grad_(True)
    dm_loss(x, mu_real, mu_fake).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for t in (mu_real, mu_fake):
        assert t.grad is None or torch.count_nonzero(t.grad) == 0


def test_dm_loss_descends_towards_real_score():
    # a step of gradient descent on x moves it by -(mu_fake - mu_real) * w: towards mu_real
    x, mu_real, _ = batch(3)
    mu_fake = x.clone()  # fake score says "stay", real score pulls towards mu_real
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(dm_loss(x, mu_real, mu_fake), x)
    before = (x.detach() - mu_real).abs().mean()
    after = (x.detach() - 100.0 * grad - mu_real).abs().mean()
    assert after < before


def test_dm_normaliser_finite_when_sample_equals_real_score():
    x, mu_real, mu_fake = batch(4)
    mu_real[1] = x[1]  # sample 1: x == mu_real exactly, mean |x - mu_real| = 0
    w = dm_normaliser(x, mu_real)
    assert w.shape == (4, 1, 1, 1)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w[[0, 2, 3]], normaliser(x, mu_real)[[0, 2, 3]], rtol=1e-5, atol=0)
    xg = x.clone().requires_grad_(True)
    loss = dm_loss(xg, mu_real, mu_fake)
    assert torch.isfinite(loss)
    (grad,) = torch.autograd.grad(loss, xg)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("which", ["mu_real", "mu_fake"])
def test_dm_loss_finite_with_nan_in_score_estimates(which):
    x, mu_real, mu_fake = batch(5)
    target = mu_real if which == "mu_real" else mu_fake
    target[2, 1, 3, 3] = float("nan")
    xg = x.clone().requires_grad_(True)
    loss = dm_loss(xg, mu_real, mu_fake)
    assert torch.isfinite(loss)
    (grad,) = torch.autograd.grad(loss, xg)
    assert torch.isfinite(grad).all()
    # the samples without NaN keep their exact gradient
    want = (mu_fake - mu_real) * normaliser(x, mu_real) / x.numel()
    torch.testing.assert_close(grad[[0, 1, 3]], want[[0, 1, 3]], rtol=1e-4, atol=1e-9)
    assert torch.isfinite(dm_normaliser(x, mu_real)).all()


def test_dm_loss_half_precision_inputs():
    x, mu_real, mu_fake = batch(6)
    xh = x.half().requires_grad_(True)
    loss = dm_loss(xh, mu_real.half(), mu_fake.half())
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, xh)
    # the loss is computed in float32 from the half inputs; only the returned gradient is
    # rounded to half (its smallest values are subnormal, spacing 6e-8)
    xr, rr, fr = x.half().float(), mu_real.half().float(), mu_fake.half().float()
    want = (fr - rr) * normaliser(xr, rr) / x.numel()
    torch.testing.assert_close(grad.float(), want, rtol=1e-2, atol=1e-7)


# ---------------------------------------------------------------- edm_denoising_loss


def test_edm_denoising_loss_perfect_denoiser_is_zero():
    x, _, _ = batch(7)
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0])
    noise = torch.randn_like(x)
    seen = []

    def perfect(xn, s, cond=None):
        # a point mass at x: the denoiser recovers x from any noisy version of it
        seen.append((xn.clone(), s, cond))
        return x.clone()

    loss = edm_denoising_loss(perfect, x, sigma, noise, cond="c", sigma_data=0.5)
    assert loss.item() == 0.0
    # the denoiser was given x + sigma * noise with per-sample sigma
    xn, s, cond = seen[0]
    torch.testing.assert_close(xn, x + sigma.reshape(-1, 1, 1, 1) * noise)
    assert cond == "c"


@pytest.mark.parametrize("sd", [0.5, 1.3])
def test_edm_denoising_loss_zero_denoiser(sd):
    x, _, _ = batch(8)
    sigma = torch.tensor([0.02, 0.5, 2.0, 40.0])
    loss = edm_denoising_loss(
        lambda xn, s, c: torch.zeros_like(xn), x, sigma, torch.randn_like(x), sigma_data=sd
    )
    per_sample = [
        (s**-2 + sd**-2) * (x[i].double() ** 2).mean().item() for i, s in enumerate(sigma.tolist())
    ]
    want = sum(per_sample) / len(per_sample)
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_edm_denoising_loss_known_error():
    # D off by a constant c everywhere: loss = mean_i (s_i^-2 + sd^-2) * c^2
    x, _, _ = batch(9)
    sigma = torch.tensor([0.1, 0.2, 0.4, 0.8])
    c = 0.25
    loss = edm_denoising_loss(
        lambda xn, s, cond: x + c, x, sigma, torch.randn_like(x), sigma_data=0.5
    )
    want = sum((s**-2 + 0.5**-2) * c**2 for s in sigma.tolist()) / 4
    assert loss.item() == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------- regression_loss


def test_regression_l2():
    pred, target, _ = batch(10)
    want = sum(((pred[i] - target[i]) ** 2).mean().item() for i in range(4)) / 4
    assert regression_loss("l2", pred, target).item() == pytest.approx(want, rel=1e-5)
    assert regression_loss("l2", pred, pred).item() == 0.0


@pytest.mark.parametrize("c", [0.03, 1.0])
def test_regression_pseudo_huber(c):
    pred, target, _ = batch(11)
    pred = pred * torch.tensor([0.01, 0.1, 1.0, 5.0]).reshape(-1, 1, 1, 1)
    per = [
        math.sqrt(((pred[i].double() - target[i].double()) ** 2).mean().item() + c**2) - c
        for i in range(4)
    ]
    got = regression_loss("pseudo-huber", pred, target, huber_c=c)
    assert got.item() == pytest.approx(sum(per) / 4, rel=1e-5)
    assert regression_loss("pseudo-huber", pred, pred, huber_c=c).item() == pytest.approx(
        0.0, abs=1e-7
    )


def test_regression_pseudo_huber_limits():
    # tiny error: ~ d^2 / (2c) (like l2); large error: ~ sqrt(mean d^2) (like l1 on the norm)
    pred = torch.zeros(1, 1, 2, 2)
    small, big = torch.full_like(pred, 1e-3), torch.full_like(pred, 100.0)
    c = 0.03
    assert regression_loss("pseudo-huber", pred, small, huber_c=c).item() == pytest.approx(
        1e-6 / (2 * c), rel=1e-2
    )
    assert regression_loss("pseudo-huber", pred, big, huber_c=c).item() == pytest.approx(
        100.0, rel=1e-3
    )


def test_regression_gradients_flow_to_prediction():
    pred, target, _ = batch(12)
    for kind in ("l2", "pseudo-huber"):
        p = pred.clone().requires_grad_(True)
        regression_loss(kind, p, target).backward()
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_regression_unknown_kind():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="huber2"):
        regression_loss("huber2", x, x)


def test_regression_lpips_needs_module():
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError):
        regression_loss("lpips", x, x)
    got = regression_loss("lpips", x, x + 1, lpips_fn=lambda a, b: (a - b).abs().flatten(1).mean(1))
    assert got.item() == pytest.approx(1.0)
