"""The EDM2 network (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models", CVPR 2024), written for dmdctl: the magnitude-preserving UNet of NVlabs' ``edm2``
checkpoints (sizes XS to XXL, ImageNet-512 in latents, ImageNet-64 in pixels) and the learned
log-variance head of their preconditioner.

What the network computes, in the paper's terms:

- every convolution and linear layer is an ``MPConv``: the stored weight is normalised per output
  channel to unit magnitude on every use, then scaled by ``gain / sqrt(fan_in)`` (Eq. 47, weight
  normalisation); in training EDM2 also rewrites the stored weight to its normalised value
  ("forced weight normalisation", Eq. 66) -- dmdctl does that after each optimiser step
  (:meth:`EDM2Backbone.force_weight_norm_`), which gives the same weights at every forward pass;
- ``mp_silu`` is SiLU / 0.596, ``mp_sum`` a lerp divided by the norm of its weights, ``mp_cat``
  a concatenation whose two parts are weighted so the result keeps unit magnitude;
- the noise level enters through magnitude-preserving Fourier features (fixed random
  frequencies and phases, stored as buffers), the class through a linear embedding of the
  one-hot label scaled by ``sqrt(label_dim)``, mixed with ``mp_sum`` (``label_balance``);
- the encoder appends a constant-one channel to the input; each block normalises its
  activations per pixel ("pixel norm"), modulates its residual branch by ``1 + emb_linear(emb)``
  (with a learned gain that starts at 0), adds the branches with ``mp_sum(res_balance)``, runs
  optional self-attention on pixel-normalised q/k/v and clips activations to +-256;
- the decoder concatenates the skips with ``mp_cat(concat_balance)``; the output convolution
  has a learned gain (0 at initialisation).

Module and parameter names, shapes and the block order are those of NVlabs' published
checkpoints (``unet.enc.64x64_block0.conv_res0.weight``, ``unet.emb_fourier.freqs``,
``logvar_linear.weight``, ...), so the state of a checkpoint's ``Precond`` loads into
:class:`EDM2Backbone` with ``strict=True``. The code and its weight initialisation are ours
(random weights only matter for tests and benchmarks: real teachers come from a checkpoint).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# the published network sizes: model_channels of NVlabs' train_edm2.py presets; the other
# arguments keep the UNet's defaults (channel_mult 1,2,3,4, 3 blocks, attention at 16 and 8)
SIZES = {"xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}
# the UNet / Block arguments a checkpoint may carry (anything else is refused)
UNET_KWARGS = (
    "model_channels", "channel_mult", "channel_mult_noise", "channel_mult_emb", "num_blocks",
    "attn_resolutions", "label_balance", "concat_balance", "resample_filter",
    "channels_per_head", "dropout", "res_balance", "attn_balance", "clip_act",
)  # fmt: skip
# the learned gains, 0-d tensors in NVIDIA's checkpoints, are 1-element vectors here: FSDP2
# cannot shard 0-d parameters (convert-edm reshapes them, and nothing else)
GAIN_KEYS = ("emb_gain", "out_gain")
MP_SILU_SCALE = 0.596  # E[silu(x)^2]^0.5 for x ~ N(0, 1), the paper's constant


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """``x`` divided by its RMS over ``dim`` (all but the first by default), plus ``eps``.

    The norm is taken in float32 (float64 for float64 input); dividing by ``eps + ||x|| / sqrt(n)`` gives unit magnitude
    per element (n = the number of elements the norm runs over).
    """
    if dim is None:
        dim = list(range(1, x.ndim))
    acc = torch.promote_types(x.dtype, torch.float32)  # float32 (float64 stays float64)
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=acc)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / max(x.numel(), 1)))
    return x / norm.to(x.dtype)


def resample(x: torch.Tensor, taps=(1, 1), mode: str = "keep") -> torch.Tensor:
    """2x down- or upsampling with a separable FIR filter (depthwise), or ``x`` unchanged."""
    if mode == "keep":
        return x
    taps = torch.as_tensor(list(taps), dtype=torch.float32)
    if taps.ndim != 1 or len(taps) % 2:
        raise ValueError("the resampling filter needs an even number of taps")
    pad = (len(taps) - 1) // 2
    f = (torch.outer(taps, taps) / taps.sum() ** 2)[None, None]
    c = x.shape[1]
    if mode == "down":
        w = f.to(x.device, x.dtype).repeat(c, 1, 1, 1)
        return F.conv2d(x, w, groups=c, stride=2, padding=pad)
    if mode != "up":
        raise ValueError(f"unknown resampling mode {mode!r}")
    w = (f * 4).to(x.device, x.dtype).repeat(c, 1, 1, 1)
    return F.conv_transpose2d(x, w, groups=c, stride=2, padding=pad)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled back to unit magnitude for unit-variance inputs."""
    return F.silu(x) / MP_SILU_SCALE


