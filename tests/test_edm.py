"""EDM teachers: our ADM / DDPM++ / NCSN++ networks, the safe pickle loader, convert-edm, and a
CIFAR-10-shaped distillation through the CLI.

The test pickles are written in the record format of NVlabs' published checkpoints: each network
object is a REDUCE of ``torch_utils.persistence._reconstruct_persistent_obj`` with a meta dict
(type, version, module_src, class_name, state = the object's ``__dict__`` with ``_init_kwargs``),
``torch.nn.ModuleDict`` containers, parameters and storages pickled by torch itself, and numpy
scalars among the attributes (EDM stores ``skip_scale = np.sqrt(0.5)``).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import ok, one_line_error, real_store, run
from dmdctl.core.denoiser import EDMPrecond
from dmdctl.errors import UserError
from dmdctl.teachers import KINDS, load_teacher
from dmdctl.teachers.edm.networks import EDMBackbone
from dmdctl.teachers.edm.pickle_loader import backbone_from_checkpoint, read_edm_checkpoint

ADM = {
    "architecture": "DhariwalUNet",
    "img_resolution": 16,
    "img_channels": 3,
    "label_dim": 7,
    "model_kwargs": {
        "model_channels": 32,
        "channel_mult": [1, 2, 2],
        "num_blocks": 1,
        "attn_resolutions": [8, 4],
        "dropout": 0.1,
    },
}
DDPMPP = {
    "architecture": "SongUNet",
    "img_resolution": 16,
    "img_channels": 3,
    "label_dim": 10,
    "model_kwargs": {
        "augment_dim": 9,
        "model_channels": 16,
        "channel_mult": [1, 2],
        "num_blocks": 1,
        "attn_resolutions": [8],
        "dropout": 0.13,
        "embedding_type": "positional",
        "channel_mult_noise": 1,
        "encoder_type": "standard",
        "decoder_type": "standard",
        "resample_filter": [1, 1],
    },
}
NCSNPP = {
    "architecture": "SongUNet",
    "img_resolution": 16,
    "img_channels": 3,
    "label_dim": 0,
    "model_kwargs": {
        "model_channels": 16,
        "channel_mult": [1, 2],
        "num_blocks": 1,
        "attn_resolutions": [8],
        "dropout": 0.1,
        "embedding_type": "fourier",
        "channel_mult_noise": 2,
        "encoder_type": "residual",
        "decoder_type": "standard",
        "resample_filter": [1, 3, 3, 1],
    },
}
CIFAR_SHAPED = {
    "architecture": "SongUNet",
    "img_resolution": 32,
    "img_channels": 3,
    "label_dim": 10,
    "model_kwargs": dict(DDPMPP["model_kwargs"], model_channels=8, attn_resolutions=[16]),
}

MODULE_SRC = "# the defining module's source would be here; dmdctl never runs it\n"


def random_backbone(config: dict, seed: int = 0) -> EDMBackbone:
    """Our network with random weights everywhere (also where EDM initialises to zero)."""
    torch.manual_seed(seed)
    net = EDMBackbone(config).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5 / math.sqrt(max(p[0].numel(), 1)) if p.ndim > 1 else 0.1)
    return net


# --- writing pickles in the EDM record format --------------------------------------------------
@contextmanager
def persistence_module(marker: Path | None = None):
    """A stand-in ``torch_utils.persistence`` so pickle can name its function while dumping.

    Its function, if anything ever called it, would leave ``marker`` behind.
    """

    def _reconstruct_persistent_obj(meta):  # pragma: no cover - must never run
        if marker is not None:
            marker.write_text("called")
        raise AssertionError("the persistence hook was called")

    pkg = types.ModuleType("torch_utils")
    mod = types.ModuleType("torch_utils.persistence")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    sys.modules["torch_utils"], sys.modules["torch_utils.persistence"] = pkg, mod
    try:
        yield mod
    finally:
        del sys.modules["torch_utils"], sys.modules["torch_utils.persistence"]


class Persistent:
    """An object to be written as a persistence record (class name, init kwargs, state)."""

    def __init__(self, class_name: str, state: dict, module_src: str = MODULE_SRC):
        self.class_name, self.state, self.module_src = class_name, state, module_src


def _numpy_floats(d: dict) -> dict:
    # EDM's init arguments carry numpy scalars (np.sqrt(...)); so do ours
    return {k: np.float64(v) if isinstance(v, float) else v for k, v in d.items()}


def nvidia_precond(backbone: EDMBackbone, config: dict, module_src: str = MODULE_SRC):
    """The ``ema`` object of an EDM pickle: an EDMPrecond whose ``model`` is the network."""
    kwargs = dict(
        img_resolution=config["img_resolution"],
        img_channels=config["img_channels"],
        label_dim=config["label_dim"],
        use_fp16=False,
        model_type=config["architecture"],
        **config["model_kwargs"],
    )
    state = {
        k: v for k, v in vars(backbone).items() if k.startswith("_") and k != "_modules"
    }  # the nn.Module internals (_parameters, _buffers, hooks ...)
    state.update(
        training=False,
        _modules={"model": backbone.model},
        img_resolution=config["img_resolution"],
        img_channels=config["img_channels"],
        label_dim=config["label_dim"],
        use_fp16=False,
        sigma_min=0,
        sigma_max=float("inf"),
        sigma_data=0.5,
        _init_args=(),
        _init_kwargs=kwargs,
    )
    return Persistent("EDMPrecond", state, module_src)


class EDMPickler(pickle.Pickler):
    """Writes our network modules and :class:`Persistent` objects as persistence records."""

    def __init__(self, f, persistence):
        super().__init__(f, protocol=4)
        self.fn = persistence._reconstruct_persistent_obj

    def reducer_override(self, obj):
        if isinstance(obj, Persistent):
            name, state, src = obj.class_name, obj.state, obj.module_src
        elif (
            isinstance(obj, torch.nn.Module)
            and type(obj).__module__ == "dmdctl.teachers.edm.networks"
        ):
            name, src = type(obj).__name__, MODULE_SRC
            public = {
                k: v
                for k, v in vars(obj).items()
                if not k.startswith("_") and isinstance(v, (int, float, str, bool, list))
            }
            state = dict(vars(obj), **_numpy_floats(public))
            state.update(_init_args=(), _init_kwargs=_numpy_floats(public))
        else:
            return NotImplemented
        meta = dict(type="class", version=6, module_src=src, class_name=name, state=state)
        return self.fn, (meta,)


def write_edm_pickle(path: Path, ema, extra: dict | None = None, marker: Path | None = None):
    data = dict(
        ema=ema,
        loss_fn=Persistent("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)),
        augment_pipe=None,
        dataset_kwargs=dict(
            class_name="training.dataset.ImageFolderDataset",
            path="datasets/cifar10-32x32.zip",
            use_labels=True,
            xflip=False,
            cache=True,
            resolution=32,
            max_size=50000,
        ),
        **(extra or {}),
    )
    buf = io.BytesIO()
    with persistence_module(marker) as mod:
        EDMPickler(buf, mod).dump(data)
    path.write_bytes(buf.getvalue())
    return path


def edm_pickle(tmp_path: Path, config: dict, seed: int = 0, name: str = "net.pkl"):
    net = random_backbone(config, seed)
    return write_edm_pickle(tmp_path / name, nvidia_precond(net, config)), net


def denoise(backbone: EDMBackbone, x, sigma, labels) -> torch.Tensor:
    with torch.no_grad():
        return EDMPrecond(backbone).eval()(x, sigma, labels)


# --- the published architectures --------------------------------------------------------------
@pytest.mark.parametrize(
    ("preset", "count"), [("edm-imagenet64", 295_899_267), ("edm-cifar10", 55_735_299)]
)
def test_full_size_networks_have_the_published_parameter_counts(preset, count):
    config = KINDS["edm"].presets()[preset]
    with torch.device("meta"):
        net = EDMBackbone(config)
    assert sum(p.numel() for p in net.parameters()) == count
    assert (
        KINDS["edm"].default_steps_for(config) == {"edm-imagenet64": 40, "edm-cifar10": 18}[preset]
    )
    sd = net.state_dict()
    if preset == "edm-imagenet64":
        assert sd["model.map_label.weight"].shape == (768, 1000)
        assert "model.map_label.bias" not in sd
        for key in ("model.enc.64x64_conv.weight", "model.enc.32x32_block2.qkv.weight",
                    "model.dec.8x8_in0.proj.weight", "model.out_conv.weight"):  # fmt: skip
            assert key in sd, key
    else:
        assert sd["model.map_label.weight"].shape == (128, 10)
        assert sd["model.map_augment.weight"].shape == (128, 9)
        for key in ("model.enc.32x32_conv.weight", "model.enc.16x16_block0.qkv.weight",
                    "model.dec.32x32_aux_conv.weight", "model.enc.16x16_down.skip.weight"):  # fmt: skip
            assert key in sd, key


@pytest.mark.parametrize("config", [ADM, DDPMPP, NCSNPP], ids=["adm", "ddpmpp", "ncsnpp"])
def test_safe_loader_reads_edm_pickles_and_outputs_match(tmp_path, config):
    path, net = edm_pickle(tmp_path, config)
    ckpt = read_edm_checkpoint(path)
    assert ckpt.config["architecture"] == config["architecture"]
    assert ckpt.config["label_dim"] == config["label_dim"]
    # EDM stores sigma_min=0, sigma_max=inf; the sampler range is clipped to 0.002..80
    assert (ckpt.config["sigma_min"], ckpt.config["sigma_max"]) == (0.002, 80.0)
    assert ckpt.info["trained_dropout"] == pytest.approx(config["model_kwargs"]["dropout"])
    assert all(k.startswith("model.") for k in ckpt.state)  # NVIDIA's names, loaded strictly
    loaded = backbone_from_checkpoint(ckpt).eval()

    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0])
    labels = torch.tensor([0, 3, 6, -1]) if config["label_dim"] else None
    want, got = denoise(net, x, sigma, labels), denoise(loaded, x, sigma, labels)
    assert torch.isfinite(want).all() and want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- the loader runs nothing -------------------------------------------------------------------
class RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class RunsEval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').write('x')",)


class StorageRunsShell:
    """A tensor storage whose torch.save blob is itself a pickle calling os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import torch.storage

        return torch.storage._load_from_bytes, (pickle.dumps(RunsShell(self.marker)),)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (RunsShell, "system"),
        (RunsEval, "builtins.eval"),
        (StorageRunsShell, "tensor storage could not be read safely"),
    ],
    ids=["os.system", "eval", "storage-blob"],
)
def test_pickles_that_run_code_are_refused_and_nothing_runs(tmp_path, payload, message):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": payload(marker)}))
    with pytest.raises(UserError, match=message) as e:
        read_edm_checkpoint(path)
    assert "refusing" in str(e.value)
    assert not marker.exists()
    if payload is RunsShell:  # the payload is live: a plain pickle.load runs it
        pickle.loads(path.read_bytes())
        assert marker.exists()


