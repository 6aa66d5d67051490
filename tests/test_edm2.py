"""EDM2 teachers: our magnitude-preserving UNet against the paper's equations, EDM2 pickles read
as data (and bad ones refused), the guided real score (CFG with an unconditional net,
autoguidance with a weaker one), one-step and few-step runs that train, resume exactly, export
and sample, in pixels (ImageNet-64-shaped) and in VAE latents (ImageNet-512-shaped, tiny).

The pickles are written here in the record format of NVlabs' published EDM2 files (a
``dnnlib.EasyDict`` with ``ema``: a ``Precond`` record holding ``UNet`` / ``Block`` / ``MPConv``
/ ``MPFourier`` records in float16 with 0-d gains, ``encoder``: a ``StabilityVAEEncoder`` record
with float32 numpy arrays, ``loss_fn``, ``dataset_kwargs``), from our own classes: no NVIDIA code
is involved.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cli_helpers import ok, one_line_error, run
from dmdctl.errors import UserError
from dmdctl.teachers import KINDS, load_teacher
from dmdctl.teachers.edm2.networks import EDM2Backbone
from test_edm import MODULE_SRC, Persistent, RunsShell, persistence_module

KIND = KINDS["edm2"]
RANGE = {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}
# ImageNet-64-shaped (pixels) and ImageNet-512-shaped (4 latent channels), tiny; 8 channels per
# attention head so that the 32-channel blocks have heads (EDM2's 64 would leave none)
TINY = {
    "img_resolution": 16,
    "img_channels": 3,
    "label_dim": 10,
    "logvar_channels": 16,
    "model_kwargs": {
        "model_channels": 16,
        "channel_mult": [1, 2],
        "num_blocks": 1,
        "attn_resolutions": [8],
        "channels_per_head": 8,
        "dropout": 0.0,
    },
    **RANGE,
    "encoder": {"class": "StandardRGBEncoder"},
}
SCALE = [0.5 / s for s in (4.17, 4.62, 3.71, 3.28)]
BIAS = [
    -m * 0.5 / s for m, s in zip((5.81, 3.25, 0.12, -2.15), (4.17, 4.62, 3.71, 3.28), strict=True)
]
LATENT = dict(
    TINY,
    img_channels=4,
    encoder={"class": "StabilityVAEEncoder", "vae": "stabilityai/sd-vae-ft-mse",
             "scale": SCALE, "bias": BIAS},
)  # fmt: skip


def tiny(config=TINY, **model_kwargs) -> dict:
    return dict(config, model_kwargs=dict(config["model_kwargs"], **model_kwargs))


def random_net(config: dict = TINY, seed: int = 0) -> EDM2Backbone:
    """Our network with random weights everywhere, the gains (0 at initialisation) included,
    rounded to float16 as the published pickles store them."""
    torch.manual_seed(seed)
    net = EDM2Backbone(config).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) if p.ndim > 1 else 0.3 + 0.5 * torch.rand_like(p))
            p.copy_(p.half().float())
        for b in net.buffers():
            b.copy_(b.half().float())
    return net


# --- writing pickles in EDM2's record format ---------------------------------------------------
@contextmanager
def dnnlib_module():
    """A stand-in ``dnnlib.util.EasyDict`` so pickle can name the class while dumping."""
    pkg, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
    easy = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    util.EasyDict, pkg.util = easy, util
    sys.modules["dnnlib"], sys.modules["dnnlib.util"] = pkg, util
    try:
        yield easy
    finally:
        del sys.modules["dnnlib"], sys.modules["dnnlib.util"]


NAMES = {"EDM2Backbone": "Precond", "UNet": "UNet", "Block": "Block", "MPConv": "MPConv",
         "MPFourier": "MPFourier"}  # fmt: skip


class EDM2Pickler(pickle.Pickler):
    """Writes our EDM2 modules as persistence records under NVIDIA's class names."""

    def __init__(self, f, persistence, kwargs: dict, module_src: str = MODULE_SRC):
        super().__init__(f, protocol=4)
        self.fn, self.kwargs, self.src = persistence._reconstruct_persistent_obj, kwargs, module_src

    def reducer_override(self, obj):
        if isinstance(obj, Persistent):
            name, state, src = obj.class_name, obj.state, obj.module_src
        elif isinstance(obj, torch.nn.Module) and type(obj).__name__ in NAMES:
            name, src = NAMES[type(obj).__name__], self.src
            state = dict(vars(obj), _init_args=(), _init_kwargs={})
            if name == "Precond":
                state.update(self.kwargs, _init_kwargs=dict(self.kwargs))
        else:
            return NotImplemented
        meta = dict(type="class", version=6, module_src=src, class_name=name, state=state)
        return self.fn, (meta,)


def nvidia_layout(net: EDM2Backbone) -> EDM2Backbone:
    """A copy as NVIDIA's files hold it: float16, the gains 0-d."""
    net = copy.deepcopy(net).half()
    for m in net.modules():
        for key in ("emb_gain", "out_gain"):
            if key in m._parameters:
                m._parameters[key] = torch.nn.Parameter(m._parameters[key].data.reshape(()), False)
    return net


def precond_kwargs(config: dict) -> dict:
    """The init kwargs of NVIDIA's Precond: the interface, use_fp16, the network's settings."""
    return dict(img_resolution=config["img_resolution"], img_channels=config["img_channels"],
                label_dim=config["label_dim"], use_fp16=True,
                logvar_channels=config["logvar_channels"], **config["model_kwargs"])  # fmt: skip


def encoder_record(config: dict, **state):
    if config["encoder"]["class"] == "StandardRGBEncoder":
        return Persistent("StandardRGBEncoder", {"_init_args": (), "_init_kwargs": {}})
    base = dict(vae_name="stabilityai/sd-vae-ft-mse", batch_size=8, _vae=None, _init_args=(),
                _init_kwargs={}, scale=np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28]))  # fmt: skip
    base["bias"] = np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * base["scale"]
    return Persistent("StabilityVAEEncoder", dict(base, **state))


