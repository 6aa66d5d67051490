"""Noise schedules and the Heun sampler, checked against closed forms written out here."""

from __future__ import annotations

import math

import pytest
import torch

from dmdctl.core.sampling import (
    class_labels,
    dmd_sigma_grid,
    heun_nfe,
    heun_sample,
    karras_sigmas,
    seeded_noise,
)

SMIN, SMAX, RHO = 0.002, 80.0, 7.0


def karras_closed_form(i: int, n: int, smin: float, smax: float, rho: float) -> float:
    """The i-th sigma (0-based, i < n) of the EDM schedule, in plain Python floats."""
    hi, lo = smax ** (1.0 / rho), smin ** (1.0 / rho)
    return (hi + i / (n - 1) * (lo - hi)) ** rho


# ---------------------------------------------------------------- karras_sigmas


@pytest.mark.parametrize("n", [2, 5, 18, 40])
def test_karras_sigmas_shape_endpoints_and_order(n):
    s = karras_sigmas(n, SMIN, SMAX, RHO)
    assert s.dtype == torch.float64
    assert s.shape == (n + 1,)
    assert s[-1].item() == 0.0
    assert s[0].item() == pytest.approx(SMAX, rel=1e-12)
    assert s[-2].item() == pytest.approx(SMIN, rel=1e-12)
    assert bool((s[1:] < s[:-1]).all()), "sigmas must be strictly decreasing"


@pytest.mark.parametrize("n,rho", [(18, 7.0), (40, 7.0), (11, 3.0)])
def test_karras_sigmas_match_closed_form(n, rho):
    s = karras_sigmas(n, SMIN, SMAX, rho)
    for i in (1, n // 2, n - 2):
        assert s[i].item() == pytest.approx(karras_closed_form(i, n, SMIN, SMAX, rho), rel=1e-12)


def test_karras_sigmas_other_range():
    s = karras_sigmas(7, 0.01, 5.0, 2.0)
    assert s[0].item() == pytest.approx(5.0, rel=1e-12)
    assert s[-2].item() == pytest.approx(0.01, rel=1e-12)
    assert s[3].item() == pytest.approx(karras_closed_form(3, 7, 0.01, 5.0, 2.0), rel=1e-12)


def test_karras_sigmas_single_step():
    s = karras_sigmas(1, SMIN, SMAX, RHO)
    assert s.tolist() == pytest.approx([SMAX, 0.0], rel=1e-12)
    assert s.shape == (2,)


@pytest.mark.parametrize("n", [0, -1])
def test_karras_sigmas_rejects_fewer_than_one_step(n):
    with pytest.raises(ValueError):
        karras_sigmas(n, SMIN, SMAX, RHO)


# ---------------------------------------------------------------- Heun sampler


class CountingDenoiser:
    def __init__(self, fn):
        self.fn = fn
        self.calls = 0
        self.sigmas: list[float] = []

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        self.sigmas.append(float(sigma))
        return self.fn(x, sigma, cond)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 18])
def test_heun_nfe_and_actual_denoiser_calls(n):
    assert heun_nfe(n) == 2 * n - 1
    d = CountingDenoiser(lambda x, sigma, cond: 0.5 * x)
    z = torch.randn(3, 2, dtype=torch.float64)
    heun_sample(d, z, karras_sigmas(n, SMIN, SMAX, RHO))
    assert d.calls == 2 * n - 1
    # the denoiser is never asked to denoise at sigma = 0
    assert min(d.sigmas) > 0


# per-dimension mean and std of a 2-D Gaussian data distribution
GAUSS_M = torch.tensor([1.5, -0.7], dtype=torch.float64)
GAUSS_S = torch.tensor([0.6, 1.8], dtype=torch.float64)


def gaussian_denoiser(x, sigma, cond=None):
    """The exact E[x0 | x] for x0 ~ N(m, s^2) per dimension, x = x0 + sigma * eps."""
    sigma = float(sigma)
    m, s2 = GAUSS_M.to(x.dtype), (GAUSS_S**2).to(x.dtype)
    return m + s2 / (s2 + sigma**2) * (x - m)


