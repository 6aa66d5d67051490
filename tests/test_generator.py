"""Generator files and sample sources (dmdctl.generators): the file format other tools read,
one seed giving one sample whatever the batch, and the mix-ups refused with one line."""

import pytest
import torch
from safetensors import safe_open

from dmdctl.core.denoiser import OneStepGenerator
from dmdctl.errors import UserError
from dmdctl.generators import generate, load_generator, save_generator, teacher_source
from dmdctl.teachers import load_teacher


def test_file_format_round_trip(toy_teacher, tmp_path):
    teacher = load_teacher(toy_teacher)
    path = save_generator(
        teacher.denoiser, "toy2d", teacher.config, teacher.sha256, tmp_path / "g.safetensors",
        extra={"steps": 3, "note": "x"},
    )  # fmt: skip
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    # the names other tools and older files rely on
    assert meta["format"] == "dmdctl.generator" and meta["kind"] == "toy2d"
    assert meta["teacher_sha256"] == teacher.sha256 and meta["steps"] == "3"
    assert float(meta["sigma_max"]) == teacher.sigma_max
    source = load_generator(path)
    assert source.nfe == 1 and source.sample_shape == (2,)
    z = torch.randn(6, 2)
    want = OneStepGenerator(teacher.denoiser, teacher.sigma_max)(z)
    torch.testing.assert_close(source(z, None), want)


def test_a_run_folder_without_generator_and_a_teacher_file_are_refused(toy_teacher, tmp_path):
    with pytest.raises(UserError, match="has no generator.safetensors"):
        load_generator(tmp_path)
    with pytest.raises(UserError, match="is not a dmdctl generator file"):
        load_generator(toy_teacher)


def test_one_seed_one_sample_whatever_the_batch(toy_teacher):
    source = teacher_source(load_teacher(toy_teacher), 3)
    seeds = list(range(100, 110))
    whole, _ = generate(source, seeds, batch_size=10)
    parts, _ = generate(source, seeds, batch_size=3)
    torch.testing.assert_close(whole, parts)
    shifted, _ = generate(source, seeds[4:], batch_size=4)
    torch.testing.assert_close(whole[4:], shifted)
