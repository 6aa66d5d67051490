"""DMD2: the GAN head on real data, few-step generators with backward simulation, --init-from.

The wiring tests replay a step's random draws and check what each network was called with and
the losses against values computed outside the trainer, as test_training_step does for DMD.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cli_helpers import distill_config, ok, one_line_error, run
from dmdctl.core.denoiser import StepGenerator
from dmdctl.core.gan import GANHead, bottleneck_features, tap
from dmdctl.core.sampling import seeded_noise_draws
from dmdctl.errors import UserError
from dmdctl.generators import generate, load_generator
from dmdctl.settings.distill import DistillConfig
from dmdctl.teachers import load_teacher
from dmdctl.training.loop import distill
from dmdctl.training.trainer import DMDTrainer, step_generator
from test_training_step import SpyScore, gaussian_denoiser, spy_on_fake, spy_on_generator

B = 16


def trainer_for(teacher, out, **kw) -> DMDTrainer:
    base = dict(teacher_path=teacher, out=str(out), batch_size=B, pair_batch_size=8,
                reg_weight=0.0, fake_updates=1, lr=1e-4, fake_lr=1e-4, warmup=0, seed=3,
                cpu=True)  # fmt: skip
    base.update(kw)
    return DMDTrainer(DistillConfig(**base))


def spy_on_head(head) -> list:
    """Record the head's logits, whether gradients were on and whether its weights trained."""
    calls = []
    original = head.forward

    def forward(feats):
        out = original(feats)
        frozen = not any(p.requires_grad for p in head.parameters())
        calls.append((out.detach().clone(), torch.is_grad_enabled(), frozen))
        return out

    head.forward = forward
    return calls


def test_gan_head_layers_follow_the_feature_size():
    # 8x8 maps (SD1.5's mid block, EDM ImageNet-64's bottleneck): 4x4 stride 2, then 4x4 to 1x1
    h = GANHead((64, 8, 8))
    convs = [m for m in h.net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride) for c in convs] == [
        ((4, 4), (2, 2)),
        ((4, 4), (1, 1)),
        ((1, 1), (1, 1)),
    ]
    # 32x32 (SDXL): three halvings first
    assert sum(isinstance(m, torch.nn.Conv2d) for m in GANHead((32, 32, 32)).net) == 5
    assert GANHead((64, 8, 8))(torch.randn(3, 64, 8, 8)).shape == (3,)
    assert GANHead((64, 2, 2))(torch.randn(3, 64, 2, 2)).shape == (3,)
    assert GANHead((128,))(torch.randn(5, 128)).shape == (5,)
    # each GroupNorm normalises at least 16 values: DMD2's 32 groups on 1,280 channels, 4 groups
    # on the digits UNet's 64 at 1x1 (32 groups of 2 values each would leave only their signs)
    norms = [m for m in GANHead((64, 2, 2)).net if isinstance(m, torch.nn.GroupNorm)]
    assert [n.num_groups for n in norms] == [4]
    norms = [m for m in GANHead((1280, 8, 8)).net if isinstance(m, torch.nn.GroupNorm)]
    assert [n.num_groups for n in norms] == [32, 32]