def exact_ode_map(z: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """The probability-flow ODE from sigma_max to 0 for Gaussian data, solved in closed form.

    dx/dsigma = (x - D) / sigma = (x - m) sigma / (s^2 + sigma^2), so (x - m) / sqrt(s^2 + sigma^2)
    is constant along the path.
    """
    x = z * sigma_max
    return GAUSS_M + GAUSS_S / torch.sqrt(GAUSS_S**2 + sigma_max**2) * (x - GAUSS_M)


def euler_sample(denoiser, z, sigmas):
    """A first-order sampler, used only to show that the tolerance below can fail."""
    sig = [float(s) for s in sigmas]
    x = z * sig[0]
    for s, s_next in zip(sig[:-1], sig[1:], strict=True):
        x = x + (s_next - s) * (x - denoiser(x, s)) / s
    return x


def max_err(sampler, z, n):
    return (
        (sampler(gaussian_denoiser, z, karras_sigmas(n, SMIN, SMAX, RHO)) - exact_ode_map(z, SMAX))
        .abs()
        .max()
        .item()
    )


def test_heun_solves_gaussian_ode():
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = exact_ode_map(z, SMAX)
    got = heun_sample(gaussian_denoiser, z, karras_sigmas(40, SMIN, SMAX, RHO))
    assert got.dtype == z.dtype
    assert got.shape == z.shape
    # |x - m| reaches ~250 at sigma_max = 80; 40 Heun steps land within a few hundredths
    tol = 0.05
    assert (got - expected).abs().max().item() < tol
    # the samples really have the data distribution's spread (not collapsed onto the mean)
    assert got.std(dim=0).tolist() == pytest.approx(GAUSS_S.tolist(), rel=0.2)
    # sanity check of the tolerance: a 5-step Euler sampler is visibly wrong
    bad = euler_sample(gaussian_denoiser, z, karras_sigmas(5, SMIN, SMAX, RHO))
    assert (bad - expected).abs().max().item() > 10 * tol
    # and so is a 40-step Euler sampler: the second-order correction matters
    assert max_err(euler_sample, z, 40) > 3 * tol


def test_heun_converges_at_second_order():
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    e40, e80, e320 = (max_err(heun_sample, z, n) for n in (40, 80, 320))
    # doubling the steps divides the error by ~4 for a 2nd-order method (by ~2 for Euler)
    assert 3.0 < e40 / e80 < 5.5
    assert e320 < 1e-3
    eu40, eu80 = (max_err(euler_sample, z, n) for n in (40, 80))
    assert 1.5 < eu40 / eu80 < 2.5


def test_heun_float32_input_keeps_dtype_and_accuracy():
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    expected = exact_ode_map(z.double(), SMAX)
    got = heun_sample(gaussian_denoiser, z, karras_sigmas(40, SMIN, SMAX, RHO))
    assert got.dtype == torch.float32
    assert (got.double() - expected).abs().max().item() < 0.05


def test_heun_single_step_is_denoiser_at_sigma_max():
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = heun_sample(gaussian_denoiser, z, karras_sigmas(1, SMIN, SMAX, RHO))
    expected = gaussian_denoiser(z * SMAX, SMAX)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_heun_passes_cond_to_denoiser():
    seen = []

    def d(x, sigma, cond):
        seen.append(cond)
        return torch.zeros_like(x)

    labels = torch.tensor([3, 1])
    heun_sample(d, torch.randn(2, 2), karras_sigmas(3, SMIN, SMAX, RHO), labels)
    assert len(seen) == 5
    assert all(c is labels for c in seen)


# ---------------------------------------------------------------- noise, grids, labels


def test_seeded_noise_is_per_seed():
    a = seeded_noise([5, 6, 7], (3, 4, 4))
    b = seeded_noise([7], (3, 4, 4))
    assert a.shape == (3, 3, 4, 4)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a[2], b[0], rtol=0, atol=0)
    # same seed, same noise, however often asked
    torch.testing.assert_close(seeded_noise([6], (3, 4, 4))[0], a[1], rtol=0, atol=0)
    # different seeds differ
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[1], a[2])
    # a tensor of seeds works like a list
    torch.testing.assert_close(seeded_noise(torch.tensor([5, 6, 7]), (3, 4, 4)), a)


def test_seeded_noise_looks_standard_normal():
    x = seeded_noise(list(range(8)), (4096,))
    assert abs(x.mean().item()) < 0.02
    assert x.std().item() == pytest.approx(1.0, abs=0.02)


def test_dmd_sigma_grid():
    g = dmd_sigma_grid(SMIN, SMAX, 1000)
    assert g.shape == (1000,)
    assert g.dtype == torch.float32
    assert bool((g[1:] > g[:-1]).all()), "grid must be ascending"
    assert g[0].item() == pytest.approx(SMIN, rel=1e-6)
    assert g[-1].item() == pytest.approx(SMAX, rel=1e-6)
    # index k of the ascending grid is index 999 - k of the (descending) Karras schedule
    assert g[500].item() == pytest.approx(karras_closed_form(499, 1000, SMIN, SMAX, RHO), rel=1e-6)


def test_class_labels_balanced():
    labels = class_labels(list(range(100)), 0, 10)
    assert labels.dtype == torch.int64
    assert labels.shape == (100,)
    assert torch.bincount(labels, minlength=10).tolist() == [10] * 10
    assert int(labels.min()) == 0 and int(labels.max()) == 9


def test_class_labels_depend_on_seed_alone():
    all_labels = class_labels(list(range(1000, 1030)), 1000, 7)
    some = class_labels([1012, 1005], 1000, 7)
    assert some.tolist() == [all_labels[12].item(), all_labels[5].item()]
    # counted from seed_start: the i-th seed of a run gets class i mod num_classes
    assert all_labels.tolist() == [i % 7 for i in range(30)]
    assert torch.bincount(class_labels(list(range(1000, 1070)), 1000, 7)).tolist() == [10] * 7


def test_class_labels_unconditional():
    labels = class_labels([3, 4, 5], 0, 0)
    assert labels.tolist() == [-1, -1, -1]
    assert labels.dtype == torch.int64


def test_closed_form_helper_sanity():
    # the helper itself hits both ends of the range
    assert karras_closed_form(0, 10, SMIN, SMAX, RHO) == pytest.approx(SMAX, rel=1e-12)
    assert karras_closed_form(9, 10, SMIN, SMAX, RHO) == pytest.approx(SMIN, rel=1e-12)
    assert math.isfinite(karras_closed_form(4, 10, SMIN, SMAX, RHO))