def test_embedded_module_source_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil_src = f"open({str(marker)!r}, 'w').write('module_src ran')\n"
    net = random_backbone(ADM)
    # a genuine network whose module_src is hostile: the weights load, the source is ignored
    path = write_edm_pickle(tmp_path / "a.pkl", nvidia_precond(net, ADM, evil_src), marker=marker)
    loaded = backbone_from_checkpoint(read_edm_checkpoint(path))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in net.parameters())
    # a record of a class that is no part of an EDM network is refused outright
    rogue = Persistent("Exploit", {"_init_kwargs": {}}, evil_src)
    path = write_edm_pickle(tmp_path / "b.pkl", nvidia_precond(net, ADM), {"x": rogue}, marker)
    with pytest.raises(UserError, match="class 'Exploit'"):
        read_edm_checkpoint(path)
    assert not marker.exists()


# --- the networks under mixed precision and activation checkpointing ---------------------------
def test_bf16_autocast_and_gradient_checkpointing(tmp_path):
    config = dict(DDPMPP, model_kwargs=dict(DDPMPP["model_kwargs"], dropout=0.0))
    net = random_backbone(config)
    den = EDMPrecond(net)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma, labels = torch.tensor([0.3, 5.0]), torch.tensor([1, 2])
    ref = denoise(net, x, sigma, labels)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = den(x, sigma, labels)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).norm() / ref.norm() < 0.05

    def grads():
        net.zero_grad()
        den.train()(x, sigma, labels).square().mean().backward()
        return [p.grad.clone() for p in net.parameters() if p.grad is not None]

    plain = grads()
    net.enable_gradient_checkpointing()
    assert net.model.grad_checkpointing
    for a, b in zip(grads(), plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# --- the command line --------------------------------------------------------------------------


def test_convert_edm_errors_are_one_line(tmp_path):
    out = tmp_path / "t.safetensors"
    one_line_error(run("convert-edm", tmp_path / "missing.pkl", "-o", out), "file not found")
    text = tmp_path / "notes.pkl"
    text.write_text("this is not a pickle\n")
    one_line_error(run("convert-edm", text, "-o", out), "not a readable EDM pickle")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"ema": RunsShell(marker)}))
    one_line_error(run("convert-edm", evil, "-o", out), "refusing", "allow-list")
    assert not marker.exists() and not out.exists()
    # a teacher pickle or a preset without a converted file points at convert-edm
    pairs = tmp_path / "pairs"
    one_line_error(run("make-pairs", "--teacher-path", evil, "--out", pairs), "dmdctl convert-edm")
    one_line_error(run("sample", "--teacher", "edm-cifar10", "--out", pairs), "convert-edm")
    assert not marker.exists()