def test_gan_step_wiring(toy_teacher, tmp_path):
    """Generator side: softplus(-D) on G's samples noised at drawn levels, through a frozen fake
    score; classifier side: softplus(-D(real)) + softplus(D(fake)), real samples drawn from the
    teacher's data and noised at their own levels, in the fake score's update."""
    gw, cw = 0.5, 2.0
    tr = trainer_for(toy_teacher, tmp_path, gan_weight=gw, gan_classifier_weight=cw)
    fake_net, head = tr.acc.unwrap_model(tr.fake), tr.acc.unwrap_model(tr.head)
    fake_copy, head_copy = copy.deepcopy(fake_net), copy.deepcopy(head)
    real_mean, fake_mean, var = 0.0, 0.4, 1.3
    tr.real = SpyScore(real_mean, var)
    fake_calls = spy_on_fake(fake_net, fake_mean, var)
    grads_off = []
    original = fake_net.forward

    def recording(x, sigma, cond=None):
        grads_off.append(not any(p.requires_grad for p in fake_net.parameters()))
        return original(x, sigma, cond)

    fake_net.forward = recording
    head_calls = spy_on_head(head)
    head_inputs, spied = [], head.forward
    head.forward = lambda feats: (head_inputs.append(feats.detach().clone()), spied(feats))[1]
    seen = spy_on_generator(tr)
    gen = step_generator(3, 0)
    shape = (2,)
    z = torch.randn(B, *shape, generator=gen)
    idx = torch.randint(tr.lo, tr.hi, (B,), generator=gen)
    eps = torch.randn(B, *shape, generator=gen)
    gidx = torch.randint(0, tr.levels, (B,), generator=gen)
    geps = torch.randn(B, *shape, generator=gen)
    fidx = torch.randint(0, tr.levels, (B,), generator=gen)
    feps = torch.randn(B, *shape, generator=gen)
    xr, _ = tr.teacher.kind.sample_data(tr.teacher.config, B, gen)
    ridx = torch.randint(0, tr.levels, (B,), generator=gen)
    reps = torch.randn(B, *shape, generator=gen)

    logs = tr.train_step()

    x = seen["x"]
    assert torch.equal(seen["input"], z * tr.unwrapped_generator.input_scale)
    assert len(fake_calls) == 4 and len(head_calls) == 2
    # 1: the DM loss (no gradients); 2: the generator's GAN loss, fake score frozen
    noisy_g, sigma_g, grad_on = fake_calls[1]
    assert grad_on and grads_off[1] and not grads_off[2]
    assert torch.equal(sigma_g, tr.grid[gidx])
    torch.testing.assert_close(noisy_g, x + tr.grid[gidx][:, None] * geps, rtol=0, atol=1e-6)
    logit_g, grad_on, frozen = head_calls[0]
    assert grad_on and frozen
    torch.testing.assert_close(logs["loss_gan"], F.softplus(-logit_g).mean())
    # 3, 4: the fake score's update: generated samples at the denoising loss's levels, then the
    # real ones at their own (that pass ends at the bottleneck)
    noisy_f, sigma_f, grad_on = fake_calls[2]
    noisy_real, sigma_real, grad_on_real = fake_calls[3]
    assert grad_on and grad_on_real and not grads_off[3]
    assert torch.equal(sigma_f, tr.grid[fidx]) and torch.equal(sigma_real, tr.grid[ridx])
    torch.testing.assert_close(noisy_f, x + tr.grid[fidx][:, None] * feps, rtol=0, atol=1e-6)
    torch.testing.assert_close(noisy_real, xr + tr.grid[ridx][:, None] * reps, rtol=0, atol=1e-6)
    logits, grad_on, frozen = head_calls[1]
    assert grad_on and not frozen
    # the head's batch: the generated samples' bottleneck features, then the real samples'
    want = torch.cat([bottleneck_features(fake_copy, noisy_f, sigma_f, None),
                      bottleneck_features(fake_copy, noisy_real, sigma_real, None)])  # fmt: skip
    torch.testing.assert_close(head_inputs[1], want, rtol=1e-5, atol=1e-6)
    cls = F.softplus(-logits[B:]).mean() + F.softplus(logits[:B]).mean()
    torch.testing.assert_close(logs["loss_cls"], cls)
    # the fake loss is its denoising loss on the generated half plus the weighted head loss
    fs = tr.grid[fidx]
    pred = gaussian_denoiser(noisy_f, fs, fake_mean, var)
    den = (tr.loss_weight(fs) * ((pred - x) ** 2).mean(1)).mean()
    torch.testing.assert_close(logs["loss_fake"], den + cw * cls, rtol=1e-5, atol=1e-7)
    # the gradient reaching G's samples: the DM term plus gan_weight x the GAN term, the latter
    # recomputed with copies of the fake network and head taken before the step
    noisy_r, sigma_r = tr.real.calls[0]
    assert torch.equal(sigma_r, tr.grid[idx])
    torch.testing.assert_close(noisy_r, x + tr.grid[idx][:, None] * eps, rtol=0, atol=1e-6)
    mu_real = gaussian_denoiser(noisy_r, sigma_r, real_mean, var)
    mu_fake = gaussian_denoiser(noisy_r, sigma_r, fake_mean, var)
    w = 1 / (x - mu_real).abs().mean(dim=1, keepdim=True)
    dm = (mu_fake - mu_real) * w / x.numel()
    xg = x.clone().requires_grad_(True)
    with tap(fake_copy.bottleneck()) as feats:
        fake_copy(xg + tr.grid[gidx][:, None] * geps, tr.grid[gidx], None)
    (g_gan,) = torch.autograd.grad(F.softplus(-head_copy(feats[-1])).mean(), xg)
    assert g_gan.abs().max() > 0
    torch.testing.assert_close(seen["grad"], dm + gw * g_gan, rtol=1e-4, atol=1e-9)
    # the head trains with the fake score: its parameters are in the fake's optimiser and moved
    held = {id(p) for group in tr.opt_f.param_groups for p in group["params"]}
    assert all(id(p) in held for p in head.parameters())
    pairs = zip(head.parameters(), head_copy.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)