def write_edm2_pickle(path: Path, net, config: dict, extra=None, kwargs=None, marker=None,
                      module_src: str = MODULE_SRC, encoder="default") -> Path:  # fmt: skip
    with dnnlib_module() as easy, persistence_module(marker) as mod:
        data = easy(
            ema=nvidia_layout(net) if isinstance(net, EDM2Backbone) else net,
            loss_fn=Persistent(
                "EDM2Loss",
                dict(P_mean=-0.4, P_std=1.0, sigma_data=0.5, _init_args=(), _init_kwargs={}),
            ),  # fmt: skip
            dataset_kwargs=easy(
                class_name="training.dataset.ImageFolderDataset",
                path="datasets/img512-sd.zip",
                use_labels=True,
            ),  # fmt: skip
            encoder=encoder_record(config) if encoder == "default" else encoder,
            **(extra or {}),
        )
        buf = io.BytesIO()
        EDM2Pickler(buf, mod, kwargs or precond_kwargs(config), module_src).dump(data)
    path.write_bytes(buf.getvalue())
    return path


def edm2_pickle(tmp_path: Path, config: dict = TINY, seed: int = 0, name: str = "net.pkl"):
    net = random_net(config, seed)
    return write_edm2_pickle(tmp_path / name, net, config), net


def converted(tmp_path: Path, config: dict = TINY, seed: int = 0, name: str = "t", *extra):
    pkl, net = edm2_pickle(tmp_path, config, seed, f"{name}.pkl")
    out = tmp_path / f"{name}.safetensors"
    ok(run("convert-edm", pkl, "-o", out, *extra))
    return out, net


# --- a reference computed from the paper's equations, outside dmdctl's modules ----------------
def reference_x0(state: dict, config: dict, x, sigma, onehot):
    """EDM2's denoiser, written out as functions of the state dict (einsum attention, box-filter
    resampling by pooling and repetition, explicit mixing weights)."""
    mk = config["model_kwargs"]
    c = mk["model_channels"]
    cblock = [c * m for m in mk["channel_mult"]]
    heads_of = lambda ch: ch // mk.get("channels_per_head", 64)  # noqa: E731
    sd = config["sigma_data"]
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    c_in, c_noise = 1 / (s**2 + sd**2).sqrt(), sigma.log() / 4

    def unit(t, dims):  # divide by eps + RMS over dims
        n = math.prod(t.shape[d] for d in dims)
        return t / (1e-4 + t.square().sum(dims, keepdim=True).sqrt() / math.sqrt(n))

    def weight(name, gain=1.0):
        w = state[name].double()
        fan = w[0].numel()
        return unit(w, list(range(1, w.ndim))) * gain / math.sqrt(fan)

    def conv(h, name):
        w = weight(name)
        return F.conv2d(h, w, padding=w.shape[-1] // 2)

    def silu(t):
        return t * torch.sigmoid(t) / 0.596

    def mix(a, b, t):
        return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2)

    def cat(a, b, t=0.5):
        na, nb = a.shape[1], b.shape[1]
        k = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
        return torch.cat([a * k * (1 - t) / math.sqrt(na), b * k * t / math.sqrt(nb)], 1)

    def fourier(v, prefix):
        arg = (
            v.double()[:, None] * state[prefix + "freqs"].double()
            + state[prefix + "phases"].double()
        )
        return math.sqrt(2) * torch.cos(arg)

    emb = fourier(c_noise, "unet.emb_fourier.") @ weight("unet.emb_noise.weight").T
    if config["label_dim"]:
        lab = onehot if onehot is not None else torch.zeros(1, config["label_dim"])
        emb = mix(
            emb,
            (lab.double() * math.sqrt(config["label_dim"])) @ weight("unet.emb_label.weight").T,
            0.5,
        )
    emb = silu(emb)

    def block(h, p, flavor, mode, heads):
        if mode == "down":
            h = F.avg_pool2d(h, 2)
        elif mode == "up":
            h = h.repeat_interleave(2, 2).repeat_interleave(2, 3)
        skip = p + "conv_skip.weight" in state
        if flavor == "enc":
            if skip:
                h = conv(h, p + "conv_skip.weight")
            h = unit(h, [1])
        y = conv(silu(h), p + "conv_res0.weight")
        scale = emb @ weight(p + "emb_linear.weight", state[p + "emb_gain"].double()).T + 1
        y = conv(silu(y * scale[:, :, None, None]), p + "conv_res1.weight")
        if flavor == "dec" and skip:
            h = conv(h, p + "conv_skip.weight")
        h = mix(h, y, 0.3)
        if heads:
            n, ch, hh, ww = h.shape
            qkv = unit(
                conv(h, p + "attn_qkv.weight").reshape(n, heads, ch // heads, 3, hh * ww), [2]
            )
            q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
            a = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(ch // heads)).softmax(-1)
            o = torch.einsum("nhqk,nhck->nhcq", a, v).reshape(n, ch, hh, ww)
            h = mix(h, conv(o, p + "attn_proj.weight"), 0.3)
        return h.clamp(-256, 256)

    h = torch.cat([(c_in * x).double(), torch.ones_like(x[:, :1]).double()], 1)
    skips, res0 = [], config["img_resolution"]
    attn = mk["attn_resolutions"]
    for level, ch in enumerate(cblock):
        res = res0 >> level
        if level == 0:
            h = conv(h, f"unet.enc.{res}x{res}_conv.weight")
        else:
            h = block(h, f"unet.enc.{res}x{res}_down.", "enc", "down", 0)
        skips.append(h)
        for i in range(mk["num_blocks"]):
            h = block(
                h,
                f"unet.enc.{res}x{res}_block{i}.",
                "enc",
                "keep",
                heads_of(ch) if res in attn else 0,
            )
            skips.append(h)
    for level in reversed(range(len(cblock))):
        res, ch = res0 >> level, cblock[level]
        if level == len(cblock) - 1:
            h = block(h, f"unet.dec.{res}x{res}_in0.", "dec", "keep", heads_of(ch))
            h = block(h, f"unet.dec.{res}x{res}_in1.", "dec", "keep", 0)
        else:
            h = block(h, f"unet.dec.{res}x{res}_up.", "dec", "up", 0)
        for i in range(mk["num_blocks"] + 1):
            h = cat(h, skips.pop())
            h = block(
                h,
                f"unet.dec.{res}x{res}_block{i}.",
                "dec",
                "keep",
                heads_of(ch) if res in attn else 0,
            )
    w = weight("unet.out_conv.weight", state["unet.out_gain"].double())
    f = F.conv2d(h, w, padding=1)
    return (c_skip.double() * x.double() + c_out.double() * f).float()


def reference_logvar(state: dict, sigma) -> torch.Tensor:
    arg = (sigma.log() / 4).double()[:, None] * state["logvar_fourier.freqs"].double()
    feats = math.sqrt(2) * torch.cos(arg + state["logvar_fourier.phases"].double())
    w = state["logvar_linear.weight"].double()
    w = w / (1e-4 + w.norm(dim=1, keepdim=True) / math.sqrt(w.shape[1])) / math.sqrt(w.shape[1])
    return (feats @ w.T).flatten().float()


def denoise(net: EDM2Backbone, x, sigma, labels) -> torch.Tensor:
    den = KIND.build(dict(TINY, **{k: v for k, v in RANGE.items()}))
    den.backbone = net
    with torch.no_grad():
        return den.eval()(x, sigma, labels)


# --- the network ------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [TINY, LATENT], ids=["pixels", "latents"])
def test_x0_and_logvar_equal_a_reference_computed_from_the_equations(config):
    net = random_net(config)
    den = KIND.build(config)
    den.backbone.load_state_dict(net.state_dict())
    den.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, config["img_channels"], 16, 16, generator=g) * 2
    sigma = torch.tensor([0.002, 0.3, 1.0, 7.0, 80.0])
    labels = torch.tensor([0, 3, 9, -1, 5])
    onehot = F.one_hot(labels.clamp(min=0), 10).float() * (labels >= 0)[:, None]
    state = {k: v.reshape(()) if k.endswith("_gain") else v for k, v in net.state_dict().items()}
    with torch.no_grad():
        got = den(x, sigma, labels)
        want = reference_x0(state, config, x, sigma, onehot)
        # no labels: EDM2's all-zero label vector
        got_none, want_none = den(x, sigma, None), reference_x0(state, config, x, sigma, None)
        lv = den.logvar(sigma)
    assert want.abs().max() > 0.1 and (got - den(x, sigma, labels.roll(1))).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_none, want_none, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lv, reference_logvar(net.state_dict(), sigma), atol=1e-5, rtol=1e-5)