def test_cifar_shaped_conversion_pairs_distillation_and_sampling(tmp_path):
    pkl, net = edm_pickle(tmp_path, CIFAR_SHAPED, name="edm-cifar10-like.pkl")
    teacher = tmp_path / "teacher.safetensors"
    r = run("convert-edm", pkl, "-o", teacher)
    assert r.exit_code == 0, r.output
    state = load_file(str(teacher))
    assert all(k.startswith("backbone.model.") for k in state)
    loaded = load_teacher(teacher, expected="edm")
    assert loaded.sample_shape == (3, 32, 32) and loaded.num_classes == 10
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma, labels = torch.tensor([1.0, 10.0]), torch.tensor([2, 7])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.denoiser(x, sigma, labels), denoise(net, x, sigma, labels), atol=1e-5, rtol=0
        )

    pairs, dmd = tmp_path / "pairs", tmp_path / "dmd"
    r = run("make-pairs", "--teacher", "edm-cifar10", "--teacher-path", teacher,
            "--num-pairs", 8, "--shard-size", 8, "--batch-size", 8, "--steps", 2,
            "--out", pairs, "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    r = run("distill", "--teacher-path", teacher, "--pairs", pairs, "--out", dmd,
            "--steps", 2, "--batch-size", 4, "--pair-batch-size", 4, "--log-every", 1,
            "--checkpoint-every", 2, "--plot-samples", 20, "--warmup", 0, "--lr", 1e-4,
            "--cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    gen = dmd / "generator.safetensors"
    assert gen.is_file() and (dmd / "samples" / "step-0000002.png").is_file()

    outs = {}
    for k in (3, 5):
        r = run("sample", "--generator", gen, "--num", 4, "--class", k,
                "--out", tmp_path / f"s{k}", "--device", "cpu")  # fmt: skip
        assert r.exit_code == 0, r.output
        s = load_file(str(tmp_path / f"s{k}" / "samples.safetensors"))
        assert s["samples"].shape == (4, 3, 32, 32)
        assert torch.isfinite(s["samples"]).all()
        assert (s["labels"] == k).all()
        assert (tmp_path / f"s{k}" / "samples.png").is_file()
        outs[k] = s["samples"]
    # same seeds, another class: the label reaches the generator (the same class repeats exactly)
    r = run("sample", "--generator", gen, "--num", 4, "--class", 3,
            "--out", tmp_path / "again", "--device", "cpu")  # fmt: skip
    again = load_file(str(tmp_path / "again" / "samples.safetensors"))["samples"]
    assert torch.equal(again, outs[3])
    assert (outs[3] - outs[5]).abs().mean() > 1e-3 * outs[3].abs().mean()


def test_cifar_shaped_dmd2_with_gan_and_backward_simulation_survives_sigkill(tmp_path):
    """An EDM teacher (CIFAR-10-shaped, tiny): DMD2 with the GAN head on an ADM-style npz and a
    2-step generator, through the CLI; killed with SIGKILL after its first checkpoint, resumed,
    it ends with the weights of an uninterrupted run; it exports and samples."""
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    from cli_helpers import PROCESS_ENV
    from dmdctl.generators import load_generator
    from dmdctl.training import checkpoint as ck

    pkl, _ = edm_pickle(tmp_path, CIFAR_SHAPED, name="edm-cifar10-like.pkl")
    teacher = tmp_path / "teacher.safetensors"
    ok(run("convert-edm", pkl, "-o", teacher))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "real.npz", rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
             rng.integers(0, 10, 16))  # fmt: skip

    store = real_store(tmp_path / "real.npz", teacher)

    def args(out):
        return ["distill", "--teacher-path", teacher, "--real-data", store,
                "--gan-weight", 3e-3, "--reg-weight", 0, "--denoising-steps", "80,1",
                "--fake-updates", 2, "--steps", 6, "--batch-size", 2, "--log-every", 1,
                "--checkpoint-every", 2, "--plot-samples", 0, "--warmup", 0, "--cpu",
                "--out", out]  # fmt: skip

    # an EDM teacher has no data of its own: a GAN run without --real-data is refused in one line
    bare = [a for a in args(tmp_path / "bare") if a not in ("--real-data", store)]
    one_line_error(run(*bare), "needs real samples: make a store once with `dmdctl prepare-real")
    ok(run(*args(tmp_path / "whole")))
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "dmdctl", *map(str, args(cut))],
                            env=PROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    t0 = time.time()
    while not ck.list_checkpoints(cut / "checkpoints"):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < 120
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and not (cut / "generator.safetensors").exists()
    ok(run(*args(cut), "--resume", "latest"))
    last = "checkpoints/step-0000006"
    for name in ("generator", "fake", "gan_head", "optim_fake", "ema"):
        a = load_file(str(tmp_path / "whole" / last / f"{name}.safetensors"))
        b = load_file(str(cut / last / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ok(run("export", cut, "-o", tmp_path / "g.safetensors"))
    gen = load_generator(tmp_path / "g.safetensors")
    assert gen.nfe == 2 and gen.fn.sigmas == [80.0, 1.0]
    ok(run("sample", "--generator", tmp_path / "g.safetensors", "--num", 3, "--class", 4,
           "--out", tmp_path / "s", "--device", "cpu"))  # fmt: skip
    assert torch.isfinite(load_file(str(tmp_path / "s" / "samples.safetensors"))["samples"]).all()
