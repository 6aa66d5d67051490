"""``make-pairs`` (dmdctl.commands.make_pairs): pairs are the teacher's ODE outputs of their seeds, an
interrupted run resumes to the same bytes, a folder of other pairs is refused."""

import json

import pytest
import torch
from safetensors.torch import load_file

import dmdctl.core.sampling as sampling
from cli_helpers import pairs_config
from dmdctl.commands.make_pairs import make_pairs
from dmdctl.core.sampling import heun_sample, karras_sigmas, seeded_noise
from dmdctl.data.pairs import load_pairs
from dmdctl.errors import UserError
from dmdctl.teachers import load_teacher


def test_pairs_are_the_teacher_ode_outputs_of_their_seeds(toy_teacher, tmp_path):
    make_pairs(pairs_config(toy_teacher, tmp_path, seed=7))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_pairs"] == 100
    assert [s["count"] for s in manifest["shards"]] == [32, 32, 32, 4]
    assert manifest["sampler"] == {
        "name": "heun",
        "steps": 6,
        "nfe": 11,
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "rho": 7.0,
    }
    pairs = load_pairs(tmp_path)
    teacher = load_teacher(toy_teacher)
    assert manifest["teacher"]["sha256"] == teacher.sha256
    # pair 40 comes from seed 47 alone: regenerate it independently
    z = seeded_noise([47], (2,))
    assert torch.equal(pairs.noise[40], z[0])
    y = heun_sample(teacher.denoiser, z, karras_sigmas(6, 0.002, 80.0))
    torch.testing.assert_close(pairs.target[40], y[0], rtol=1e-5, atol=1e-6)


def test_resume_after_interruption_gives_byte_identical_shards(toy_teacher, tmp_path, monkeypatch):
    make_pairs(pairs_config(toy_teacher, tmp_path / "whole"))

    calls = {"n": 0}
    real = sampling.heun_sample

    def dies_in_third_shard(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # 2 batches per shard: the 5th batch is in shard 3
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sampling, "heun_sample", dies_in_third_shard)
    with pytest.raises(KeyboardInterrupt):
        make_pairs(pairs_config(toy_teacher, tmp_path / "cut"))
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]
    assert not (tmp_path / "cut" / "pairs-00002.safetensors").exists()

    monkeypatch.setattr(sampling, "heun_sample", real)
    result = make_pairs(pairs_config(toy_teacher, tmp_path / "cut"))
    assert result["made_now"] == 100 - 64
    names = sorted(p.name for p in (tmp_path / "whole").glob("pairs-*.safetensors"))
    assert len(names) == 4
    for name in names:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes()
    a = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    b = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert a["shards"] == b["shards"] and b["complete"]
    # seeds are each present exactly once
    seeds = torch.cat([load_file(str(tmp_path / "cut" / n))["seed"] for n in names])
    assert seeds.tolist() == list(range(100))


def test_rerun_with_other_settings_is_refused(toy_teacher, tmp_path):
    make_pairs(pairs_config(toy_teacher, tmp_path, num_pairs=40))
    with pytest.raises(UserError, match="different 'sampler'"):
        make_pairs(pairs_config(toy_teacher, tmp_path, num_pairs=40, steps=7))


def test_pairs_from_another_teacher_are_refused(toy_teacher, tmp_path):
    from dmdctl.commands.train_teacher import train_teacher
    from dmdctl.settings.train_teacher import TrainTeacherConfig

    make_pairs(pairs_config(toy_teacher, tmp_path / "p", num_pairs=20))
    train_teacher(TrainTeacherConfig(out=str(tmp_path / "t2"), steps=5, seed=1))
    other = load_teacher(tmp_path / "t2" / "teacher.safetensors")
    with pytest.raises(UserError, match="different teacher file"):
        load_pairs(tmp_path / "p", other)


def test_float16_storage(toy_teacher, tmp_path):
    make_pairs(pairs_config(toy_teacher, tmp_path, num_pairs=10, dtype="float16"))
    assert load_pairs(tmp_path).target.dtype == torch.float16