def test_few_step_generator_and_seeded_sampling(toy_teacher):
    teacher = load_teacher(toy_teacher)
    sig = [80.0, 2.0, 0.5]
    g = StepGenerator(teacher.denoiser, sig)
    seeds = [7, 8, 9]
    noise = seeded_noise_draws(seeds, (2,), 3)
    # each seed's RNG draws the start noise, then one renoising draw per later step
    for i, s in enumerate(seeds):
        r = torch.Generator().manual_seed(s)
        want = torch.stack([torch.randn(2, generator=r) for _ in range(3)])
        assert torch.equal(noise[:, i], want)
    with torch.no_grad():
        x = teacher.denoiser(noise[0] * 80.0, 80.0)
        x = teacher.denoiser(x + 2.0 * noise[1], 2.0)
        x = teacher.denoiser(x + 0.5 * noise[2], 0.5)
        torch.testing.assert_close(g.sample(seeds, None, (2,), "cpu"), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="decreasing"):
        StepGenerator(teacher.denoiser, [1.0, 2.0])


def test_backward_simulation_feeds_each_step_what_inference_would(toy_teacher, tmp_path):
    tr = trainer_for(toy_teacher, tmp_path, denoising_steps="80,2,0.5,0.1")
    tr.real = SpyScore(0.0, 1.0)
    spy_on_fake(tr.acc.unwrap_model(tr.fake), 0.3, 1.0)
    g = tr.unwrapped_generator
    sig = g.sigmas
    seen_k = set()
    for step in range(8):
        before = copy.deepcopy(g.denoiser)
        gen = step_generator(3, step)
        z = torch.randn(B, 2, generator=gen)
        torch.randint(tr.lo, tr.hi, (B,), generator=gen)
        torch.randn(B, 2, generator=gen)
        k = int(torch.randint(0, 4, (1,), generator=gen))
        noise = [torch.randn(B, 2, generator=gen) for _ in range(k)]
        seen = spy_on_generator(tr)
        tr.train_step()
        with torch.no_grad():
            x_in = z * g.input_scale
            for j in range(k):
                x_in = before(x_in, sig[j]) + sig[j + 1] * noise[j]
        torch.testing.assert_close(seen["input"], x_in, rtol=0, atol=1e-5)
        assert torch.equal(seen["at"], torch.full((B,), sig[k]))
        seen_k.add(k)
        del tr.generator.forward  # the next spy wraps the class's forward again
    assert len(seen_k) >= 3  # the steps drawn cover most of the 4


