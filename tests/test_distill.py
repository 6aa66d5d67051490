import json

import pytest
import torch
from safetensors.torch import load_file

import dmdctl.training.loop as dd
from cli_helpers import distill_config
from dmdctl.core.sampling import seeded_noise
from dmdctl.errors import UserError
from dmdctl.generators import load_generator
from dmdctl.teachers import load_teacher
from dmdctl.training.loop import distill


def log(path):
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


def test_distill_writes_logs_checkpoints_plots_and_a_generator(toy_teacher, toy_pairs, tmp_path):
    result = distill(distill_config(toy_teacher, toy_pairs, tmp_path))
    assert result["step"] == 40
    rows = log(tmp_path)
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    for key in (
        "loss_dm",
        "loss_reg",
        "loss_fake",
        "grad_norm_g",
        "grad_norm_fake",
        "samples_per_s",
    ):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows), key
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-0000020",
        "step-0000040",
    ]
    assert (tmp_path / "samples" / "step-0000040.png").is_file()
    assert "reg_weight = 0.25" in (tmp_path / "config.toml").read_text()
    gen = load_generator(tmp_path / "generator.safetensors")
    teacher = load_teacher(toy_teacher)
    z = seeded_noise(range(5), (2,))
    # the generator moved away from its initialisation (the teacher at one step)
    assert not torch.allclose(gen(z), teacher.denoiser(z * 80.0, 80.0), atol=1e-4)


def test_generator_starts_as_the_teacher_at_sigma_max(toy_teacher, toy_pairs, tmp_path):
    trainer = dd.DMDTrainer(distill_config(toy_teacher, toy_pairs, tmp_path))
    z = torch.randn(8, 2)
    teacher = load_teacher(toy_teacher)
    torch.testing.assert_close(
        trainer.unwrapped_generator(z), teacher.denoiser(z * teacher.sigma_max, teacher.sigma_max)
    )
    fake = trainer.acc.unwrap_model(trainer.fake)
    for a, b in zip(fake.parameters(), teacher.denoiser.parameters(), strict=True):
        assert torch.equal(a, b)


def test_frozen_teacher_does_not_change(toy_teacher, toy_pairs, tmp_path):
    trainer = dd.DMDTrainer(distill_config(toy_teacher, toy_pairs, tmp_path))
    before = {k: v.clone() for k, v in trainer.real.state_dict().items()}
    for _ in range(3):
        trainer.train_step()
    after = trainer.real.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in trainer.real.parameters())


def test_ablation_switches(toy_teacher, toy_pairs, tmp_path):
    t = dd.DMDTrainer(
        distill_config(toy_teacher, toy_pairs, tmp_path / "a", real_only=True, reg_weight=0.0)
    )
    assert t.fake is None and t.pairs is None
    assert set(t.train_step()) == {"loss_dm", "loss_g", "grad_norm_g"}
    t = dd.DMDTrainer(distill_config(toy_teacher, toy_pairs, tmp_path / "b", dm_weight=0.0))
    assert t.fake is None
    assert set(t.train_step()) == {"loss_reg", "loss_g", "grad_norm_g"}
    t = dd.DMDTrainer(
        distill_config(toy_teacher, toy_pairs, tmp_path / "c", fake_updates=3, num_pairs=16)
    )
    assert len(t.pairs) == 16
    assert "loss_fake" in t.train_step()


def test_resume_continues_exactly(toy_teacher, toy_pairs, tmp_path, monkeypatch):
    distill(distill_config(toy_teacher, toy_pairs, tmp_path / "whole"))

    real_step = dd.DMDTrainer.train_step

    def crash_at_25(self):
        if self.step == 25:
            raise RuntimeError("simulated crash")
        return real_step(self)

    monkeypatch.setattr(dd.DMDTrainer, "train_step", crash_at_25)
    with pytest.raises(RuntimeError):
        distill(distill_config(toy_teacher, toy_pairs, tmp_path / "cut"))
    monkeypatch.setattr(dd.DMDTrainer, "train_step", real_step)
    with pytest.raises(UserError, match="--resume latest"):
        distill(distill_config(toy_teacher, toy_pairs, tmp_path / "cut"))
    distill(distill_config(toy_teacher, toy_pairs, tmp_path / "cut", resume="latest"))

    whole, cut = log(tmp_path / "whole"), log(tmp_path / "cut")
    drop = ("samples_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in whole] == [
        {k: v for k, v in r.items() if k not in drop} for r in cut
    ]
    a = load_file(str(tmp_path / "whole" / "generator.safetensors"))
    b = load_file(str(tmp_path / "cut" / "generator.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_dm_loss_draws_from_the_teachers_grid(toy_teacher, toy_pairs, tmp_path):
    """The DM loss's noise levels: DMD's grid of --sigma-levels levels for an EDM-style teacher
    (an SD teacher brings its own timesteps: tests/test_precision.py)."""
    from dmdctl.core.sampling import dmd_sigma_grid

    teacher = load_teacher(toy_teacher)
    for levels in (1000, 37):
        trainer = dd.DMDTrainer(
            distill_config(toy_teacher, toy_pairs, tmp_path / str(levels), sigma_levels=levels)
        )
        want = dmd_sigma_grid(teacher.sigma_min, teacher.sigma_max, levels)
        torch.testing.assert_close(trainer.grid.cpu(), want.float())


def test_distill_says_its_length_in_generator_steps_and_dmd2_iterations(
    toy_teacher, toy_pairs, tmp_path, monkeypatch
):
    said = []
    monkeypatch.setattr(dd, "info", lambda message: said.append(message))
    distill(distill_config(toy_teacher, toy_pairs, tmp_path, fake_updates=2))
    assert "40 generator steps = 80 DMD2 iterations (2 fake-score updates each)" in said, said
