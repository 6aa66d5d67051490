"""The speed levers change kernels, not results: a training step with --sdpa-backend math,
--channels-last or --compile gives the default step's losses and weights."""

import pytest
import torch

import dmdctl.training.speed as speed
from dmdctl.errors import UserError
from dmdctl.settings.distill import DistillConfig


@pytest.fixture(autouse=True)
def offline(hf_offline):
    """Every test here runs with HF_HUB_OFFLINE=1."""


def one_step(sd_trainer, out, **levers):
    tr = sd_trainer(out, lr=1e-3, fake_lr=1e-3, warmup=0, **levers)
    logs = tr.train_step()
    weights = torch.cat([p.detach().flatten() for p in tr.unwrapped_generator.parameters()])
    return tr, logs, weights


def check_same_step(base, logs, w0, w, name):
    # losses and gradient norms; not the weights: one AdamW step turns a 1e-9 difference in a
    # near-zero gradient into a full lr-sized step of the opposite sign
    for k in ("loss_dm", "loss_fake", "grad_norm_g", "grad_norm_fake"):
        torch.testing.assert_close(logs[k], base[k], rtol=1e-4, atol=1e-7, msg=f"{name} {k}")
    assert (w - w0).abs().max() <= 2.5e-3  # at most about one lr (1e-3) step apart


def test_attention_backend_and_channels_last_give_the_default_step(sd_trainer, tmp_path):
    _, base, w0 = one_step(sd_trainer, tmp_path / "base")
    _, logs, w = one_step(sd_trainer, tmp_path / "math", sdpa_backend="math")
    check_same_step(base, logs, w0, w, "math")
    tr, logs, w = one_step(sd_trainer, tmp_path / "cl", channels_last=True)
    check_same_step(base, logs, w0, w, "channels_last")
    conv = tr.unwrapped_generator.denoiser.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow  # tracing three UNets takes ~30 s of CPU even without code generation
def test_compile_gives_the_default_step(sd_trainer, tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "eager")  # the wiring, without code generation
    _, base, w0 = one_step(sd_trainer, tmp_path / "base")
    tr, logs, w = one_step(sd_trainer, tmp_path / "compile", compile=True)
    check_same_step(base, logs, w0, w, "compile")
    unet = tr.unwrapped_generator.denoiser.unet  # every down/mid/up block runs compiled
    blocks = speed.repeated_blocks(unet)
    assert len(blocks) == len(unet.down_blocks) + 1 + len(unet.up_blocks)
    assert all(b._compiled_call_impl is not None for b in blocks)
    # the checkpoint's keys are the uncompiled network's
    assert not any("_orig_mod" in k for k in tr.unwrapped_generator.state_dict())


def test_unknown_attention_backend_is_one_line():
    with pytest.raises(UserError, match="--sdpa-backend must be one of auto, flash"):
        DistillConfig(sdpa_backend="fast", reg_weight=0, teacher="toy2d").validate()
