"""How images reach the Inception network: quantisation to uint8 and the resize to 299x299.

Every standard FID tool uses the same TF "inception-2015-12-05" network; the published numbers
differ in how samples become the network's 299x299 input. A :class:`Protocol` names one such
rule and describes it; the description is recorded with every result.

``edm``   EDM / ADM / torch-fidelity (ImageNet 64 in the DMD papers): samples in [-1, 1] become
          uint8 exactly as EDM's ``generate.py`` writes its PNGs,
          ``(x * 127.5 + 128).clip(0, 255).to(torch.uint8)`` (the cast truncates, so this is
          round-half-up of ``x * 127.5 + 127.5``); grayscale is repeated to RGB as EDM's ``fid.py``
          does; the uint8 images go to torch-fidelity's extractor, which resizes them to 299x299
          with its TF1-style bilinear interpolation (the rule of the TF graph EDM/ADM use) and
          feeds ``(x - 128) / 128`` to the network.
``clean`` COCO-30k as in GigaGAN / DMD2: samples in [-1, 1] become uint8 as their evaluation
          code does, ``((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)`` (truncation); each image is
          centre-cropped to a square on its short side (torchvision ``center_crop``), resized to
          256x256 with PIL LANCZOS, then resized to 299x299 by clean-fid's "clean" resizer (PIL
          bicubic on float32 data, one channel at a time, no re-quantisation); the float image goes
          to the network as ``(x - 128) / 128``, as clean-fid does.

Images read from files (folders, ADM-style npz) are already uint8: only the resize rule applies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dmdctl.errors import UserError

INCEPTION_SIZE = 299
COCO_EVAL_RES = 256  # GigaGAN / DMD2 evaluate COCO-30k at 256x256 before clean-fid's resize


@dataclass(frozen=True)
class Protocol:
    name: str
    quantization: str
    resize: str
    reference: str

    @property
    def description(self) -> str:
        return f"{self.quantization}; {self.resize}"

    def record(self) -> dict:
        return {
            "name": self.name,
            "quantization": self.quantization,
            "resize": self.resize,
            "follows": self.reference,
        }

    # -- quantisation of generated samples ----------------------------------------------------
    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Samples in [-1, 1] (NCHW float) -> uint8 NCHW with 3 channels."""
        raise NotImplementedError

    # -- network input from uint8 images --------------------------------------------------------
    def network_batches(
        self, images: Sequence[np.ndarray] | torch.Tensor
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(kind, tensor) batches for the network: kind "uint8" (any size, NCHW uint8, resized by
        the extractor) or "float299" (NCHW float32 in [0, 255] at 299x299)."""
        raise NotImplementedError


def _rgb(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4:
        raise UserError(f"expected NCHW images, got a tensor of shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        return x.repeat(1, 3, 1, 1)
    if x.shape[1] != 3:
        raise UserError(f"Inception features need 1 or 3 channels, got {x.shape[1]}")
    return x


def hwc_uint8(img: np.ndarray) -> np.ndarray:
    """An image as HxWx3 uint8 (grayscale repeated to RGB, alpha dropped)."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise UserError(f"expected uint8 images, got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3:
        raise UserError(f"expected HxWxC images, got shape {img.shape}")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    elif img.shape[2] != 3:
        raise UserError(f"expected 1, 3 or 4 channels, got {img.shape[2]}")
    return np.ascontiguousarray(img)


class EDMProtocol(Protocol):
    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        # exactly EDM generate.py: the cast truncates after adding 128 (round half up)
        return _rgb((x.float() * 127.5 + 128).clip(0, 255).to(torch.uint8))

    def network_batches(self, images):
        if torch.is_tensor(images):
            yield "uint8", _rgb(images)
            return
        # torch-fidelity resizes a batch at once: group consecutive images of the same size
        group: list[np.ndarray] = []
        for img in images:
            img = hwc_uint8(img)
            if group and img.shape != group[0].shape:
                yield "uint8", torch.from_numpy(np.stack(group)).permute(0, 3, 1, 2)
                group = []
            group.append(img)
        if group:
            yield "uint8", torch.from_numpy(np.stack(group)).permute(0, 3, 1, 2)


def _clean_resizer():
    try:
        from cleanfid.resize import make_resizer  # imports numpy/torch/PIL only: no download
    except ImportError:
        raise UserError(
            "the 'clean' protocol uses clean-fid's resize: pip install clean-fid "
            "(or pip install 'dmdctl[fid]')"
        ) from None
    return make_resizer("PIL", False, "bicubic", (INCEPTION_SIZE, INCEPTION_SIZE))


def center_crop_lanczos(img: np.ndarray, size: int = COCO_EVAL_RES) -> np.ndarray:
    """GigaGAN/DMD2's ``resize_and_center_crop``: crop the long edge to a centred square
    (torchvision ``center_crop``), then PIL LANCZOS to ``size`` x ``size`` (uint8)."""
    from PIL import Image
    from torchvision.transforms.functional import center_crop

    pil = Image.fromarray(hwc_uint8(img))
    pil = center_crop(pil, min(pil.size))
    pil = pil.resize((size, size), Image.LANCZOS)
    return np.array(pil)


class CleanProtocol(Protocol):
    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        # GigaGAN / DMD2 tensor2pil: truncation after scaling to [0, 255]
        return _rgb(((x.float() + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8))

    def resize_one(self, img: np.ndarray, resizer=None) -> np.ndarray:
        """HWC uint8 -> HWC float32 299x299 in [0, 255]."""
        resizer = resizer or _clean_resizer()
        return resizer(center_crop_lanczos(img))

    def network_batches(self, images):
        resizer = _clean_resizer()
        if torch.is_tensor(images):
            images = _rgb(images).permute(0, 2, 3, 1).cpu().numpy()
        out = [self.resize_one(img, resizer) for img in images]
        if out:
            yield "float299", torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


EDM = EDMProtocol(
    name="edm",
    quantization="uint8 = (x * 127.5 + 128).clip(0, 255) truncated (EDM generate.py; round half up), grayscale repeated to RGB",
    resize="TF1-style bilinear to 299x299 (align_corners=False) inside torch-fidelity's InceptionV3 extractor, input (x - 128) / 128",
    reference="EDM/ADM ImageNet-64 FID (NVlabs/edm fid.py reference statistics)",
)
CLEAN = CleanProtocol(
    name="clean",
    quantization="uint8 = ((x + 1) * 127.5).clamp(0, 255) truncated (GigaGAN/DMD2 tensor2pil)",
    resize=(
        f"centre crop to the short side, PIL LANCZOS to {COCO_EVAL_RES}x{COCO_EVAL_RES}, then clean-fid "
        "'clean' resize (PIL bicubic on float32 per channel) to 299x299, input (x - 128) / 128"
    ),
    reference="COCO-30k as in GigaGAN/DMD2 (clean-fid clean mode against the val2014 images)",
)
PROTOCOLS = {p.name: p for p in (EDM, CLEAN)}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise UserError(
            f"unknown protocol '{name}' (choose from: {', '.join(PROTOCOLS)})"
        ) from None
