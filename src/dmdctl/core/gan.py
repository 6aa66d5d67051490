"""DMD2's GAN on real data: a small classifier head on the fake score network's bottleneck.

The fake score network (the online denoiser of the generator's distribution) already sees
noisy samples at every level; DMD2 reads its lowest-resolution features (a diffusers UNet's mid
block, the EDM UNet's last encoder block, the toy MLP's last hidden layer) and trains a head on
them to tell noised real samples from noised generated ones ("diffusion GAN": both noised to
levels drawn uniformly over the whole grid). The head is trained with the fake score, by the
same optimiser; the generator gets the non-saturating loss ``softplus(-logit)`` through the
frozen fake network and head. docs/METHOD.md, section "DMD2".
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

MIN_GROUP_VALUES = 16  # values a GroupNorm group normalises over, at the least (where it can)


def _groups(channels: int, values_per_channel: int) -> int:
    """GroupNorm groups: 32 as DMD2's heads use, or fewer where a group would normalise fewer
    than 16 values (``values_per_channel``: the map's pixels). After the head's last
    convolution the map is 1x1: 32 groups of the digits UNet's 64 bottleneck channels hold 2
    values each, which normalise to about +-1 whatever they are (the head then sees only the
    signs of channel differences); 4 groups of 16 keep the features. DMD2's own heads (1,280
    channels) keep 32 groups."""
    groups = math.gcd(channels, 32)
    while groups > 1 and (channels // groups) * values_per_channel < MIN_GROUP_VALUES:
        groups //= 2
    return groups


class GANHead(nn.Module):
    """Real/fake logit from bottleneck features: ``[N, C, H, W]`` maps, or ``[N, C]`` vectors.

    On maps: stride-2 4x4 convolutions (each with GroupNorm and SiLU) until the side is at most
    4, one convolution over what is left (to 1x1), then a 1x1 convolution to the logit; on 8x8
    features this is DMD2's SD1.5/ImageNet head, on 32x32 its SDXL head (the layer pattern is
    theirs, the code ours). On vectors: a two-layer MLP. On ``[N, tokens, C]`` (a transformer's
    image tokens in row-major order): the tokens laid back out as ``[C, rows, cols]`` maps, then
    the map head. ``grid`` says how they lie: (rows, cols), by default a square; a video's
    (frames, rows, cols) gives one map per frame, each scored by the same head, the logits
    averaged over the frames.
    """

    def __init__(self, feature_shape: tuple[int, ...], grid: tuple[int, ...] | None = None):
        super().__init__()
        self.feature_shape = tuple(int(s) for s in feature_shape)
        self.grid = None
        if len(self.feature_shape) == 1:
            (c,) = self.feature_shape
            self.net = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, 1))
            return
        shape = self.feature_shape
        if len(shape) == 2:
            n, c = shape
            if grid is None:
                side = math.isqrt(n)
                if side * side != n:
                    raise ValueError(f"{n} image tokens do not form a square grid")
                grid = (side, side)
            grid = tuple(int(g) for g in grid)
            if math.prod(grid) != n or len(grid) not in (2, 3):
                raise ValueError(f"{n} tokens do not lie on a {'x'.join(map(str, grid))} grid")
            self.grid = grid
            shape = (c, *grid[-2:])
        if len(shape) != 3:
            raise ValueError(
                f"a GAN head reads [C], [C, H, W] or [tokens, C] features, got {shape}"
            )
        c, h, w = shape
        layers: list[nn.Module] = []
        side = min(h, w)
        while side > 4:
            layers += [
                nn.Conv2d(c, c, 4, 2, 1),
                nn.GroupNorm(_groups(c, (h // 2) * (w // 2)), c),
                nn.SiLU(),
            ]
            h, w, side = h // 2, w // 2, side // 2
        layers += [nn.Conv2d(c, c, (h, w)), nn.GroupNorm(_groups(c, 1), c), nn.SiLU()]
        layers.append(nn.Conv2d(c, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        n = feats.shape[0]
        if self.grid is not None:
            feats = feats.transpose(1, 2).reshape(n, -1, *self.grid)
            if len(self.grid) == 3:  # [N, C, F, H, W] -> one map per frame, [N F, C, H, W]
                feats = feats.transpose(1, 2).reshape(-1, feats.shape[1], *self.grid[1:])
        return self.net(feats.float()).reshape(n, -1).mean(1)


@contextlib.contextmanager
def tap(module: nn.Module, index: int = 0):
    """Collect ``module``'s outputs while the block runs (a forward hook, removed after); of a
    block returning a tuple, item ``index`` (SD3's joint blocks: 1, the image tokens)."""
    seen: list[torch.Tensor] = []

    def hook(_m, _inputs, output):
        seen.append(output[index] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def bottleneck_tap(denoiser: nn.Module):
    """:func:`tap` on the denoiser's bottleneck (the item of a tuple output it names)."""
    return tap(denoiser.bottleneck(), getattr(denoiser, "bottleneck_output", 0))


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """No parameter gradients inside (gradients still flow to the inputs); restored after."""
    params = [p for m in modules for p in m.parameters()]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, w in zip(params, was, strict=True):
            p.requires_grad_(w)


class _Reached(Exception):
    """Raised by :func:`bottleneck_features`' hook to end a forward pass at the bottleneck."""


def bottleneck_features(denoiser: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond):
    """``denoiser``'s bottleneck features of ``x``, without running the rest of the network.

    The forward pass ends where the bottleneck returns: what comes after it (a UNet's decoder,
    a transformer's later blocks) never runs, forward or backward. Where only the features are
    needed (the head's real examples, the generator's GAN loss) this skips most of a pass: on
    the digits UNet the decoder is about two thirds of the forward (benchmarks/train_step.py
    times the step with and without). Gradients flow from the features to ``x`` and to the
    weights before the bottleneck as in a full pass. Not for networks sharded with FSDP, whose
    hooks expect every forward they enter to finish.
    """
    seen: list[torch.Tensor] = []
    index = getattr(denoiser, "bottleneck_output", 0)

    def hook(_m, _inputs, output):
        seen.append(output[index] if isinstance(output, tuple) else output)
        raise _Reached

    handle = denoiser.bottleneck().register_forward_hook(hook)
    try:
        denoiser(x, sigma, cond)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError("the bottleneck module did not run")
    return seen[-1]


def feature_shape(denoiser: nn.Module, sample_shape, sigma: float, cond) -> tuple[int, ...]:
    """The bottleneck's output shape (without the batch), from one sample through ``denoiser``."""
    x = torch.zeros(1, *sample_shape, device=next(denoiser.parameters()).device)
    with torch.no_grad(), bottleneck_tap(denoiser) as seen:
        denoiser(x, torch.full((1,), sigma, device=x.device), cond)
    if not seen:
        raise ValueError("the bottleneck module did not run")
    return tuple(seen[-1].shape[1:])


def generator_gan_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: ``softplus(-D(G(z)))``, mean over the batch."""
    return F.softplus(-logits_fake.float()).mean()


def classifier_gan_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The head's loss: ``softplus(-D(real)) + softplus(D(fake))``, each a batch mean."""
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()
