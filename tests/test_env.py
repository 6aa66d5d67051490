"""``dmdctl env``: the block a bug report needs, without the network (conftest's ``no_network``
refuses any connection) and without a GPU."""

import json
from importlib.metadata import version

import torch
from typer.testing import CliRunner

from dmdctl import __version__
from dmdctl.cli import app


def env_output(tmp_path, *args, **variables):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": None, **variables}
    r = CliRunner().invoke(app, ["env", *args], env=env)
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.output


def test_env_lists_versions_devices_and_folders(tmp_path, no_network):
    out = env_output(tmp_path, HF_HUB_OFFLINE="1")
    for fragment in (
        f"dmdctl: {__version__}",
        *(f"{p}: {version(p)}" for p in ("torch", "diffusers", "accelerate", "transformers")),
        "Python: 3.",
        "Platform: ",
        f"CUDA available: {torch.cuda.is_available()}",
        f"Hugging Face home (HF_HOME): {tmp_path / 'hf'}",
        f"Hugging Face hub cache: {tmp_path / 'hf' / 'hub'}",
        f"Accelerate default config: {tmp_path / 'hf' / 'accelerate' / 'default_config.yaml'} "
        "(not found)",
        "Offline mode (HF_HUB_OFFLINE): on",
        "torch hub folder (TORCH_HOME): ",
        "$HF_HUB_OFFLINE=1",
    ):
        assert fragment in out, (fragment, out)
    assert "Offline mode (HF_HUB_OFFLINE): off" in env_output(tmp_path)
    assert "Offline mode (HF_HUB_OFFLINE): off" in env_output(tmp_path, HF_HUB_OFFLINE="0")


def test_env_finds_the_accelerate_config(tmp_path):
    config = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("compute_environment: LOCAL_MACHINE\n")
    assert f"Accelerate default config: {config} (found)" in env_output(tmp_path)


def test_env_without_a_gpu(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = env_output(tmp_path)
    assert "CUDA available: False" in out and "GPU 0:" not in out


def test_env_json_parses(tmp_path, no_network):
    r = json.loads(env_output(tmp_path, "--json", HF_HUB_OFFLINE="yes"))
    assert r["dmdctl"] == __version__ and r["offline"] is True
    assert r["packages"]["torch"] == version("torch")
    assert r["torch"]["cuda_available"] == torch.cuda.is_available()
    assert len(r["torch"]["devices"]) == (
        torch.cuda.device_count() if torch.cuda.is_available() else 0
    )
    assert r["accelerate_config"] == {
        "path": str(tmp_path / "hf" / "accelerate" / "default_config.yaml"),
        "found": False,
    }
    assert r["hf_home"] == str(tmp_path / "hf")
