"""The flow-matching path on the built-in toy2d-flow teacher: the maths of FlowDenoiser, the
CLI from train-teacher to sample, and (slow) a distillation that covers every mode."""

import json
import math

import pytest
import torch

from cli_helpers import ok, one_line_error, run


class Linear(torch.nn.Module):
    """A velocity field with a known answer: v(x_t, t) = a x_t + b t."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7))
        self.b = torch.nn.Parameter(torch.tensor(-0.3))

    def forward(self, x, t, cond=None):
        return self.a * x + self.b * t.reshape(-1, *([1] * (x.ndim - 1)))


def test_flow_denoiser_is_exact_in_sigma_space():
    """x_sigma = x_t / (1 - t), sigma = t / (1 - t): D(x_sigma, sigma) = x_t - t v(x_t, t); at
    sigma = inf the input is x_1 itself; the fake score's weight makes the loss the velocity
    MSE; the training grid is the shifted i / levels; steps are given as t values."""
    from dmdctl.core.denoiser import FlowDenoiser, StepGenerator
    from dmdctl.core.losses import edm_denoising_loss
    from dmdctl.core.sampling import flow_shift

    d = FlowDenoiser(Linear(), shift=3.0, levels=10)
    x_t = torch.randn(3, 2)
    t = torch.tensor([0.2, 0.5, 0.9])
    s = t / (1 - t)
    v = 0.7 * x_t - 0.3 * t[:, None]
    torch.testing.assert_close(d(x_t * (1 + s[:, None]), s), x_t - t[:, None] * v)
    z = torch.randn(3, 2)
    torch.testing.assert_close(d(z, math.inf), z - (0.7 * z - 0.3))
    g = StepGenerator(d, d.step_sigmas([1.0, 0.5]))
    eps = torch.randn(3, 2)
    x0 = z - (0.7 * z - 0.3)
    x_half = 0.5 * x0 + 0.5 * eps  # renoised to t = 0.5 as FlowMatchLCMScheduler does
    torch.testing.assert_close(g(z, None, [eps]), x_half - 0.5 * (0.7 * x_half - 0.3 * 0.5))
    assert g.input_scale == 1.0 and d.step_values(g.sigmas) == [1.0, 0.5]
    # velocity MSE: |(x_t - t v_hat) - x0|^2 / t^2 = |v_hat - (eps - x0)|^2
    x0, eps = torch.randn(3, 2), torch.randn(3, 2)
    loss = edm_denoising_loss(d, x0, s, eps, None, 0.5, d.loss_weight)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    want = ((0.7 * x_t - 0.3 * t[:, None]) - (eps - x0)).pow(2).mean(1).mean()
    torch.testing.assert_close(loss, want)
    grid = d.training_sigmas(1000)
    torch.testing.assert_close(grid / (1 + grid), flow_shift(torch.arange(1, 10) / 10, 3.0))
    with pytest.raises(ValueError, match="t values in"):
        d.step_sigmas([80.0])


def test_toy2d_flow_from_train_teacher_to_sample(tmp_path):
    """train-teacher toy2d-flow, make-pairs (Heun on the flow ODE), distill (generator at t = 1)
    and sample through the CLI; a few-step flow generator too."""
    from dmdctl.generators import load_generator
    from dmdctl.teachers import load_teacher

    ok(run("train-teacher", "toy2d-flow", "--out", tmp_path / "t", "--steps", 200))
    teacher = tmp_path / "t" / "teacher.safetensors"
    assert type(load_teacher(teacher).denoiser).__name__ == "FlowDenoiser"
    ok(run("make-pairs", "--teacher-path", teacher, "--num-pairs", 64, "--steps", 4,
           "--out", tmp_path / "p"))  # fmt: skip
    sampler = json.loads((tmp_path / "p" / "manifest.json").read_text())["sampler"]
    assert sampler["name"] == "flow-heun" and sampler["nfe"] == 7
    ok(run("distill", "--teacher-path", teacher, "--pairs", tmp_path / "p", "--steps", 20,
           "--batch-size", 64, "--pair-batch-size", 64, "--out", tmp_path / "r"))  # fmt: skip
    gen = load_generator(tmp_path / "r" / "generator.safetensors")
    assert gen.fn.sigmas == [math.inf] and gen.nfe == 1
    ok(run("distill", "--teacher-path", teacher, "--denoising-steps", "1,0.5", "--steps", 5,
           "--batch-size", 64, "--reg-weight", 0, "--out", tmp_path / "r2"))  # fmt: skip
    assert load_generator(tmp_path / "r2" / "generator.safetensors").nfe == 2
    ok(run("sample", "--generator", tmp_path / "r2", "--num", 16, "--out", tmp_path / "s"))
    one_line_error(
        run("distill", "--teacher-path", teacher, "--denoising-steps", "80,2", "--steps", 1,
            "--reg-weight", 0,
            "--out", tmp_path / "bad"),
        "t values in (0, 1]",
    )  # fmt: skip


@pytest.mark.slow  # ~70 s: a full teacher (8000 steps) and a full distillation (2000 steps)
def test_toy2d_flow_distils_to_a_one_step_generator_that_covers_every_mode(tmp_path):
    from dmdctl.generators import load_generator
    from dmdctl.teachers import load_teacher

    ok(run("train-teacher", "toy2d-flow", "--out", tmp_path / "t"))
    teacher = tmp_path / "t" / "teacher.safetensors"
    ok(run("make-pairs", "--teacher-path", teacher, "--num-pairs", 4096, "--out", tmp_path / "p"))
    ok(
        run(
            "distill", "--teacher-path", teacher, "--pairs", tmp_path / "p", "--out", tmp_path / "r"
        )
    )
    t = load_teacher(teacher)
    gen = load_generator(tmp_path / "r" / "generator.safetensors")
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        quality = t.kind.quality_metrics(t.config, gen.fn(z))
    assert quality["modes_covered"] == 8, quality
    assert quality["frac_within_3std"] > 0.6, quality
