"""EDM preconditioning and the one-step generator, checked against the paper's formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dmdctl.core.denoiser import (
    Denoiser,
    EDMPrecond,
    OneStepGenerator,
    broadcast_sigma,
    edm_scalings,
)


def reference_scalings(s: float, sd: float) -> tuple[float, float, float, float]:
    """Karras et al. 2022, Table 1, in plain Python floats."""
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / math.sqrt(s**2 + sd**2)
    c_in = 1 / math.sqrt(s**2 + sd**2)
    c_noise = math.log(s) / 4
    return c_skip, c_out, c_in, c_noise


@pytest.mark.parametrize("sd", [0.5, 1.0])
@pytest.mark.parametrize("s", [0.002, 0.1, 0.5, 1.0, 3.7, 80.0])
def test_edm_scalings_match_table_1(s, sd):
    got = edm_scalings(torch.tensor(s, dtype=torch.float64), sd)
    want = reference_scalings(s, sd)
    for name, g, w in zip(("c_skip", "c_out", "c_in", "c_noise"), got, want, strict=True):
        assert g.item() == pytest.approx(w, rel=1e-12, abs=1e-15), name


def test_edm_scalings_at_sigma_data():
    sd = 0.5
    c_skip, c_out, c_in, c_noise = edm_scalings(torch.tensor(sd, dtype=torch.float64), sd)
    assert c_skip.item() == pytest.approx(0.5, rel=1e-12)
    assert c_out.item() == pytest.approx(sd / math.sqrt(2), rel=1e-12)
    assert c_in.item() == pytest.approx(1 / (sd * math.sqrt(2)), rel=1e-12)
    assert c_noise.item() == pytest.approx(math.log(sd) / 4, rel=1e-12)


def test_edm_scalings_limits():
    # tiny sigma: D ~ x (skip dominates); huge sigma: D ~ network output (skip vanishes)
    c_skip, c_out, _, _ = edm_scalings(torch.tensor([1e-4, 1e4], dtype=torch.float64), 0.5)
    assert c_skip[0].item() == pytest.approx(1.0, abs=1e-6)
    assert c_out[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert c_skip[1].item() == pytest.approx(0.0, abs=1e-6)
    assert c_out[1].item() == pytest.approx(0.5, rel=1e-6)


def test_edm_scalings_vectorised():
    sig = torch.tensor([0.01, 0.5, 2.0, 40.0], dtype=torch.float64)
    got = edm_scalings(sig, 0.5)
    for i, s in enumerate(sig.tolist()):
        want = reference_scalings(s, 0.5)
        for g, w in zip(got, want, strict=True):
            assert g[i].item() == pytest.approx(w, rel=1e-12)


class RecordingBackbone(nn.Module):
    """F(x_in, c_noise, cond): records its inputs and returns a fixed function of them."""

    def __init__(self, fn=None):
        super().__init__()
        self.fn = fn
        self.inputs: list[tuple[torch.Tensor, torch.Tensor, object]] = []

    def forward(self, x_in, c_noise, cond=None):
        self.inputs.append((x_in.clone(), c_noise.clone(), cond))
        if self.fn is None:
            return torch.zeros_like(x_in)
        return self.fn(x_in, c_noise)


def expected_scalings(sigmas: list[float], sd: float, ndim: int) -> list[torch.Tensor]:
    """The four scalings as float32 tensors of shape [N, 1, 1, ...] for broadcasting."""
    cols = list(zip(*(reference_scalings(s, sd) for s in sigmas), strict=True))
    shape = (-1,) + (1,) * (ndim - 1)
    return [torch.tensor(c, dtype=torch.float32).reshape(shape) for c in cols]


def test_edm_precond_inputs_and_output_per_sample_sigma():
    torch.manual_seed(0)
    sd = 0.5
    x = torch.randn(3, 2, 4, 4) * 5
    sigmas = [0.05, 0.5, 20.0]
    # an arbitrary nonlinear "network" of its inputs
    backbone = RecordingBackbone(lambda xi, cn: torch.tanh(xi) + cn.reshape(-1, 1, 1, 1))
    d = EDMPrecond(backbone, sigma_data=sd)
    out = d(x, torch.tensor(sigmas), cond="labels")

    c_skip, c_out, c_in, c_noise = expected_scalings(sigmas, sd, x.ndim)
    assert len(backbone.inputs) == 1
    x_in, cn, cond = backbone.inputs[0]
    torch.testing.assert_close(x_in, c_in * x, rtol=1e-6, atol=1e-6)
    assert cn.shape == (3,), "c_noise is one value per sample"
    torch.testing.assert_close(cn, c_noise.flatten(), rtol=1e-6, atol=1e-7)
    assert cond == "labels"

    f = torch.tanh(c_in * x) + c_noise
    torch.testing.assert_close(out, c_skip * x + c_out * f, rtol=1e-5, atol=1e-5)
    assert out.shape == x.shape
    assert out.dtype == x.dtype


def test_edm_precond_scalar_sigma_broadcasts():
    sd = 1.0
    x = torch.randn(4, 3, 2, 2)
    backbone = RecordingBackbone(lambda xi, cn: xi * 2)
    d = EDMPrecond(backbone, sigma_data=sd)
    out_float = d(x, 2.5)
    out_tensor = d(x, torch.tensor(2.5))
    c_skip, c_out, c_in, c_noise = reference_scalings(2.5, sd)
    want = c_skip * x + c_out * 2 * c_in * x
    torch.testing.assert_close(out_float, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_tensor, want, rtol=1e-5, atol=1e-6)
    # the backbone still sees one c_noise per sample
    for _, cn, _ in backbone.inputs:
        assert cn.shape == (4,)
        torch.testing.assert_close(cn, torch.full((4,), c_noise), rtol=1e-6, atol=1e-7)


def test_edm_precond_zero_backbone_is_skip_only():
    sd = 0.5
    x = torch.randn(5, 1, 3, 3)
    sigmas = [0.002, 0.1, 0.5, 7.0, 80.0]
    d = EDMPrecond(RecordingBackbone(), sigma_data=sd)
    out = d(x, torch.tensor(sigmas))
    c_skip = expected_scalings(sigmas, sd, x.ndim)[0]
    torch.testing.assert_close(out, c_skip * x, rtol=1e-6, atol=1e-7)
    # at sigma == sigma_data exactly half of x is kept
    torch.testing.assert_close(out[2], 0.5 * x[2], rtol=1e-6, atol=1e-7)


def test_edm_precond_per_sample_sigma_matches_one_at_a_time():
    torch.manual_seed(1)
    net = nn.Conv2d(2, 2, 3, padding=1)

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x_in, c_noise, cond=None):
            return self.net(x_in) * c_noise.reshape(-1, 1, 1, 1).cos()

    d = EDMPrecond(Backbone(), sigma_data=0.5)
    x = torch.randn(4, 2, 5, 5)
    sig = torch.tensor([0.01, 0.3, 3.0, 60.0])
    with torch.no_grad():
        batched = d(x, sig)
        singles = torch.cat([d(x[i : i + 1], sig[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-6)
    # a different sigma per sample really changes the output per sample
    with torch.no_grad():
        same = d(x, torch.full((4,), 0.3))
    assert torch.allclose(batched[1], same[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched[0], same[0], atol=1e-3)


def test_edm_precond_2d_inputs():
    # toy data is [N, D]: sigma must broadcast as [N, 1]
    x = torch.randn(3, 2)
    sigmas = [0.1, 1.0, 10.0]
    d = EDMPrecond(RecordingBackbone(), sigma_data=0.5)
    out = d(x, torch.tensor(sigmas))
    c_skip = expected_scalings(sigmas, 0.5, 2)[0]
    torch.testing.assert_close(out, c_skip * x, rtol=1e-6, atol=1e-7)


def test_broadcast_sigma_shapes():
    x = torch.zeros(3, 2, 4, 4)
    assert broadcast_sigma(0.7, x).shape == (3, 1, 1, 1)
    assert broadcast_sigma(torch.tensor([1.0, 2.0, 3.0]), x).shape == (3, 1, 1, 1)
    assert broadcast_sigma(torch.tensor([1.0, 2.0, 3.0]), x).flatten().tolist() == [1.0, 2.0, 3.0]
    assert broadcast_sigma(0.7, x).dtype == torch.float32


def test_one_step_generator_is_denoiser_at_sigma_max():
    torch.manual_seed(2)
    smax = 80.0
    backbone = RecordingBackbone(lambda xi, cn: torch.sin(xi) * 0.3)
    d = EDMPrecond(backbone, sigma_data=0.5, sigma_max=smax)
    g = OneStepGenerator(d, smax)
    z = torch.randn(3, 2, 4, 4)
    cond = torch.tensor([0, 1, 2])
    out = g(z, cond)
    want = d(z * smax, torch.full((3,), smax), cond)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    # the backbone saw the conditioning and c_noise = ln(80) / 4
    _, cn, seen_cond = backbone.inputs[0]
    assert seen_cond is cond
    torch.testing.assert_close(cn, torch.full((3,), math.log(smax) / 4), rtol=1e-6, atol=1e-7)


def test_one_step_generator_with_plain_function_denoiser():
    calls = []

    class D(Denoiser):  # the interface's defaults: the generator feeds sigma_max * z
        sigma_min, sigma_max = 0.002, 12.5

        def forward(self, x, sigma, cond=None):
            calls.append((x.clone(), float(sigma), cond))
            return 2 * x + 1

    z = torch.randn(2, 3)
    out = OneStepGenerator(D(), 12.5)(z)
    torch.testing.assert_close(out, 2 * (z * 12.5) + 1)
    assert calls[0][1] == 12.5
    torch.testing.assert_close(calls[0][0], z * 12.5)
    assert calls[0][2] is None