def test_full_size_networks():
    """The published sizes build (on the meta device) with NVIDIA's parameter names and counts."""
    counts = {}
    for name, cfg in KIND.presets().items():
        with torch.device("meta"):
            net = EDM2Backbone(cfg)
        counts[name] = sum(p.numel() for p in net.parameters())
        sd = net.state_dict()
        assert sd["unet.emb_label.weight"].shape == (
            cfg["model_kwargs"]["model_channels"] * 4,
            1000,
        )
        for key in ("unet.enc.64x64_conv.weight", "unet.enc.16x16_block2.attn_qkv.weight",
                    "unet.dec.8x8_in0.attn_proj.weight", "unet.out_conv.weight",
                    "logvar_linear.weight", "unet.emb_fourier.freqs"):  # fmt: skip
            assert key in sd, (name, key)
        assert "unet.enc.32x32_block0.attn_qkv.weight" not in sd  # attention at 16 and 8 only
        assert sd["unet.enc.64x64_conv.weight"].shape[1] == cfg["img_channels"] + 1
    # the counts NVIDIA's own Precond gives for these arguments (checked once, outside the
    # repository, with NVlabs/edm2's code on the meta device; docs/guide/edm.md)
    assert counts == {"edm2-img512-s-autog": 280_212_837, "edm2-img512-s-guid": 280_212_837,
                      "edm2-img512-xxl-autog": 1_523_164_773, "edm2-img64-s-autog": 280_209_381}  # fmt: skip


# --- conversion -------------------------------------------------------------------------------
def test_conversion_round_trip_strict_and_outputs_equal(tmp_path):
    teacher, net = converted(tmp_path)
    state = load_file(str(teacher))
    assert set(state) == {f"backbone.{k}" for k in net.state_dict()}  # strict: nothing else
    assert state["backbone.unet.out_gain"].shape == (1,)  # NVIDIA's 0-d gains
    t = load_teacher(teacher, expected="edm2")
    assert t.sample_shape == (3, 16, 16) and t.num_classes == 10
    assert t.config["encoder"] == {"class": "StandardRGBEncoder"}
    assert t.config["model_kwargs"]["channels_per_head"] == 8
    g = torch.Generator().manual_seed(2)
    x, sigma = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([0.05, 2.0, 60.0])
    labels = torch.tensor([1, 8, -1])
    with torch.no_grad():
        torch.testing.assert_close(t.denoiser(x, sigma, labels), denoise(net, x, sigma, labels),
                                   atol=1e-6, rtol=0)  # fmt: skip
    # the generator file of a converted teacher reloads as the same network
    from dmdctl.teachers import build_network, load_state

    _, kind, cfg, den = build_network(teacher, *load_state(teacher, "dmdctl.teacher"))
    assert kind.name == "edm2" and cfg == t.config


