"""The training step's wiring, checked against quantities computed independently of it.

Determinism tests compare the code with itself; these put closed-form "score networks" in place
of the real and fake scores (denoisers of Gaussian data, known exactly), record what each one is
called with, and check one `train_step` against the method:
the generator's gradient is (mu_fake - mu_real) * w / numel, both scores see the same noisy
sample at the drawn noise level, the fake score trains at its own drawn levels, and the
regression pairs G(z_i) with y_i. A wiring bug (arguments swapped, a wrong sigma, pairs shifted
by one) changes these numbers.
"""

import pytest
import torch
from torch import nn

from dmdctl.core.denoiser import edm_weight
from dmdctl.settings.distill import DistillConfig
from dmdctl.training.trainer import DMDTrainer, step_generator

B, P = 16, 8


def gaussian_denoiser(x, sigma, mean, var):
    """E[x0 | x0 + sigma eps = x] for x0 ~ N(mean, var I): the exact denoiser of Gaussian data."""
    s2 = sigma.reshape(-1, *([1] * (x.ndim - 1))).float() ** 2
    return mean + (x.float() - mean) * var / (var + s2)


class SpyScore(nn.Module):
    """A frozen score of N(mean, var I) data that records every call."""

    def __init__(self, mean, var):
        super().__init__()
        self.mean, self.var, self.calls = mean, var, []

    def forward(self, x, sigma, cond=None):
        self.calls.append((x.detach().clone(), sigma.detach().clone().reshape(-1)))
        return gaussian_denoiser(x, sigma, self.mean, self.var)


def spy_on_fake(fake: nn.Module, mean, var) -> list:
    """Make the (trainable) fake score the Gaussian denoiser plus 0 x its network, so the
    optimiser still has a graph to follow, and record its calls."""
    calls = []
    original = fake.forward

    def forward(x, sigma, cond=None):
        calls.append(
            (x.detach().clone(), sigma.detach().clone().reshape(-1), torch.is_grad_enabled())
        )
        return gaussian_denoiser(x, sigma, mean, var) + 0.0 * original(x, sigma, cond)

    fake.forward = forward
    return calls


def spy_on_generator(trainer) -> dict:
    """Record the generator's input, output and the gradient that reaches its output."""
    seen = {}
    g = trainer.generator
    original = g.forward

    def forward(z, cond=None, **kw):
        x = original(z, cond, **kw)
        if x.requires_grad:
            # the generator's inputs: its steps' noisy samples (z * input_scale at the first)
            seen["input"], seen["x"] = z.detach().clone(), x.detach().clone()
            seen["at"] = kw.get("at")
            x.register_hook(lambda grad: seen.__setitem__("grad", grad.detach().clone()))
        return x

    g.forward = forward
    return seen


def trainer_for(teacher, out, **kw) -> DMDTrainer:
    base = dict(
        teacher_path=teacher,
        out=str(out),
        batch_size=B,
        pair_batch_size=P,
        reg_weight=0.0,
        fake_updates=1,
        lr=1e-4,
        fake_lr=1e-4,
        warmup=0,
        seed=3,
        cpu=True,
    )
    base.update(kw)
    cfg = DistillConfig(**base)
    cfg.validate()
    return DMDTrainer(cfg)


def draws(trainer, step: int, pairs: bool = False) -> dict:
    """The step's random draws, in the order the method needs them (toy2d: no labels)."""
    gen = step_generator(trainer.cfg.seed, step)
    shape = trainer.teacher.sample_shape
    out = {
        "z": torch.randn(B, *shape, generator=gen),
        "idx": torch.randint(trainer.lo, trainer.hi, (B,), generator=gen),
        "eps": torch.randn(B, *shape, generator=gen),
    }
    if pairs:
        out["pidx"] = torch.randint(0, len(trainer.pairs), (P,), generator=gen)
    out["fidx"] = torch.randint(0, trainer.levels, (B,), generator=gen)
    out["feps"] = torch.randn(B, *shape, generator=gen)
    return out


def test_one_step_matches_the_dmd_gradient_and_losses(toy_teacher, tmp_path):
    tr = trainer_for(toy_teacher, tmp_path)
    real_mean, fake_mean, var = 0.0, 0.4, 1.3
    tr.real = real = SpyScore(real_mean, var)
    fake_calls = spy_on_fake(tr.acc.unwrap_model(tr.fake), fake_mean, var)
    seen = spy_on_generator(tr)
    d = draws(tr, 0)

    logs = tr.train_step()

    # the generator ran on this step's noise
    assert torch.equal(seen["input"], d["z"] * tr.unwrapped_generator.input_scale)
    x = seen["x"]
    # the real and the fake score saw the same noisy sample at the same, drawn noise level
    ((noisy_r, sigma_r),) = real.calls
    noisy_f, sigma_f, grad_on = fake_calls[0]
    sigma = tr.grid[d["idx"]]
    assert not grad_on
    assert torch.equal(sigma_r, sigma) and torch.equal(sigma_f, sigma)
    assert torch.equal(noisy_r, noisy_f)
    torch.testing.assert_close(noisy_r, x + sigma[:, None] * d["eps"], rtol=0, atol=1e-6)
    # the DM gradient, from closed-form scores: (mu_fake - mu_real) * w / numel
    mu_real = gaussian_denoiser(noisy_r, sigma, real_mean, var)
    mu_fake = gaussian_denoiser(noisy_r, sigma, fake_mean, var)
    w = 1 / (x - mu_real).abs().mean(dim=1, keepdim=True)
    expected = (mu_fake - mu_real) * w / x.numel()
    torch.testing.assert_close(seen["grad"], expected, rtol=1e-4, atol=1e-9)
    # it points from the fake's mean toward the real one's: a descent step moves x toward 0
    assert (seen["grad"].sum(0) > 0).all()
    # the fake score trained on the detached samples at its own drawn levels, with EDM's weight
    noisy_t, sigma_t, grad_on = fake_calls[1]
    fsigma = tr.grid[d["fidx"]]
    assert grad_on and torch.equal(sigma_t, fsigma)
    torch.testing.assert_close(noisy_t, x + fsigma[:, None] * d["feps"], rtol=0, atol=1e-6)
    pred = gaussian_denoiser(noisy_t, fsigma, fake_mean, var)
    loss_fake = (edm_weight(fsigma, tr.sigma_data) * ((pred - x) ** 2).mean(1)).mean()
    torch.testing.assert_close(logs["loss_fake"], loss_fake, rtol=1e-5, atol=0)
    assert len(fake_calls) == 2 and len(real.calls) == 1