def _same_dtype(a: torch.Tensor, b: torch.Tensor):
    dt = torch.promote_types(a.dtype, b.dtype)
    return a.to(dt), b.to(dt)


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """``lerp(a, b, t)`` divided by ``sqrt((1-t)^2 + t^2)``: unit magnitude for independent
    unit-magnitude inputs."""
    a, b = _same_dtype(a, b)
    return torch.lerp(a, b, float(t)) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation weighting ``a`` by (1-t) and ``b`` by t, per channel count, so that the
    result keeps unit magnitude."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    a, b = _same_dtype(a, b)
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


class MPFourier(nn.Module):
    """``sqrt(2) cos(x * freqs + phases)``: fixed random features of a scalar (float32)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        freqs, phases = torch.empty(num_channels), torch.empty(num_channels)
        if freqs.device.type != "meta":
            freqs.normal_(0, 2 * math.pi * bandwidth)
            phases.uniform_(0, 2 * math.pi)
        self.register_buffer("freqs", freqs)
        self.register_buffer("phases", phases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.float(), self.freqs.float()) + self.phases.float()
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """A magnitude-preserving convolution (``kernel`` [kh, kw]) or linear layer (``kernel`` []).

    The weight used is ``normalize(weight) * gain / sqrt(fan_in)``; the stored weight's scale
    does not matter, only its direction per output channel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel=()):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *kernel))
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight)

    def effective_weight(self, gain=1.0, dtype=None) -> torch.Tensor:
        w = normalize(self.weight.float())
        fan_in = max(w[0].numel(), 1)
        w = w * (gain / math.sqrt(fan_in))
        return w.to(dtype) if dtype is not None else w

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        w = self.effective_weight(gain, x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)

    @torch.no_grad()
    def force_norm_(self) -> None:
        """EDM2's forced weight normalisation: store the normalised weight (each process's
        own rows when the weight is sharded over its output channels). The norms are taken in
        float64, so that a shard's rows come out bit for bit as the whole tensor's do (float32
        reductions over tensors of other shapes may round differently)."""
        w = self.weight
        local = w.to_local() if hasattr(w, "to_local") else w
        if local.numel():
            local.copy_(normalize(local.double()).to(local.dtype))


