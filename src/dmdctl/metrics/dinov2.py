"""DINOv2 features for FD-DINOv2, the second metric of EDM2 (Karras et al. 2024), after
Stein et al. 2023 (dgm-eval).

The protocol is EDM2's ``calculate_metrics.py`` (``DINOv2Detector``, resize mode ``torch``):
uint8 images are resized to 224x224 with torch's bicubic interpolation with antialiasing, scaled
to [0, 1], normalised with ImageNet's mean and std, and the feature is the ViT's final-norm class
token (``dinov2_vitl14``'s output: 1024-d for ViT-L/14). EDM2 loads the network from torch.hub;
dmdctl reads a **local** transformers ``Dinov2Model`` folder (a copy of ``facebook/dinov2-large``
has the same weights; its ``pooler_output`` is that class token) and never downloads one.
Published FD-DINOv2 numbers use ViT-L/14 on 50,000 images against EDM2's reference statistics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dmdctl.errors import UserError
from dmdctl.files import sha256_file

SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PROTOCOL = {
    "name": "dinov2",
    "resize": "torch bicubic with antialiasing to 224x224 (EDM2 calculate_metrics.py, "
    "resize_mode 'torch')",
    "normalise": "ImageNet mean/std",
    "quantization": "uint8 (samples rounded as EDM2's encoders decode them)",
    "follows": "EDM2 calculate_metrics.py DINOv2Detector (after dgm-eval)",
}


def weights_file(folder: Path) -> Path:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserError(
            f"--dinov2 {folder} holds no .safetensors weights (a transformers Dinov2Model folder, "
            "e.g. a local copy of facebook/dinov2-large)"
        )
    return files[0]


class DinoV2Features:
    """A frozen local Dinov2Model: images -> class-token features (float32)."""

    def __init__(self, folder: str, device, batch: int = 64):
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise UserError(
                f"--dinov2 {folder} is not a transformers model folder (no config.json); pass a "
                "local Dinov2Model folder (dmdctl never downloads one)"
            )
        self.weights = {"path": str(folder), "sha256": sha256_file(weights_file(folder))}
        try:
            from transformers import Dinov2Model
            from transformers.utils import logging as tlog

            tlog.disable_progress_bar()
            model = Dinov2Model.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise UserError(f"could not load --dinov2 {folder}: {str(e).splitlines()[0]}") from None
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.batch = int(batch)
        self.dim = int(model.config.hidden_size)
        layers, patch = model.config.num_hidden_layers, model.config.patch_size
        self.name = f"dinov2 ViT {self.dim}-d, {layers} layers, patch {patch} (class token)"

    @torch.no_grad()
    def from_uint8(self, images) -> torch.Tensor:
        """uint8 images (an ``[N, 3, H, W]`` tensor, or a list of HWC arrays of any sizes, as
        image folders give them) -> ``[N, dim]`` features."""
        if isinstance(images, torch.Tensor):
            images = list(images)
        else:
            images = [
                torch.from_numpy(np.array(a, dtype=np.uint8)).permute(2, 0, 1) for a in images
            ]
        out = []
        mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
        for i in range(0, len(images), self.batch):
            x = torch.cat([
                F.interpolate(im[None].to(self.device).float(), size=(SIZE, SIZE),
                              mode="bicubic", antialias=True)
                for im in images[i : i + self.batch]
            ])  # fmt: skip
            x = (x / 255 - mean) / std
            out.append(self.model(pixel_values=x).pooler_output.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Samples in [-1, 1] -> features: rounded to uint8 as EDM2 decodes them first."""
        return self.from_uint8((x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8))
