"""LPIPS regression loss on images, offline-safe.

The ``lpips`` package ships its small linear heads; the AlexNet/VGG backbones come from
torchvision's pretrained weights in the torch hub cache. We never let it download: without the
cached file the run stops with a message saying which file to put where, unless the user asks
for a random backbone (then it is not LPIPS, and every log and report says so).

Both files are ``.pth`` pickles read by the libraries themselves; recent torch reads them with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dmdctl.errors import UserError

BACKBONE_FILES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
RANDOM_BACKBONE_NOTE = "RANDOM backbone: this is not LPIPS (--lpips-random-backbone)"


def backbone_cache_path(net: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


class ImageLPIPS(nn.Module):
    """LPIPS on images in [-1, 1] of any channel count, resized to ``size`` pixels first."""

    def __init__(self, net: str = "vgg", random_backbone: bool = False, size: int = 32):
        super().__init__()
        if net not in BACKBONE_FILES:
            raise UserError(f"--lpips-net must be one of {', '.join(BACKBONE_FILES)}, got {net!r}")
        path = backbone_cache_path(net)
        if not random_backbone and not path.is_file():
            raise UserError(
                f"LPIPS needs torchvision's pretrained {net} weights at {path} (file {BACKBONE_FILES[net]}); "
                "copy it there, or choose --reg-loss l2 or pseudo-huber "
                "(--lpips-random-backbone runs a random backbone, for tests only)"
            )
        import warnings

        import lpips

        with (
            warnings.catch_warnings()
        ):  # lpips uses torchvision's deprecated `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips.LPIPS(
                net=net, pretrained=True, pnet_rand=random_backbone, verbose=False
            )
        self.model.eval().requires_grad_(False)
        self.size = int(size)
        self.random_backbone = random_backbone
        self.description = f"lpips-{net}" + (
            f" ({RANDOM_BACKBONE_NOTE})" if random_backbone else ""
        )

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"LPIPS needs 1- or 3-channel images, got {x.shape[1]} channels")
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.model(self._prep(pred), self._prep(target)).flatten()