class Block(nn.Module):
    """An encoder (``flavor='enc'``) or decoder (``'dec'``) block, optionally with attention."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        resample_filter=(1, 1),
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"a block's flavor is 'enc' or 'dec', got {flavor!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = float(dropout)
        self.res_balance = float(res_balance)
        self.attn_balance = float(attn_balance)
        self.clip_act = clip_act
        self.emb_gain = nn.Parameter(torch.zeros([1]))  # NVIDIA's is 0-d (GAIN_KEYS)
        res_in = out_channels if flavor == "enc" else in_channels
        self.conv_res0 = MPConv(res_in, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, ())
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = (
            MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        )
        self.attn_qkv = self.attn_proj = None
        if self.num_heads:
            self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1))
            self.attn_proj = MPConv(out_channels, out_channels, (1, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)

        if self.num_heads:
            x = mp_sum(x, self.attn_proj(self._attention(x)), self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        y = self.attn_qkv(x)
        # channels laid out as (head, channel, q/k/v); q, k, v pixel-normalised per head
        y = normalize(y.reshape(n, self.num_heads, -1, 3, h * w), dim=2)
        q, k, v = (t.transpose(-1, -2) for t in y.unbind(3))  # [n, heads, tokens, channels]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(channels)) v
        return out.transpose(-1, -2).reshape(x.shape)


class UNet(nn.Module):
    """EDM2's UNet (the paper's Figure 21): ``F(x, c_noise, class_vector)``."""

    grad_checkpointing: bool = False

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        model_channels: int = 192,
        channel_mult=(1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions=(16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        **block_kwargs,
    ):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb else max(cblock)
        self.label_dim = int(label_dim)
        self.label_balance = float(label_balance)
        self.concat_balance = float(concat_balance)
        self.out_gain = nn.Parameter(torch.zeros([1]))  # NVIDIA's is 0-d (GAIN_KEYS)

        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, ())
        self.emb_label = MPConv(label_dim, cemb, ()) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = img_channels + 1  # the constant-one channel
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, channels, (3, 3))
                cout = channels
            else:
                self.enc[f"{res}x{res}_down"] = Block(
                    cout, cout, cemb, flavor="enc", resample_mode="down", **block_kwargs
                )
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = Block(
                    cout, channels, cemb, flavor="enc", attention=res in attn_resolutions,
                    **block_kwargs,
                )  # fmt: skip
                cout = channels

        self.dec = nn.ModuleDict()
        skips = [b.out_channels for b in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(
                    cout, cout, cemb, flavor="dec", attention=True, **block_kwargs
                )
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(
                    cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs
                )
            for i in range(num_blocks + 1):
                cin = cout + skips.pop()
                self.dec[f"{res}x{res}_block{i}"] = Block(
                    cin, channels, cemb, flavor="dec", attention=res in attn_resolutions,
                    **block_kwargs,
                )  # fmt: skip
                cout = channels
        self.out_conv = MPConv(cout, img_channels, (3, 3))

    def bottleneck(self) -> nn.Module:
        """The last encoder block, at the lowest resolution (the GAN head reads its output)."""
        return list(self.enc.values())[-1]

    def _run(self, block: nn.Module, *args):
        if self.grad_checkpointing and torch.is_grad_enabled() and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x, noise_labels, class_labels=None):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            if class_labels is None:
                class_labels = torch.zeros(1, self.label_dim, device=x.device)
            label = self.emb_label(class_labels.to(emb.dtype) * math.sqrt(class_labels.shape[1]))
            emb = mp_sum(emb, label, self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else self._run(block, x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = self._run(block, x, emb)
        return self.out_conv(x, gain=self.out_gain)


class EDM2Backbone(nn.Module):
    """dmdctl's backbone interface ``F(c_in x, c_noise, cond)`` around EDM2's UNet, holding what
    NVIDIA's ``Precond`` holds: ``unet`` and the log-variance head (``logvar_fourier``,
    ``logvar_linear``: the loss's learned uncertainty u(sigma), not used to denoise).

    ``config``: ``img_resolution``, ``img_channels``, ``label_dim``, ``logvar_channels`` and the
    UNet's arguments under ``model_kwargs``. ``cond`` is int64 class labels (-1: no class) or a
    float [N, label_dim] label vector; None gives EDM2's all-zero label vector.
    """

    def __init__(self, config: dict):
        super().__init__()
        self.label_dim = int(config["label_dim"])
        self.unet = UNet(
            img_resolution=int(config["img_resolution"]),
            img_channels=int(config["img_channels"]),
            label_dim=self.label_dim,
            **config.get("model_kwargs", {}),
        )
        channels = int(config.get("logvar_channels", 128))
        self.logvar_fourier = MPFourier(channels)
        self.logvar_linear = MPConv(channels, 1, ())

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each UNet block's activations in the backward pass."""
        self.unet.grad_checkpointing = bool(enabled)

    def bottleneck(self) -> nn.Module:
        return self.unet.bottleneck()

    def class_vector(self, cond, n: int, device) -> torch.Tensor | None:
        if not self.label_dim or cond is None:
            return None
        if cond.is_floating_point():
            return cond.float().reshape(-1, self.label_dim)
        valid = (cond >= 0).unsqueeze(1)
        return F.one_hot(cond.clamp(min=0).long(), self.label_dim).float() * valid

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond=None) -> torch.Tensor:
        labels = self.class_vector(cond, x.shape[0], x.device)
        return self.unet(x, c_noise.float(), labels)

    def logvar(self, c_noise: torch.Tensor) -> torch.Tensor:
        """The learned log-variance u(sigma) of EDM2's loss, one value per sample."""
        return self.logvar_linear(self.logvar_fourier(c_noise.float().flatten())).flatten()

    def force_weight_norm_(self) -> None:
        """EDM2's forced weight normalisation of every trained MPConv weight (a frozen one, as
        the unused log-variance head in distillation, is left as it is)."""
        for m in self.modules():
            if isinstance(m, MPConv) and m.weight.requires_grad:
                m.force_norm_()

    def uncertainty_parameters(self) -> list[nn.Parameter]:
        """The log-variance head's parameters (not used by the denoiser)."""
        return list(self.logvar_linear.parameters())
