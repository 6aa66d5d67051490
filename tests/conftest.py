import os
import socket

import pytest
import torch

os.environ.setdefault("DMDCTL_QUIET", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_teacher(tmp_path_factory) -> str:
    """A briefly trained toy2d teacher file (a few seconds; good enough to exercise the code)."""
    from dmdctl.commands.train_teacher import train_teacher
    from dmdctl.settings.train_teacher import TrainTeacherConfig

    out = tmp_path_factory.mktemp("teacher")
    train_teacher(TrainTeacherConfig(out=str(out), steps=300, batch_size=256))
    return str(out / "teacher.safetensors")


@pytest.fixture(scope="session")
def toy_pairs(toy_teacher, tmp_path_factory) -> str:
    from dmdctl.commands.make_pairs import make_pairs
    from dmdctl.settings.make_pairs import MakePairsConfig

    out = tmp_path_factory.mktemp("pairs")
    make_pairs(
        MakePairsConfig(
            teacher_path=toy_teacher, out=str(out), num_pairs=256, shard_size=64, steps=8
        )
    )
    return str(out)


# --- tiny Stable Diffusion pipelines (random weights, written with save_pretrained) -------------
@pytest.fixture(scope="session")
def sd_pipe(tmp_path_factory):
    """A tiny random eps-prediction SD pipeline folder, built once per test session."""
    from dmdctl.teachers.sd.testing import build_pipeline

    return build_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    """The prompts of ``cli_helpers.SD_PROMPTS``, one per line."""
    from cli_helpers import SD_PROMPTS

    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("\n".join(SD_PROMPTS) + "\n")
    return p


@pytest.fixture
def hf_offline(monkeypatch):
    """No test may reach for the network: hub ids resolve from the local cache only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def sd_trainer(sd_pipe, prompts_file, hf_offline):
    """Build a DMDTrainer on the tiny SD pipeline (no pairs, batch 2, CPU); keywords override."""
    from dmdctl.settings.distill import DistillConfig
    from dmdctl.training.trainer import DMDTrainer

    def build(out, **kw):
        base = dict(
            teacher_path=str(sd_pipe),
            prompts=str(prompts_file),
            out=str(out),
            reg_weight=0,
            batch_size=2,
            fake_updates=1,
            real_guidance=1.75,
            plot_samples=0,
            cpu=True,
        )
        cfg = DistillConfig(**{**base, **kw})
        cfg.validate()
        return DMDTrainer(cfg)

    return build


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny random transformers CLIP model with its processor, saved locally."""
    import json

    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    d = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        projection_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(d / "model")
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(d / "model")
    return str(d / "model")


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """An Inception weights file of the right layout with RANDOM weights (tests only) and its
    sha256."""
    from dmdctl.files import sha256_file
    from dmdctl.metrics.inception import build_network

    torch.manual_seed(0)
    net = build_network()
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path, sha256_file(path)
