"""The built-in image teacher: scikit-learn's bundled 8x8 handwritten digits, class-conditional.

Native 8x8 resolution: at 16x16 every network pass costs about 4x more, and the whole demo
(pairs, two distillation runs, evaluation) takes about 4 minutes on 2 CPU cores.
The backbone is a diffusers ``UNet2DModel`` with a class embedding, wrapped in EDM
preconditioning. The package ships a trained teacher and a small classifier whose penultimate
layer gives the features for an honest FID on digits (see assets/PROVENANCE.json).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dmdctl.core.denoiser import EDMPrecond
from dmdctl.errors import UserError
from dmdctl.teachers.base import TeacherKind

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TEACHER_FILE = ASSETS / "digits_teacher.safetensors"
FEATURES_FILE = ASSETS / "digits_features.safetensors"
PROVENANCE_FILE = ASSETS / "PROVENANCE.json"

BASE = {
    "resolution": 8,
    "channels": 1,
    "num_classes": 10,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": 32,
    "norm_num_groups": 16,
    "noise_scale": 250.0,  # c_noise = ln(sigma)/4 is fed to the UNet as timestep noise_scale * c_noise
    "sigma_data": 0.5,
    "sigma_min": 0.002,
    "sigma_max": 80.0,
    "holdout": 297,
    "split_seed": 0,
}


class UNetBackbone(nn.Module):
    """A diffusers UNet2DModel behind the backbone interface ``F(c_in x, c_noise, labels)``."""

    def __init__(self, config: dict):
        super().__init__()
        from diffusers import UNet2DModel

        n = len(config["block_out_channels"])
        self.noise_scale = float(config["noise_scale"])
        self.unet = UNet2DModel(
            sample_size=config["resolution"],
            in_channels=config["channels"],
            out_channels=config["channels"],
            block_out_channels=tuple(config["block_out_channels"]),
            layers_per_block=config["layers_per_block"],
            down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
            up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
            num_class_embeds=config["num_classes"] or None,
            norm_num_groups=config["norm_num_groups"],
            attention_head_dim=config["attention_head_dim"],
        )

    def bottleneck(self) -> nn.Module:
        return self.unet.mid_block

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond=None) -> torch.Tensor:
        t = (c_noise * self.noise_scale).to(x.dtype)
        return self.unet(x, t, class_labels=cond).sample


class DigitsClassifier(nn.Module):
    """A small CNN; its 64-d penultimate layer is the feature map of ``eval-fid --features digits``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, stride=2)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv1(x))
        h = F.silu(self.conv2(h))
        h = F.silu(self.conv3(h))
        return F.silu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@functools.lru_cache(maxsize=4)
def digits_split(holdout: int = 297, split_seed: int = 0):
    """(train_x, train_y, heldout_x, heldout_y): images in [-1, 1], [N, 1, 8, 8], fixed split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover
        raise UserError("the digits teacher needs scikit-learn: pip install scikit-learn") from None
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    test, train = perm[:holdout], perm[holdout:]
    return x[train], y[train], x[test], y[test]


@functools.lru_cache(maxsize=1)
def load_classifier() -> DigitsClassifier:
    from safetensors.torch import load_file

    if not FEATURES_FILE.is_file():
        raise UserError(
            f"the digits feature network is missing: {FEATURES_FILE} (reinstall dmdctl)"
        )
    net = DigitsClassifier()
    net.load_state_dict(load_file(str(FEATURES_FILE)))
    return net.eval().requires_grad_(False)


class Digits(TeacherKind):
    name = "digits"
    default_preset = "digits"
    builtin = True
    train_defaults = {"steps": 5000, "batch_size": 128, "lr": 5e-4}

    def presets(self) -> dict[str, dict]:
        return {"digits": dict(BASE)}

    def build(self, config: dict) -> EDMPrecond:
        return EDMPrecond(
            UNetBackbone(config), config["sigma_data"], config["sigma_min"], config["sigma_max"]
        )

    def sample_shape(self, config: dict) -> tuple[int, ...]:
        return (config["channels"], config["resolution"], config["resolution"])

    def num_classes(self, config: dict) -> int:
        return int(config["num_classes"])

    def default_path(self) -> Path | None:
        return TEACHER_FILE

    def sample_data(self, config: dict, n: int, generator: torch.Generator):
        x, y, _, _ = digits_split(config["holdout"], config["split_seed"])
        idx = torch.randint(0, len(x), (n,), generator=generator)
        return x[idx], y[idx]

    def real_data(self, config: dict):
        """The teacher's own training images and labels (not the held-out split)."""
        from dmdctl.data.real import RealData

        x, y, _, _ = digits_split(config["holdout"], config["split_seed"])
        return RealData(f"the digits training split ({len(x)} images)", x, y)

    def feature_name(self) -> str:
        return (
            "digits classifier, 64-d penultimate layer (dmdctl assets/digits_features.safetensors)"
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        net = load_classifier()
        with torch.no_grad():
            return net.features(x.float().cpu().clamp(-1, 1))

    def quality_metrics(
        self, config: dict, samples: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict:
        """Class accuracy: how often the classifier reads a sample as the class it was asked for."""
        if labels is None or (labels < 0).all():
            return {}
        with torch.no_grad():
            pred = load_classifier()(samples.float().cpu().clamp(-1, 1)).argmax(1)
        return {"class_accuracy": float((pred == labels.cpu()).float().mean())}

    def save_plot(
        self, panels, path: Path, config: dict, labels: torch.Tensor | None = None
    ) -> Path:
        from dmdctl.plots import image_grid_panels

        return image_grid_panels(panels, path, labels, num_classes=config["num_classes"])


def provenance() -> dict:
    return json.loads(PROVENANCE_FILE.read_text()) if PROVENANCE_FILE.is_file() else {}


def train_classifier(
    out: Path, steps: int = 3000, batch_size: int = 128, lr: float = 1e-3, seed: int = 0
) -> dict:
    """Train the feature network on the training split (random 1-pixel shifts as augmentation)."""
    from safetensors.torch import save_file

    x, y, xt, yt = digits_split(BASE["holdout"], BASE["split_seed"])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        xb = x[idx]
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
        xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(xt).argmax(1) == yt).float().mean())
        train_acc = float((net(x).argmax(1) == y).float().mean())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()},
        str(out),
        metadata={"format": "dmdctl.features", "heldout_accuracy": f"{acc:.4f}"},
    )
    return {"heldout_accuracy": acc, "train_accuracy": train_acc, "steps": steps, "seed": seed}