def test_latent_conversion_records_the_encoder_and_the_vae(tmp_path, tiny_vae):
    pkl, _ = edm2_pickle(tmp_path, LATENT)
    out = tmp_path / "t.safetensors"
    ok(run("convert-edm", pkl, "-o", out, "--vae", tiny_vae))
    t = load_teacher(out)
    enc = t.config["encoder"]
    assert enc["class"] == "StabilityVAEEncoder" and enc["vae"] == str(Path(tiny_vae).resolve())
    # the file's float32 arrays, as NVIDIA's constructor computes them
    np.testing.assert_allclose(enc["scale"], SCALE, rtol=1e-6)
    np.testing.assert_allclose(enc["bias"], BIAS, rtol=1e-5)
    # without --vae the pickle's VAE is recorded (a hub id, not fetched by convert-edm)
    ok(run("convert-edm", pkl, "-o", tmp_path / "hub.safetensors"))
    assert (
        load_teacher(tmp_path / "hub.safetensors").config["encoder"]["vae"]
        == "stabilityai/sd-vae-ft-mse"
    )


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> str:
    """A random AutoencoderKL (2 blocks: latents at 1/2 the image size) written to a folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                        layers_per_block=1, norm_num_groups=4, sample_size=32)  # fmt: skip
    folder = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(folder)
    return str(folder)


def test_vae_codec_is_edm2s_scaling_around_the_vae(tmp_path, tiny_vae):
    from diffusers import AutoencoderKL

    from dmdctl.teachers.edm2.encoders import StabilityVAECodec

    codec = KIND.codec_for(dict(LATENT, encoder=dict(LATENT["encoder"], vae=tiny_vae)))
    assert isinstance(codec, StabilityVAECodec) and codec.latent
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    scale, bias = torch.tensor(SCALE).view(1, 4, 1, 1), torch.tensor(BIAS).view(1, 4, 1, 1)
    with torch.no_grad():
        img = codec.decode(z)
        want = vae.decode((z - bias) / scale).sample.clamp(0, 1) * 2 - 1
        assert img.shape == (3, 3, 32, 32)
        torch.testing.assert_close(img, want, atol=1e-6, rtol=0)
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        enc = vae.encode((x + 1) / 2).latent_dist.mean * scale + bias  # the VAE sees [0, 1]
        torch.testing.assert_close(codec.encode(x), enc, atol=1e-6, rtol=0)
    assert KIND.codec_for(TINY).latent is False


# --- bad pickles --------------------------------------------------------------------------------
class FakeArray:
    """Pickles as a numpy array whose raw bytes do not fit its shape."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (
            _reconstruct,
            (np.ndarray, (0,), b"b"),
            (1, (4,), np.dtype("float32"), False, b"\0" * 3),
        )


def _bad_cases(tmp_path: Path, marker: Path) -> dict:
    net = random_net()
    with_edm = {"x": Persistent("DhariwalUNet", {"_init_args": (), "_init_kwargs": {}})}
    no_logvar = copy.deepcopy(net)
    del no_logvar._modules["logvar_linear"]
    return {
        "os.system in the encoder": (dict(encoder=RunsShell(marker)), "system"),
        "object array as the VAE scale": (
            dict(encoder=encoder_record(LATENT, scale=np.array([RunsShell(marker)], dtype=object))),
            "non-numeric dtype",
        ),
        "array bytes that do not fit": (
            dict(encoder=encoder_record(LATENT, scale=FakeArray())),
            "does not fit its shape",
        ),  # fmt: skip
        "an EDM class in an EDM2 file": (dict(extra=with_edm), "holds no DhariwalUNet"),
        "a class of neither format": (
            dict(extra={"x": Persistent("Exploit", {"_init_kwargs": {}})}),
            "class 'Exploit'",
        ),
        "no log-variance head": (dict(net=no_logvar), "no MPConv 'logvar_linear'"),
        "weights that do not fit the kwargs": (
            dict(kwargs=dict(precond_kwargs(TINY), model_channels=24)),
            "do not match",
        ),
        "an unknown network argument": (
            dict(kwargs=dict(precond_kwargs(TINY), warp_speed=9)),
            "unknown EDM2 network argument",
        ),
        "the VAE encoder on a pixel network": (
            dict(encoder=encoder_record(LATENT)),
            "with the VAE encoder",
        ),  # fmt: skip
    }


def test_bad_edm2_pickles_are_refused_in_one_line_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "t.safetensors"
    for name, (case, message) in _bad_cases(tmp_path, marker).items():
        pkl = write_edm2_pickle(
            tmp_path / "bad.pkl", case.get("net", random_net()), TINY, extra=case.get("extra"),
            kwargs=case.get("kwargs"), marker=marker, encoder=case.get("encoder", "default"),
        )  # fmt: skip
        r = run("convert-edm", pkl, "-o", out)
        try:
            one_line_error(r, message)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
        assert not out.exists() and not marker.exists(), name
    # the payloads are live: a plain pickle.load of the encoder case runs it
    pickle.loads(pickle.dumps(RunsShell(marker)))
    assert marker.exists()


def test_embedded_module_source_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = f"open({str(marker)!r}, 'w').write('module_src ran')\n"
    pkl = write_edm2_pickle(tmp_path / "a.pkl", random_net(), TINY, marker=marker, module_src=evil)
    ok(run("convert-edm", pkl, "-o", tmp_path / "t.safetensors"))
    assert not marker.exists()
    # the EDM reader (read_edm_checkpoint) refuses an EDM2 file: one format per reader
    from dmdctl.teachers.edm.pickle_loader import read_edm_checkpoint

    with pytest.raises(UserError, match="holds no"):
        read_edm_checkpoint(pkl)


