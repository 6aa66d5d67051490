"""The two EDM network families, written for dmdctl: DDPM++/NCSN++ (``SongUNet``) and ADM
(``DhariwalUNet``).

Module names, parameter names, shapes and the order of the blocks follow the layout of NVlabs'
published EDM checkpoints (``model.map_*``, ``model.enc.{res}x{res}_*``, ``model.dec.{res}x{res}_*``),
so the state of a checkpoint's ``EDMPrecond`` loads into :class:`EDMBackbone` with ``strict=True``.
The forward passes compute the same functions as those networks; weight initialisation is ours
(random weights only matter for tests and benchmarks: real teachers come from a checkpoint).

Attention uses ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
kernels on GPUs), and every UNet block can be run under activation checkpointing
(:meth:`EDMBackbone.enable_gradient_checkpointing`) to fit the 296M-parameter ImageNet network,
its fake score and its generator on one GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ARCHITECTURES = ("SongUNet", "DhariwalUNet")


def _init_normal_(weight: torch.Tensor, fan_in: int) -> None:
    if weight.device.type != "meta":
        nn.init.normal_(weight, std=1 / math.sqrt(max(fan_in, 1)))


class Linear(nn.Module):
    """``x @ W^T + b`` with ``weight`` [out, in] and an optional ``bias`` [out]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        _init_normal_(self.weight, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _resample_kernel(taps: list[int]) -> torch.Tensor:
    """The separable FIR filter of up/downsampling as a [1, 1, k, k] kernel summing to 1."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum() ** 2)[None, None]


class Conv2d(nn.Module):
    """A convolution with optional FIR up- or downsampling (``kernel=0``: resampling only).

    ``fused_resample`` convolves and resamples in one pass (the NCSN++ residual path), which
    gives different borders from resampling first, so it is kept as a separate mode.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: list[int] | tuple[int, ...] = (1, 1),
        fused_resample: bool = False,
    ):
        super().__init__()
        if up and down:
            raise ValueError("a convolution cannot both upsample and downsample")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        self.weight = None
        self.bias = None
        if kernel:
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel))
            _init_normal_(self.weight, in_channels * kernel * kernel)
            if bias:
                self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer(
            "resample_filter", _resample_kernel(list(resample_filter)) if up or down else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, f = self.weight, self.resample_filter
        if w is not None and not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        def fir(channels: int, gain: float = 1.0) -> torch.Tensor:
            return (f * gain).to(x.dtype).repeat(channels, 1, 1, 1)

        c_in, c_out = self.in_channels, self.out_channels
        if self.fused_resample and self.up and w is not None:
            pad = max(f_pad - w_pad, 0)
            x = F.conv_transpose2d(x, fir(c_in, 4), groups=c_in, stride=2, padding=pad)
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, fir(c_out), groups=c_out, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, fir(c_in, 4), groups=c_in, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, fir(c_in), groups=c_in, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with at most 32 groups and at least 4 channels per group."""

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        min_channels_per_group: int = 4,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class UNetBlock(nn.Module):
    """Residual block with a noise-embedding modulation and optional self-attention.

    ``adaptive_scale``: the embedding gives a scale and a shift (ADM); otherwise a shift only
    (DDPM++). The attention splits the channels into heads; ``qkv``'s output channels are laid
    out as (head, channel, q/k/v).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-5,
        resample_filter: list[int] | tuple[int, ...] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = (
                num_heads if num_heads is not None else out_channels // channels_per_head
            )
        self.dropout = float(dropout)
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = adaptive_scale
        rf = list(resample_filter)

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=rf)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(
                in_channels, out_channels, kernel, up=up, down=down, resample_filter=rf
            )
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1)
            self.proj = Conv2d(out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        skip = self.skip(residual) if self.skip is not None else residual
        x = (x + skip.to(x.dtype)) * self.skip_scale
        if self.num_heads:
            x = (x + self.proj(self._attention(self.norm2(x)))) * self.skip_scale
        return x

    def _attention(self, h: torch.Tensor) -> torch.Tensor:
        n, c, height, width = h.shape
        heads = self.num_heads
        qkv = self.qkv(h).reshape(n * heads, c // heads, 3, height * width)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [n*heads, tokens, c/heads]
        if not torch.is_autocast_enabled(h.device.type):
            q, k, v = q.float(), k.float(), v.float()  # the softmax in fp32, as in EDM
        a = F.scaled_dot_product_attention(q, k, v)
        return a.transpose(1, 2).reshape(n, c, height, width).to(h.dtype)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of the noise label: [cos, sin] over geometric frequencies."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        k = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = (1 / self.max_positions) ** (k / (half - (1 if self.endpoint else 0)))
        arg = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of the noise label (NCSN++), frequencies stored in ``freqs``."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        freqs = torch.empty(num_channels // 2)
        if freqs.device.type != "meta":
            freqs.normal_(0, scale)
        self.register_buffer("freqs", freqs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arg = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class _UNet(nn.Module):
    """What both UNets share: the block loop (with activation checkpointing) over ``enc``/``dec``."""

    grad_checkpointing: bool = False

    def bottleneck(self) -> nn.Module:
        """The last encoder block at the lowest resolution (DMD2's GAN head reads its output)."""
        return [m for name, m in self.enc.items() if "aux" not in name][-1]

    def _run(self, block: nn.Module, *args):
        if self.grad_checkpointing and torch.is_grad_enabled() and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


class SongUNet(_UNet):
    """DDPM++ (``embedding_type='positional'``) and NCSN++ (``'fourier'``) of Song et al. 2021."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: list[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: list[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: list[int] = (1, 1),
    ):
        super().__init__()
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(
                f"embedding_type must be positional or fourier, got {embedding_type!r}"
            )
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(
                f"encoder_type must be standard, skip or residual, got {encoder_type!r}"
            )
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be standard or skip, got {decoder_type!r}")
        self.label_dropout = float(label_dropout)
        emb = model_channels * channel_mult_emb
        noise_ch = model_channels * channel_mult_noise
        rf = list(resample_filter)
        block = dict(
            emb_channels=emb, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=rf, resample_proj=True, adaptive_scale=False,
        )  # fmt: skip

        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_ch, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_ch)
        self.map_label = Linear(label_dim, noise_ch) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_ch, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_ch, emb)
        self.map_layer1 = Linear(emb, emb)

        self.enc = nn.ModuleDict()
        cur, aux_ch = in_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cur, model_channels, 3)
                cur = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cur, cur, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        aux_ch, aux_ch, 0, down=True, resample_filter=rf
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(aux_ch, cur, 1)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        aux_ch, cur, 3, down=True, resample_filter=rf, fused_resample=True
                    )
                    aux_ch = cur
            for i in range(num_blocks):
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(
                    cur, model_channels * mult, attention=attn, **block
                )
                cur = model_channels * mult
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        last = len(channel_mult) - 1
        for level in reversed(range(len(channel_mult))):
            mult = channel_mult[level]
            res = img_resolution >> level
            if level == last:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cur, cur, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cur, cur, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cur, cur, up=True, **block)
            for i in range(num_blocks + 1):
                attn = i == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(
                    cur + skips.pop(), model_channels * mult, attention=attn, **block
                )
                cur = model_channels * mult
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < last:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, 0, up=True, resample_filter=rf
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cur, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cur, out_channels, 3)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # [sin, cos]
        if self.map_label is not None and class_labels is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand(x.shape[0], 1, device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            elif isinstance(block, UNetBlock):
                x = self._run(block, x, emb)
                skips.append(x)
            else:
                x = block(x)
                skips.append(x)

        aux = None
        tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop().to(x.dtype)], dim=1)
                x = self._run(block, x, emb)
        return aux


class DhariwalUNet(_UNet):
    """The ADM network of Dhariwal & Nichol 2021 (the EDM ImageNet-64 teacher)."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: list[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: list[int] = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0,
    ):
        super().__init__()
        self.label_dropout = float(label_dropout)
        emb = model_channels * channel_mult_emb
        block = dict(emb_channels=emb, channels_per_head=64, dropout=dropout)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb)
        self.map_layer1 = Linear(emb, emb)
        self.map_label = Linear(label_dim, emb, bias=False) if label_dim else None

        self.enc = nn.ModuleDict()
        cur = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cur, model_channels * mult, 3)
                cur = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cur, cur, down=True, **block)
            for i in range(num_blocks):
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(
                    cur, model_channels * mult, attention=attn, **block
                )
                cur = model_channels * mult
        skips = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level in reversed(range(len(channel_mult))):
            mult = channel_mult[level]
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cur, cur, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cur, cur, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cur, cur, up=True, **block)
            for i in range(num_blocks + 1):
                attn = res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(
                    cur + skips.pop(), model_channels * mult, attention=attn, **block
                )
                cur = model_channels * mult
        self.out_norm = GroupNorm(cur)
        self.out_conv = Conv2d(cur, out_channels, 3)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None and class_labels is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand(x.shape[0], 1, device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        emb = F.silu(emb)

        skips = []
        for block in self.enc.values():
            x = self._run(block, x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop().to(x.dtype)], dim=1)
            x = self._run(block, x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


# init arguments each network accepts (everything else in a checkpoint's kwargs is refused)
MODEL_KWARGS = {
    "SongUNet": (
        "augment_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
        "attn_resolutions", "dropout", "label_dropout", "embedding_type", "channel_mult_noise",
        "encoder_type", "decoder_type", "resample_filter",
    ),
    "DhariwalUNet": (
        "augment_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
        "attn_resolutions", "dropout", "label_dropout",
    ),
}  # fmt: skip


class EDMBackbone(nn.Module):
    """dmdctl's backbone interface ``F(c_in x, c_noise, cond)`` around an EDM network.

    The network sits under ``model``, as under NVIDIA's ``EDMPrecond``: a checkpoint's
    ``model.*`` state loads here unchanged, and under dmdctl's EDMPrecond as ``backbone.model.*``.
    ``cond`` is int64 class labels (-1 or None: no class, an all-zero label vector, as EDM does
    for unconditional calls) or a float [N, label_dim] label vector.
    """

    def __init__(self, config: dict):
        super().__init__()
        arch = config["architecture"]
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown EDM architecture {arch!r}")
        self.architecture = arch
        self.label_dim = int(config["label_dim"])
        channels = int(config["img_channels"])
        cls = SongUNet if arch == "SongUNet" else DhariwalUNet
        self.model = cls(
            img_resolution=int(config["img_resolution"]),
            in_channels=channels,
            out_channels=channels,
            label_dim=self.label_dim,
            **config.get("model_kwargs", {}),
        )

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each UNet block's activations in the backward pass (less memory, ~30% slower)."""
        self.model.grad_checkpointing = bool(enabled)

    def bottleneck(self) -> nn.Module:
        return self.model.bottleneck()

    def class_vector(self, cond, n: int, device) -> torch.Tensor | None:
        if not self.label_dim:
            return None
        if cond is None:
            return torch.zeros(n, self.label_dim, device=device)
        if cond.is_floating_point():
            return cond.float().reshape(-1, self.label_dim)
        valid = (cond >= 0).unsqueeze(1)
        onehot = F.one_hot(cond.clamp(min=0).long(), self.label_dim).float()
        return onehot * valid

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond=None) -> torch.Tensor:
        labels = self.class_vector(cond, x.shape[0], x.device)
        return self.model(x, c_noise.float(), labels)
