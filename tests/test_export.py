"""``export`` (dmdctl.commands.export): the generator file loads with safetensors alone and gives the
run's generator back."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cli_helpers import distill_config
from dmdctl.commands.export import export
from dmdctl.core.sampling import seeded_noise
from dmdctl.generators import load_generator
from dmdctl.settings.export import ExportConfig
from dmdctl.training.loop import distill


def test_export_loads_with_safetensors_alone_and_reproduces_the_generator(
    toy_teacher, toy_pairs, tmp_path
):
    distill(distill_config(toy_teacher, toy_pairs, tmp_path / "run", steps=20))
    out = tmp_path / "g.safetensors"
    export(ExportConfig(source=str(tmp_path / "run"), out=str(out)))
    state = load_file(str(out))
    assert any(k.startswith("backbone.") for k in state)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "dmdctl.generator" and meta["kind"] == "toy2d"
    assert json.loads(meta["config"])["num_modes"] == 8
    z = seeded_noise(range(100), (2,))
    exported = load_generator(out)
    trained = load_generator(tmp_path / "run" / "generator.safetensors")
    torch.testing.assert_close(exported(z), trained(z), rtol=0, atol=0)
    raw = tmp_path / "raw.safetensors"
    export(
        ExportConfig(
            source=str(tmp_path / "run" / "checkpoints" / "step-0000020"), out=str(raw), ema=False
        )
    )
    assert not torch.equal(load_generator(raw)(z), exported(z))


def test_model_cards_name_the_teacher_the_run_used():
    """A run from a local pipeline folder names that folder (as its generator file records it),
    not a preset; a run that named a preset names the pipeline and the preset."""
    from dmdctl.teachers.sd.generate import lora_model_card, model_card
    from dmdctl.training.lora import LoraSpec

    folder = "/data/pipelines/my-sdxl"
    spec = LoraSpec(4, 8.0, ("to_q", "to_k"))
    for train_config, expect in [
        ({"teacher": None, "teacher_path": "./my-sdxl"}, f"`{folder}` ("),
        ({"teacher": "sd", "teacher_path": "./my-sdxl"}, f"`{folder}` ("),
        ({"teacher": "sdxl", "teacher_path": "./my-sdxl"}, f"`{folder}` (dmdctl preset `sdxl`)"),
    ]:
        full = model_card(folder, "ab" * 32, train_config, Path("out"), [999], "sdxl")
        assert f"Distilled from {expect}" in full.replace("\n", " "), full
        lora = lora_model_card(
            folder, "ab" * 32, train_config, "out", [999], spec, {"arch": "sdxl"}
        )
        assert f"on the UNet of {expect}" in lora.replace("\n", " "), lora
        assert "Distilled from `sdxl`" not in full
