"""Mixed precision must not touch the noise schedules: only network weights take bf16.

A bf16 ``abar``/``sigmas`` buffer collapses neighbouring SD timesteps, snaps the DM loss's noise
levels to the wrong timestep and biases the x0 conversion (mu_fake - mu_real then carries a
systematic error in every bf16 run). These tests build the real trainer under bf16 on the CPU.
"""

import pytest
import torch

from dmdctl.settings.distill import DistillConfig
from dmdctl.training.trainer import DMDTrainer, dm_index_range


@pytest.fixture(autouse=True)
def offline(hf_offline):
    """Every test here runs with HF_HUB_OFFLINE=1."""


def float_buffers(module: torch.nn.Module) -> dict[str, torch.dtype]:
    return {n: b.dtype for n, b in module.named_buffers() if b.is_floating_point()}


def test_dm_indices_are_dmd2s_inclusive_range():
    assert dm_index_range(1000, 0.02, 0.98) == (20, 981)  # 20..980 inclusive, as in DMD2
    assert dm_index_range(1000, 0.0, 1.0) == (0, 1000)
    assert dm_index_range(10, 0.5, 0.5) == (5, 6)


def test_bf16_keeps_the_sd_schedule_exact(sd_trainer, tmp_path):
    tr = sd_trainer(tmp_path / "bf16", mixed_precision="bf16")
    real = tr.real.denoiser  # under the guidance wrapper
    fake = tr.acc.unwrap_model(tr.fake)
    # the weights did go to bf16, the schedule buffers did not
    assert next(real.unet.parameters()).dtype == torch.bfloat16
    assert set(float_buffers(tr.real).values()) == {torch.float32}
    assert set(float_buffers(fake).values()) == {torch.float32}
    # every level of the grid is its own value ...
    assert tr.grid.dtype == torch.float32 and len(torch.unique(tr.grid)) == tr.levels == 1000
    # ... and the real and fake scores snap every DM-range level to its own timestep
    levels = torch.arange(tr.lo, tr.hi)
    assert (tr.lo, tr.hi) == (20, 981)
    assert torch.equal(real.timesteps(tr.grid[levels]), levels)
    assert torch.equal(fake.timesteps(tr.grid[levels]), levels)
    # the x0 conversion uses the noise actually added: the real score's abar matches fp32's
    ref = sd_trainer(tmp_path / "fp32", mixed_precision="no")
    assert torch.equal(real.abar, ref.real.denoiser.abar)
    assert torch.equal(tr.grid, ref.grid)


def test_bf16_and_fp32_runs_draw_the_same_dm_timesteps(sd_trainer, tmp_path):
    """200 steps' worth of the DM loss's draws: bf16 and fp32 land on identical timesteps."""
    from dmdctl.training.trainer import step_generator

    seen = {}
    for precision in ("bf16", "no"):
        tr = sd_trainer(tmp_path / precision, mixed_precision=precision)
        steps = []
        for step in range(200):
            gen = step_generator(0, step)
            torch.randn(2, *tr.teacher.sample_shape, generator=gen)  # z, as train_step draws
            torch.randint(0, tr.num_conditions, (2,), generator=gen)  # prompts
            idx = torch.randint(tr.lo, tr.hi, (2,), generator=gen)
            steps.append(tr.real.denoiser.timesteps(tr.grid[idx]))
        seen[precision] = torch.stack(steps)
    assert torch.equal(seen["bf16"], seen["no"])


def test_bf16_keeps_edm_fourier_frequencies_fp32(tmp_path):
    """NCSN++'s random Fourier frequencies are a buffer: they stay fp32 in the frozen teacher."""
    from dmdctl.core.denoiser import EDMPrecond
    from dmdctl.teachers import KINDS, save_teacher
    from dmdctl.teachers.edm.networks import EDMBackbone

    config = {
        "architecture": "SongUNet",
        "img_resolution": 8,
        "img_channels": 3,
        "label_dim": 0,
        "model_kwargs": {
            "model_channels": 8,
            "channel_mult": [1],
            "num_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
            "embedding_type": "fourier",
            "channel_mult_noise": 2,
            "encoder_type": "residual",
            "decoder_type": "standard",
            "resample_filter": [1, 3, 3, 1],
        },
        "sigma_data": 0.5,
        "sigma_min": 0.002,
        "sigma_max": 80.0,
    }
    torch.manual_seed(0)
    net = EDMPrecond(EDMBackbone(config), 0.5, 0.002, 80.0)
    path = save_teacher(net, KINDS["edm"], config, tmp_path / "teacher.safetensors")
    cfg = DistillConfig(
        teacher_path=str(path),
        out=str(tmp_path / "run"),
        reg_weight=0,
        batch_size=2,
        mixed_precision="bf16",
        cpu=True,
    )
    tr = DMDTrainer(cfg)
    buffers = float_buffers(tr.real)
    assert any(n.endswith("freqs") for n in buffers)
    assert set(buffers.values()) == {torch.float32}
    assert {p.dtype for p in tr.real.parameters()} == {torch.bfloat16}
    assert len(torch.unique(tr.grid)) == tr.levels
    logs = tr.train_step()  # and a bf16 step runs on it
    assert torch.isfinite(logs["loss_dm"]) and torch.isfinite(logs["loss_fake"])