# --- guidance -------------------------------------------------------------------------------------
def test_guided_denoiser_mixes_the_two_branches_with_the_scale():
    from dmdctl.teachers.edm2.kind import GuidedEDM2

    main, cond_guide = KIND.build(TINY).eval(), KIND.build(TINY).eval()
    uncond = KIND.build(dict(TINY, label_dim=0)).eval()
    for den, seed in ((main, 0), (cond_guide, 1), (uncond, 2)):
        den.backbone.load_state_dict(
            random_net(dict(TINY, label_dim=den.backbone.label_dim), seed).state_dict()
        )
    g = torch.Generator().manual_seed(0)
    x, sigma, labels = (
        torch.randn(4, 3, 16, 16, generator=g),
        torch.tensor([0.1, 1, 5, 40.0]),
        torch.tensor([1, 2, 3, 4]),
    )
    with torch.no_grad():
        d = main(x, sigma, labels)
        for guide, given in ((uncond, None), (cond_guide, labels)):
            ref = guide(x, sigma, given)
            for w in (1.0, 1.4, 2.1):
                out = GuidedEDM2(main, guide, w, conditional=given is not None)(x, sigma, labels)
                torch.testing.assert_close(out, ref + w * (d - ref), atol=1e-5, rtol=1e-5)
        # the conditional guide does see the labels (autoguidance differs from guide(x, None))
        auto = GuidedEDM2(main, cond_guide, 2.0, conditional=True)(x, sigma, labels)
        wrong = cond_guide(x, sigma, None)
        assert (auto - (wrong + 2 * (d - wrong))).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["cfg", "autoguidance"])
def test_real_score_in_the_training_step_is_the_guided_mix(tmp_path, mode, monkeypatch):
    """The DM loss's mu_real is D_g + w (D - D_g) of the teacher and guide files, computed here
    from freshly loaded copies on the inputs the step gave them; the CFG guide gets no labels,
    the autoguidance guide the step's labels."""
    from dmdctl.settings.distill import DistillConfig
    from dmdctl.training import trainer as tr

    teacher, _ = converted(tmp_path, TINY, 0, "teacher")
    guide_cfg = dict(TINY, label_dim=0) if mode == "cfg" else tiny(model_channels=8)
    guide, _ = converted(tmp_path, guide_cfg, 1, "guide")
    cfg = DistillConfig(teacher_path=str(teacher), guide_net=str(guide), guide_mode=mode,
                        real_guidance=2.5, out=str(tmp_path / "run"), steps=1, batch_size=3,
                        reg_weight=0, warmup=0, plot_samples=0, cpu=True)  # fmt: skip
    t = tr.DMDTrainer(cfg)
    seen = {}

    def hook(name):
        def record(mod, args, out):
            seen.setdefault(name, (args, out.detach().clone()))

        return record

    t.teacher.denoiser.register_forward_hook(hook("main"))
    t.real.guide.register_forward_hook(hook("guide"))
    real_loss = tr.dm_loss

    def dm_loss(x, mu_real, mu_fake):
        seen["mu_real"] = mu_real
        return real_loss(x, mu_real, mu_fake)

    monkeypatch.setattr(tr, "dm_loss", dm_loss)
    t.train_step()
    (x, sigma, labels), _ = seen["main"]
    assert labels is not None and labels.dtype == torch.int64
    assert (seen["guide"][0][2] is None) == (mode == "cfg")
    with torch.no_grad():
        d = load_teacher(teacher).denoiser(x, sigma, labels)
        g = load_teacher(guide).denoiser(x, sigma, None if mode == "cfg" else labels)
    torch.testing.assert_close(seen["mu_real"], g + 2.5 * (d - g), atol=1e-5, rtol=1e-5)
    assert (seen["mu_real"] - d).abs().max() > 1e-3  # the guide changed the real score


def test_guidance_refusals(tmp_path):
    teacher, _ = converted(tmp_path, TINY, 0, "teacher")
    uncond, _ = converted(tmp_path, dict(TINY, label_dim=0), 1, "uncond")
    small, _ = converted(tmp_path, tiny(model_channels=8), 2, "small")
    big, _ = converted(tmp_path, dict(TINY, img_resolution=32), 3, "big")
    base = ["distill", "--teacher-path", teacher, "--steps", 1, "--batch-size", 2, "--cpu",
            "--reg-weight", 0, "--plot-samples", 0]  # fmt: skip
    out = tmp_path / "run"
    cases = [
        (["--real-guidance", 2], "pass --guide-net FILE"),
        (
            ["--guide-net", small, "--guide-mode", "cfg", "--real-guidance", 2],
            "unconditional guiding net",
        ),
        (
            ["--guide-net", uncond, "--guide-mode", "autoguidance", "--real-guidance", 2],
            "with the teacher's 10 classes",
        ),
        (["--guide-net", big, "--real-guidance", 2], "img_resolution"),
        (["--guide-mode", "cfg"], "needs --guide-net"),
        (["--guide-net", tmp_path / "missing.safetensors"], "no such file"),
    ]
    for extra, message in cases:
        one_line_error(run(*base, *extra, "--out", out), message)
        assert not out.exists(), extra