def test_gan_run_resumes_exactly_and_exports_a_few_step_generator(toy_teacher, toy_pairs, tmp_path):
    import dmdctl.training.loop as dd

    kw = dict(reg_weight=0.0, gan_weight=0.01, denoising_steps="80,1,0.2", fake_updates=2,
              steps=20, checkpoint_every=10, plot_samples=0)  # fmt: skip
    distill(distill_config(toy_teacher, toy_pairs, tmp_path / "whole", **kw))
    real_step = dd.DMDTrainer.train_step

    def crash(self):
        if self.step == 13:
            raise RuntimeError("simulated crash")
        return real_step(self)

    dd.DMDTrainer.train_step = crash
    try:
        with pytest.raises(RuntimeError):
            distill(distill_config(toy_teacher, toy_pairs, tmp_path / "cut", **kw))
    finally:
        dd.DMDTrainer.train_step = real_step
    # the GAN setting must match on resume
    with pytest.raises(UserError, match="GAN head on there, off now"):
        distill(distill_config(toy_teacher, toy_pairs, tmp_path / "cut", resume="latest",
                               **dict(kw, gan_weight=0.0)))  # fmt: skip
    distill(distill_config(toy_teacher, toy_pairs, tmp_path / "cut", resume="latest", **kw))
    ckpt = tmp_path / "cut" / "checkpoints" / "step-0000020"
    assert (ckpt / "gan_head.safetensors").is_file()
    for name in ("generator", "fake", "gan_head", "ema"):
        a = load_file(
            str(tmp_path / "whole" / "checkpoints" / "step-0000020" / f"{name}.safetensors")
        )
        b = load_file(str(ckpt / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # the generator file knows its steps; sample runs them; export keeps them
    src = load_generator(tmp_path / "whole" / "generator.safetensors")
    assert src.fn.sigmas == [80.0, 1.0, 0.2] and src.nfe == 3
    ok(run("export", tmp_path / "whole", "-o", tmp_path / "g.safetensors"))
    again = load_generator(tmp_path / "g.safetensors")
    assert again.fn.sigmas == [80.0, 1.0, 0.2]
    x, _ = generate(src, [1, 2, 3])
    y, _ = generate(again, [1, 2, 3])
    assert torch.equal(x, y)  # the last checkpoint's EMA is the run's generator file
    ok(run("sample", "--generator", tmp_path / "whole" / "generator.safetensors", "--num", 3,
           "--seed", 1, "--out", tmp_path / "s", "--no-plot"))  # fmt: skip
    s = load_file(str(tmp_path / "s" / "samples.safetensors"))["samples"]
    torch.testing.assert_close(s, x, rtol=0, atol=0)


def test_init_from_starts_a_new_run_from_another(toy_teacher, toy_pairs, tmp_path):
    distill(distill_config(toy_teacher, toy_pairs, tmp_path / "a", steps=10, checkpoint_every=10))
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step-0000010" / "generator.safetensors"))
    fa = load_file(str(tmp_path / "a" / "checkpoints" / "step-0000010" / "fake.safetensors"))
    tr = trainer_for(toy_teacher, tmp_path / "b", gan_weight=0.01, init_from=str(tmp_path / "a"))
    b = tr.unwrapped_generator.denoiser.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fb = tr.acc.unwrap_model(tr.fake).state_dict()
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert tr.step == 0 and not tr.opt_g.state  # fresh optimiser
    # a generator file works too
    tr2 = trainer_for(
        toy_teacher, tmp_path / "c", init_from=str(tmp_path / "a" / "generator.safetensors")
    )
    ema = load_file(str(tmp_path / "a" / "generator.safetensors"))
    c = tr2.unwrapped_generator.denoiser.state_dict()
    assert all(torch.equal(ema[k], c[k]) for k in ema)


def test_real_data_files_and_refusals(toy_teacher, tmp_path):
    import numpy as np

    from cli_helpers import real_store
    from dmdctl.data.real import load_real_data
    from dmdctl.teachers import resolve_teacher

    digits = resolve_teacher("digits", None)
    imgs = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", imgs, np.arange(6) % 10)
    store = real_store(tmp_path / "d.npz", digits.path, tmp_path / "store", teacher="digits")
    rd = load_real_data(str(store), digits)
    assert len(rd) == 6
    x, c = rd.rows(torch.tensor([2, 5, 2]))
    assert x.shape == (3, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[0, 0], torch.tensor(imgs[2, ..., 0]).float() / 127.5 - 1)
    assert c.tolist() == [2, 5, 2] and c.dtype == torch.int64
    # a raw npz or folder is refused with the command that makes a store of it
    with pytest.raises(UserError, match="not a store made by `dmdctl prepare-real`"):
        load_real_data(str(tmp_path / "d.npz"), digits)
    # the CLI refuses bad combinations in one line, before anything is built
    common = ("distill", "--teacher-path", toy_teacher, "--reg-weight", 0, "--steps", 1, "--cpu")
    one_line_error(run(*common, "--out", tmp_path / "r1", "--gan-weight", 0.1, "--real-only"),
                   "--gan-weight needs")  # fmt: skip
    one_line_error(run(*common, "--out", tmp_path / "r2", "--real-data", tmp_path / "d.npz"),
                   "--real-data feeds the GAN")  # fmt: skip
    one_line_error(run(*common, "--out", tmp_path / "r3", "--denoising-steps", "0.5,2"),
                   "decreasing")  # fmt: skip
    one_line_error(run(*common, "--out", tmp_path / "r4", "--denoising-steps", "80,x"),
                   "comma-separated")  # fmt: skip
    one_line_error(run(*common, "--out", tmp_path / "r5", "--denoising-steps", "500,2"),
                   "sigmas must lie in")  # fmt: skip
    one_line_error(run(*common, "--out", tmp_path / "r6", "--conditioning-timestep", 399),
                   "for SD teachers")  # fmt: skip
    one_line_error(run(*common, "--out", tmp_path / "r7", "--init-from", tmp_path / "none"),
                   "no such file")  # fmt: skip
    one_line_error(run(*common, "--out", tmp_path / "r8", "--gan-weight", 0.1, "--real-data",
                       store), "was made for a teacher with sample shape [1, 8, 8]")  # fmt: skip


def test_digits_gan_run_through_the_cli(tmp_path):
    """The digits teacher's GAN reads its own training split by default; the run logs the head's
    losses and writes a 2-step generator."""
    out = tmp_path / "run"
    ok(run("distill", "--teacher", "digits", "--reg-weight", 0, "--gan-weight", 3e-3,
           "--denoising-steps", "80,0.8", "--steps", 2, "--batch-size", 8, "--fake-updates", 2,
           "--log-every", 1, "--plot-samples", 10, "--out", out, "--cpu"))  # fmt: skip
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert {"loss_gan", "loss_cls", "real_logit", "fake_logit"} <= set(rows[-1])
    assert load_generator(out / "generator.safetensors").nfe == 2


def test_gan_real_samples_carry_their_own_labels(tmp_path):
    """Class-conditional teacher (digits): in the fake score's update the generated half is
    conditioned on the generator's labels, the real half on the real images' own labels."""
    from dmdctl.teachers import get_kind
    from dmdctl.teachers.digits import digits_split

    n = 8
    tr = trainer_for(str(get_kind("digits").default_path()), tmp_path, batch_size=n,
                     gan_weight=0.01)  # fmt: skip
    fake = tr.acc.unwrap_model(tr.fake)
    calls, original = [], fake.forward

    def recording(x, sigma, cond=None):
        calls.append((x.detach().clone(), cond.clone()))
        return original(x, sigma, cond)

    fake.forward = recording
    gen = step_generator(3, 0)
    shape = (1, 8, 8)
    torch.randn(n, *shape, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    # the step's other draws, in order: DM level and noise, GAN level and noise, the fake
    # score's level and noise
    torch.randint(tr.lo, tr.hi, (n,), generator=gen)
    torch.randn(n, *shape, generator=gen)
    torch.randint(0, tr.levels, (n,), generator=gen)
    torch.randn(n, *shape, generator=gen)
    torch.randint(0, tr.levels, (n,), generator=gen)
    torch.randn(n, *shape, generator=gen)
    xs, ys, _, _ = digits_split()
    pick = torch.randint(0, len(xs), (n,), generator=gen)
    ridx = torch.randint(0, tr.levels, (n,), generator=gen)
    reps = torch.randn(n, *shape, generator=gen)
    tr.train_step()
    (_, cond_fake), (x, cond) = calls[-2:]  # the fake score's update: generated, then real
    assert torch.equal(cond_fake, labels) and torch.equal(cond, ys[pick])
    want = xs[pick] + tr.grid[ridx].reshape(-1, 1, 1, 1) * reps
    torch.testing.assert_close(x, want, rtol=0, atol=1e-6)
    # the DM loss and the generator's GAN loss see the generator's labels
    assert len(calls) == 4 and all(torch.equal(c, labels) for _, c in calls[:2])


def test_image_folders_are_resized_to_the_teacher(tmp_path):
    """prepare-real's image reader: mixed sizes (and a non-square image) are centre-cropped and
    resized to the teacher's resolution, not a traceback."""
    from PIL import Image

    from dmdctl.data.real_store import read_images, to_unit_range

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (40, 40), (255, 0, 0)).save(folder / "a.png")
    Image.new("RGB", (64, 48), (0, 0, 255)).save(folder / "b.png")
    x = to_unit_range(read_images([folder / "a.png", folder / "b.png"], 3, 32))
    assert x.shape == (2, 3, 32, 32)
    torch.testing.assert_close(x[0, :, 5, 5], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(x[1, :, 5, 5], torch.tensor([-1.0, -1.0, 1.0]))


def test_gan_head_on_narrow_features_sees_its_input_at_batch_1():
    """16-channel 4x4 features (a tiny UNet's mid block): the head's last map is 1x1, so its
    GroupNorm needs 2+ channels a group; with one it normalised every value to 0 (a constant
    logit) and failed in training at one sample per process."""
    import torch

    from dmdctl.core.gan import GANHead

    head = GANHead((16, 4, 4)).train()
    a = head(torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0)))
    b = head(torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1)))
    assert a.shape == (1,) and not torch.equal(a, b)