def test_extra_fake_updates_use_fresh_generator_samples(toy_teacher, tmp_path):
    tr = trainer_for(toy_teacher, tmp_path, fake_updates=3)
    tr.real = SpyScore(0.0, 1.0)
    calls = spy_on_fake(tr.acc.unwrap_model(tr.fake), 0.5, 1.0)
    tr.train_step()
    trained = [c for c in calls if c[2]]
    assert len(trained) == 3
    levels = [c[1] for c in trained]
    assert not torch.equal(levels[0], levels[1]) and not torch.equal(levels[1], levels[2])
    assert all(bool(((lv >= tr.grid[0]) & (lv <= tr.grid[-1])).all()) for lv in levels)


def test_regression_pairs_each_noise_with_its_own_target(toy_teacher, toy_pairs, tmp_path):
    tr = trainer_for(
        toy_teacher, tmp_path, pairs=toy_pairs, reg_weight=0.5, dm_weight=0.0, reg_loss="l2"
    )
    seen = spy_on_generator(tr)
    d = draws(tr, 0, pairs=True)
    logs = tr.train_step()
    z_pair = tr.pairs.noise[d["pidx"]]
    assert torch.equal(
        seen["input"][B:], z_pair * tr.unwrapped_generator.input_scale
    )  # the pairs' own noise reaches the generator
    x_pair = seen["x"][B:]
    y = tr.pairs.target[d["pidx"]]
    expected = ((x_pair - y) ** 2).mean(1).mean()
    torch.testing.assert_close(logs["loss_reg"], expected, rtol=1e-5, atol=0)
    # and the gradient on G(z_i) is 2 * reg_weight * (G(z_i) - y_i) / (P * D); none on the DM rows
    grad = seen["grad"]
    torch.testing.assert_close(
        grad[B:], 2 * 0.5 * (x_pair - y) / x_pair.numel(), rtol=1e-4, atol=1e-9
    )
    assert torch.count_nonzero(grad[:B]) == 0


@pytest.fixture(scope="module")
def heun_pairs(toy_teacher, tmp_path_factory) -> str:
    """256 pairs from the teacher's 35-NFE sampler (the session's toy_pairs use 15 NFE)."""
    from dmdctl.commands.make_pairs import make_pairs
    from dmdctl.settings.make_pairs import MakePairsConfig

    out = tmp_path_factory.mktemp("heun-pairs")
    make_pairs(
        MakePairsConfig(
            teacher_path=toy_teacher, out=str(out), num_pairs=256, shard_size=64, steps=18
        )
    )
    return str(out)


def test_a_few_hundred_toy2d_steps_beat_the_one_step_teacher(toy_teacher, heun_pairs, tmp_path):
    """A sign or divergence bug in the step cannot pass this: DMD must put several times more
    samples within 3 std of a mode than the teacher's own one-step sample, which collapses onto
    the data mean (0.02). Measured on this CPU for seeds 0/1/2: 0.21/0.24/0.09 after 400 steps;
    with the real and fake scores swapped: 0.002/0.0005/0.0005 (~8 s a run)."""
    from dmdctl.core.sampling import seeded_noise
    from dmdctl.generators import load_generator
    from dmdctl.teachers import load_teacher
    from dmdctl.training.loop import distill

    cfg = DistillConfig(
        teacher_path=toy_teacher,
        pairs=heun_pairs,
        out=str(tmp_path / "run"),
        steps=400,
        batch_size=256,
        pair_batch_size=64,
        lr=2e-3,
        fake_lr=2e-3,
        warmup=20,
        checkpoint_every=400,
        log_every=100,
        plot_samples=0,
        seed=0,
        cpu=True,
    )
    distill(cfg)
    teacher = load_teacher(toy_teacher)
    gen = load_generator(tmp_path / "run" / "generator.safetensors")
    z = seeded_noise(list(range(2000)), (2,))
    with torch.no_grad():
        student = gen.fn(z)
        one_step = teacher.denoiser(z * teacher.sigma_max, teacher.sigma_max)
    q = teacher.kind.quality_metrics
    dmd, base = q(teacher.config, student), q(teacher.config, one_step)
    assert base["frac_within_3std"] < 0.05, base  # the one-step teacher is the blur it should be
    assert dmd["frac_within_3std"] > 3 * base["frac_within_3std"] + 0.05, (dmd, base)


@pytest.mark.parametrize("seed", [0, 1])
def test_frechet_distance_equals_the_textbook_formula(seed):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) with SciPy's sqrtm, no optional packages."""
    import numpy as np
    import scipy.linalg

    from dmdctl.metrics.fid import frechet_distance

    rng = np.random.default_rng(seed)
    d = 64
    a, b = rng.normal(size=(400, d)), rng.normal(size=(300, d)) @ rng.normal(size=(d, d)) * 0.3
    mu1, mu2 = a.mean(0), b.mean(0) + 0.2
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    textbook = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(textbook, rel=1e-8)