# --- distillation -----------------------------------------------------------------------------
def test_one_step_cfg_run_trains_resumes_exactly_exports_and_samples(tmp_path):
    teacher, _ = converted(tmp_path, TINY, 0, "teacher")
    uncond, _ = converted(tmp_path, dict(TINY, label_dim=0), 1, "uncond")

    def args(out, steps):
        return ["distill", "--teacher-path", teacher, "--guide-net", uncond, "--real-guidance",
                1.4, "--reg-weight", 0, "--steps", steps, "--batch-size", 2, "--fake-updates", 2,
                "--lr", 1e-3, "--fake-lr", 1e-3, "--warmup", 0, "--lr-schedule", "constant",
                "--checkpoint-every", 2, "--log-every", 1, "--plot-samples", 4, "--cpu",
                "--out", out]  # fmt: skip

    ok(run(*args(tmp_path / "whole", 4)))
    ok(run(*args(tmp_path / "cut", 2)))
    ok(run(*args(tmp_path / "cut", 4), "--resume", "latest"))
    last = "checkpoints/step-0000004"
    for name in ("generator", "fake", "ema", "optim_generator", "optim_fake"):
        a = load_file(str(tmp_path / "whole" / last / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "cut" / last / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    gen = _checkpoint_network(tmp_path / "whole" / last, "generator")
    start = _checkpoint_network(teacher.parent, teacher.stem)
    # trained: the weights moved; the log-variance head (unused) did not
    key = "unet.enc.16x16_block0.conv_res0.weight"
    assert (gen[key] - start[key]).abs().max() > 1e-4
    assert torch.equal(gen["logvar_linear.weight"], start["logvar_linear.weight"])
    import json

    state = json.loads((tmp_path / "whole" / last / "state.json").read_text())
    assert state["guide_sha256"] == load_teacher(uncond).sha256
    assert (tmp_path / "whole" / "samples" / "step-0000004.png").is_file()

    ok(run("export", tmp_path / "whole", "-o", tmp_path / "g.safetensors"))
    ok(run("sample", "--generator", tmp_path / "g.safetensors", "--num", 3, "--class", 7,
           "--out", tmp_path / "s", "--device", "cpu"))  # fmt: skip
    s = load_file(str(tmp_path / "s" / "samples.safetensors"))
    assert s["samples"].shape == (3, 3, 16, 16) and torch.isfinite(s["samples"]).all()
    assert (s["labels"] == 7).all()


def _checkpoint_network(path: Path, name: str) -> dict:
    """A checkpoint's network weights under their module names (no ``backbone.`` prefix)."""
    return {
        k.removeprefix("backbone."): v
        for k, v in load_file(str(path / f"{name}.safetensors")).items()
    }


def test_forced_weight_normalisation_after_each_optimiser_step(tmp_path):
    """EDM2 keeps every MPConv weight at unit magnitude per output channel in training: after
    the steps, the generator's and the fake score's stored weights are normalised (the
    teacher's, trained without this, are not)."""
    teacher, _ = converted(tmp_path, TINY, 0, "teacher")
    out = tmp_path / "run"
    ok(run("distill", "--teacher-path", teacher, "--reg-weight", 0, "--steps", 2,
           "--batch-size", 2, "--lr", 1e-2, "--fake-lr", 1e-2, "--warmup", 0,
           "--checkpoint-every", 2, "--plot-samples", 0, "--cpu", "--out", out))  # fmt: skip

    def rms_rows(w):
        return w.flatten(1).square().mean(1).sqrt()

    start = load_file(str(teacher))
    assert (
        rms_rows(start["backbone.unet.enc.16x16_block0.conv_res0.weight"]) - 1
    ).abs().max() > 0.1
    for name in ("generator", "fake"):
        state = _checkpoint_network(out / "checkpoints" / "step-0000002", name)
        mp = [k.removeprefix("unet.") for k in state if k.endswith(".weight")]
        assert len(mp) > 20
        for k, w in state.items():
            if k.endswith(".weight") and "logvar" not in k:
                torch.testing.assert_close(rms_rows(w), torch.ones(w.shape[0]), atol=2e-4, rtol=0)
        # the unused log-variance head was frozen: exactly the teacher's
        assert torch.equal(state["logvar_linear.weight"], start["backbone.logvar_linear.weight"])


def test_few_step_gan_run_on_the_edm2_bottleneck_resumes_exactly(tmp_path):
    """A 2-step generator with backward simulation and DMD2's GAN head on the fake score's
    bottleneck (the last encoder block), real images from an ADM-style npz, autoguidance."""
    from cli_helpers import real_store
    from dmdctl.core.gan import feature_shape
    from dmdctl.generators import load_generator

    teacher, _ = converted(tmp_path, TINY, 0, "teacher")
    small, _ = converted(tmp_path, tiny(model_channels=8), 1, "small")
    t = load_teacher(teacher)
    assert feature_shape(t.denoiser, t.sample_shape, 80.0, torch.tensor([1])) == (32, 8, 8)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "real.npz", rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
             rng.integers(0, 10, 8))  # fmt: skip
    store = real_store(tmp_path / "real.npz", teacher)

    def args(out, steps):
        return ["distill", "--teacher-path", teacher, "--guide-net", small, "--real-guidance", 1.7,
                "--real-data", store, "--gan-weight", 3e-3, "--reg-weight", 0,
                "--denoising-steps", "80,1", "--fake-updates", 2, "--steps", steps,
                "--batch-size", 2, "--lr", 1e-3, "--fake-lr", 1e-3, "--warmup", 0,
                "--lr-schedule", "constant", "--checkpoint-every", 2, "--plot-samples", 0,
                "--cpu", "--out", out]  # fmt: skip

    ok(run(*args(tmp_path / "whole", 4)))
    ok(run(*args(tmp_path / "cut", 2)))
    ok(run(*args(tmp_path / "cut", 4), "--resume", "latest"))
    last = "checkpoints/step-0000004"
    for name in ("generator", "fake", "gan_head", "optim_fake", "ema"):
        a = load_file(str(tmp_path / "whole" / last / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "cut" / last / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ok(run("export", tmp_path / "cut", "-o", tmp_path / "g.safetensors"))
    gen = load_generator(tmp_path / "g.safetensors")
    assert gen.nfe == 2 and gen.fn.sigmas == [80.0, 1.0] and gen.kind.name == "edm2"
    ok(run("sample", "--generator", tmp_path / "g.safetensors", "--num", 3,
           "--out", tmp_path / "s", "--device", "cpu"))  # fmt: skip
    assert torch.isfinite(load_file(str(tmp_path / "s" / "samples.safetensors"))["samples"]).all()


# --- latents (ImageNet-512-shaped) ------------------------------------------------------------
def test_latent_teacher_distills_exports_samples_and_scores_decoded_images(
    tmp_path, tiny_vae, random_weights, monkeypatch
):
    """Distillation runs in the VAE's latent space; the plots, `sample` and `eval-fid` see
    images decoded by the VAE with EDM2's scaling; the exported generator keeps the encoder."""
    import json

    from dmdctl.generators import load_generator
    from dmdctl.metrics import collect
    from dmdctl.metrics.inception import InceptionFeatures

    pkl, _ = edm2_pickle(tmp_path, LATENT)
    teacher = tmp_path / "t.safetensors"
    ok(run("convert-edm", pkl, "-o", teacher, "--vae", tiny_vae))
    out = tmp_path / "run"
    ok(run("distill", "--teacher-path", teacher, "--reg-weight", 0, "--steps", 2,
           "--batch-size", 2, "--warmup", 0, "--checkpoint-every", 2, "--plot-samples", 3,
           "--cpu", "--out", out))  # fmt: skip
    assert (out / "samples" / "step-0000002.png").is_file()
    ok(run("export", out, "-o", tmp_path / "g.safetensors"))
    gen = load_generator(tmp_path / "g.safetensors")
    assert gen.sample_shape == (4, 16, 16) and gen.decodes
    assert gen.config["encoder"]["vae"] == str(Path(tiny_vae).resolve())

    ok(run("sample", "--generator", tmp_path / "g.safetensors", "--num", 3, "--class", 2,
           "--out", tmp_path / "s", "--device", "cpu"))  # fmt: skip
    imgs = load_file(str(tmp_path / "s" / "samples.safetensors"))["samples"]
    assert imgs.shape == (3, 3, 32, 32) and imgs.min() >= -1 and imgs.max() <= 1
    # the same images: the generator's latents through the codec, computed here
    from dmdctl.core.sampling import seeded_noise

    with torch.no_grad():
        z = seeded_noise(list(range(3)), (4, 16, 16))
        lat = gen.fn(z, torch.full((3,), 2))
        torch.testing.assert_close(imgs, gen.codec.decode(lat), atol=1e-5, rtol=0)

    # eval-fid scores the decoded images (features: the images pooled, as tests/test_eval_fid.py)
    monkeypatch.setattr(collect, "check_sample_count", lambda *a: None)
    monkeypatch.setattr(collect, "COMPARABLE_SAMPLES", 0)
    shapes = []

    def fake_run(self, kind, batch):
        shapes.append(tuple(batch.shape))
        return F.adaptive_avg_pool2d(batch.float(), (27, 26)).flatten(1)[:, :2048]

    monkeypatch.setattr(InceptionFeatures, "_run", fake_run)
    weights, sha = random_weights
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    ok(run("eval-fid", "--generator", tmp_path / "g.safetensors", "--ref", ref, "--num-samples",
           4, "--batch-size", 2, "--device", "cpu", "--inception-weights", weights,
           "--inception-sha256", sha, "--json", tmp_path / "fid.json"))  # fmt: skip
    res = json.loads((tmp_path / "fid.json").read_text())
    assert res["num_samples"] == 4 and math.isfinite(res["fid"])
    assert shapes and all(s[1] == 3 for s in shapes)  # RGB images reached the features


def test_latent_teacher_whose_vae_is_not_available_offline(tmp_path, hf_offline, no_network):
    pkl, _ = edm2_pickle(tmp_path, LATENT)
    teacher = tmp_path / "t.safetensors"
    ok(run("convert-edm", pkl, "-o", teacher))  # records the hub id; nothing fetched
    one_line_error(run("sample", "--teacher-path", teacher, "--steps", 1, "--num", 1,
                       "--out", tmp_path / "s", "--device", "cpu"),
                   "could not load the EDM2 teacher's VAE")  # fmt: skip


def test_sampling_the_teacher_with_edm2s_guidance(tmp_path):
    """`sample --teacher-path T --guide-net G --guidance w`: EDM2's guided Heun sampler, equal
    to Heun on D_g + w (D - D_g) computed here; bad combinations refused in one line."""
    from dmdctl.core.sampling import heun_sample, karras_sigmas, seeded_noise

    teacher, _ = converted(tmp_path, TINY, 0, "teacher")
    uncond, _ = converted(tmp_path, dict(TINY, label_dim=0), 1, "uncond")
    common = ["--num", 2, "--class", 4, "--steps", 3, "--device", "cpu"]
    ok(run("sample", "--teacher-path", teacher, "--guide-net", uncond, "--guidance", 1.8,
           "--out", tmp_path / "g", *common))  # fmt: skip
    ok(run("sample", "--teacher-path", teacher, "--out", tmp_path / "plain", *common))
    got = load_file(str(tmp_path / "g" / "samples.safetensors"))["samples"]
    plain = load_file(str(tmp_path / "plain" / "samples.safetensors"))["samples"]
    d, g = load_teacher(teacher).denoiser, load_teacher(uncond).denoiser

    def guided(x, s, c):
        ref = g(x, s, None)
        return ref + 1.8 * (d(x, s, c) - ref)

    z = seeded_noise([0, 1], (3, 16, 16))
    want = heun_sample(guided, z, karras_sigmas(3), torch.tensor([4, 4]))
    # float32 rounding (lerp vs the sum above) grows through the random net's Heun steps
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    assert (got - plain).abs().max() > 0.1
    one_line_error(run("sample", "--teacher-path", teacher, "--guidance", 2, "--out",
                       tmp_path / "x", *common), "needs --guide-net")  # fmt: skip
    one_line_error(run("sample", "--generator", teacher, "--guide-net", uncond, "--out",
                       tmp_path / "x", *common), "guides the teacher's sampler")  # fmt: skip
    one_line_error(run("sample", "--teacher-path", teacher, "--guide-net", teacher,
                       "--guide-mode", "cfg", "--guidance", 2, "--out", tmp_path / "x", *common),
                   "unconditional guiding net")  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_latent_gan_reads_real_images_encoded_by_the_teachers_vae(tmp_path, tiny_vae):
    """prepare-real encodes images with the EDM2 codec (the VAE on [0, 1] images, scale and
    bias) into a latent store; a GAN run on the latent teacher reads it."""
    from cli_helpers import real_store
    from dmdctl.data.real import load_real_data
    from dmdctl.teachers.edm2.encoders import StabilityVAECodec

    pkl, _ = edm2_pickle(tmp_path, LATENT)
    teacher = tmp_path / "t.safetensors"
    ok(run("convert-edm", pkl, "-o", teacher, "--vae", tiny_vae))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "real.npz", images, rng.integers(0, 10, 4))
    store = real_store(tmp_path / "real.npz", teacher)
    t = load_teacher(teacher)
    rows, labels = load_real_data(str(store), t).rows(torch.arange(4))
    assert rows.shape == (4, 4, 16, 16)
    codec = StabilityVAECodec(t.config["encoder"])
    with torch.no_grad():
        want = codec.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    torch.testing.assert_close(rows.float(), want, atol=2e-3, rtol=2e-3)  # stored as float16
    ok(run("distill", "--teacher-path", teacher, "--real-data", store, "--gan-weight", 3e-3,
           "--reg-weight", 0, "--steps", 1, "--batch-size", 2, "--plot-samples", 0, "--cpu",
           "--out", tmp_path / "run"))  # fmt: skip
    assert (tmp_path / "run" / "generator.safetensors").is_file()
    # the store's latents depend on EDM2's scale and bias: a teacher with another scale (same
    # VAE, same network) refuses it rather than train its GAN head on mis-scaled latents
    scale = np.float32(1.0) / np.float32([4.17, 4.62, 3.71, 3.28])
    pkl2 = write_edm2_pickle(tmp_path / "other.pkl", random_net(LATENT), LATENT,
                             encoder=encoder_record(LATENT, scale=scale))  # fmt: skip
    ok(run("convert-edm", pkl2, "-o", tmp_path / "other.safetensors", "--vae", tiny_vae))
    one_line_error(run("distill", "--teacher-path", tmp_path / "other.safetensors", "--real-data",
                       store, "--gan-weight", 3e-3, "--reg-weight", 0, "--steps", 1, "--cpu",
                       "--out", tmp_path / "run2"), "was made with another 'edm2_scale'")  # fmt: skip
    assert not (tmp_path / "run2").exists()


@pytest.mark.slow
def test_fsdp_equals_ddp_with_forced_weight_norm_on_shards(tmp_path):
    """2 processes (gloo): an EDM2 run sharded with --fsdp (each MPConv weight normalised on its
    own rows after every step; the gains are 1-element vectors FSDP2 can shard) ends with the
    weights of the same run under DDP, to float32 rounding: not bit for bit, as for EDM's ADM
    network (checked while writing this test: its fake score differs in 61 of 225 tensors
    after one step), because the embedding every block reads gets its gradient summed in
    another order when each block is its own FSDP unit."""
    from test_fsdp import launch

    teacher, _ = converted(tmp_path, TINY, 0, "teacher")
    small, _ = converted(tmp_path, tiny(model_channels=8), 1, "small")
    base = ["distill", "--teacher-path", str(teacher), "--guide-net", str(small),
            "--real-guidance", "1.7", "--reg-weight", "0", "--steps", "4", "--batch-size", "4",
            "--fake-updates", "2", "--lr", "1e-3", "--fake-lr", "1e-3", "--warmup", "0",
            "--lr-schedule", "constant", "--checkpoint-every", "4", "--log-every", "2",
            "--plot-samples", "0", "--denoising-steps", "80,1"]  # fmt: skip
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    launch(tmp_path, [[*base, "--out", str(ddp)], [*base, "--out", str(fsdp), "--fsdp"]])
    for name in ("generator", "fake", "ema", "optim_generator", "optim_fake"):
        f = f"checkpoints/step-0000004/{name}.safetensors"
        a, b = load_file(str(ddp / f)), load_file(str(fsdp / f))
        assert list(a) == list(b), name
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=f"{name} {k}")
    w = _checkpoint_network(fsdp / "checkpoints" / "step-0000004", "generator")
    rows = w["unet.enc.16x16_block0.conv_res0.weight"].flatten(1).square().mean(1).sqrt()
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=2e-4, rtol=0)


def test_bf16_autocast_and_gradient_checkpointing():
    net = random_net(TINY)
    den = KIND.build(TINY)
    den.backbone.load_state_dict(net.state_dict())
    g = torch.Generator().manual_seed(0)
    x, sigma, labels = (
        torch.randn(2, 3, 16, 16, generator=g),
        torch.tensor([0.3, 5.0]),
        torch.tensor([1, 2]),
    )
    with torch.no_grad():
        ref = den.eval()(x, sigma, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = den(x, sigma, labels)
    assert torch.isfinite(low).all() and (low.float() - ref).norm() / ref.norm() < 0.05

    def grads():
        den.zero_grad()
        den.train()(x, sigma, labels).square().mean().backward()
        return [p.grad.clone() for p in den.parameters() if p.grad is not None]

    plain = grads()
    den.backbone.enable_gradient_checkpointing()
    assert den.backbone.unet.grad_checkpointing
    for a, b in zip(grads(), plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