def test_bottleneck_features_end_the_pass_at_the_bottleneck():
    """The head's inputs come from a pass that stops at the bottleneck: the same features and
    the same gradients as a full pass, and nothing after the bottleneck runs (the digits UNet's
    decoder: its up blocks and output convolution)."""
    from dmdctl.core.gan import bottleneck_features
    from dmdctl.teachers import get_kind

    net = load_teacher(get_kind("digits").default_path()).denoiser.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=g)
    sigma, c = torch.rand(6, generator=g) * 3 + 0.1, torch.arange(6)
    ran: list[str] = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: ran.append(n))
             for n, m in net.named_modules() if n]  # fmt: skip
    xa = x.clone().requires_grad_(True)
    with tap(net.bottleneck()) as full:
        net(xa, sigma, c)
    after = ran[ran.index(next(n for n, m in net.named_modules() if m is net.bottleneck())) + 1 :]
    ran.clear()
    xb = x.clone().requires_grad_(True)
    feats = bottleneck_features(net, xb, sigma, c)
    for h in hooks:
        h.remove()
    assert any("up_blocks" in n for n in after) and not set(after) & set(ran)
    torch.testing.assert_close(feats, full[-1], rtol=1e-5, atol=1e-6)
    w = torch.randn(feats.shape, generator=g)
    (ga,) = torch.autograd.grad((full[-1] * w).sum(), xa)
    (gb,) = torch.autograd.grad((feats * w).sum(), xb)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)
    assert not net.bottleneck()._forward_hooks  # the hook is gone
