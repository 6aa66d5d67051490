"""The built-in 2-D teacher: a ring of Gaussians and a small MLP EDM denoiser.

Small enough to train in about a minute on a laptop CPU, and to show DMD's behaviour
(mode coverage, collapse of the real-score-only ablation) in one picture. ``toy2d-flow`` is the
same network and data trained as a flow-matching (rectified-flow) velocity model, the way SD3
and most current text-to-image models are trained: it shows the flow path of dmdctl at work.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from dmdctl.core.denoiser import EDMPrecond, FlowDenoiser, fourier_embedding
from dmdctl.teachers.base import TeacherKind

UNBALANCED_WEIGHTS = [0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.06, 0.04]

BASE = {
    "num_modes": 8,
    "radius": 1.0,
    "mode_std": 0.05,
    "weights": None,  # None: equal weights
    "hidden": 128,
    "depth": 3,
    "fourier_features": 64,
    "fourier_scale": 2.0,
    "sigma_data": 0.7,
    "sigma_min": 0.002,
    "sigma_max": 80.0,
    "init_seed": 0,
}
# flow matching: the MLP predicts the velocity eps - x0 at time t (no shift, 1000 levels)
FLOW = dict(BASE, objective="flow", shift=1.0)


class Toy2DBackbone(nn.Module):
    """MLP over the point, random Fourier features of the point, and Fourier features of c_noise.

    The Fourier features of the input let a small MLP resolve modes much narrower than the
    ring; without them training stalls on a blurred ring for some seeds.
    """

    def __init__(
        self,
        hidden: int,
        depth: int,
        fourier_features: int,
        fourier_scale: float,
        init_seed: int = 0,
    ):
        super().__init__()
        gen = torch.Generator().manual_seed(init_seed)
        self.register_buffer(
            "x_freqs", torch.randn(2, fourier_features, generator=gen) * fourier_scale
        )
        self.register_buffer("t_freqs", torch.randn(1, 16, generator=gen))
        width = 2 + 2 * fourier_features + 32
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)

    def bottleneck(self) -> nn.Module:
        return self.net[-2]  # the last hidden layer's activation

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond=None) -> torch.Tensor:
        t = fourier_embedding(c_noise.reshape(-1, 1).to(x.dtype), self.t_freqs)
        h = torch.cat([x, fourier_embedding(x, self.x_freqs), t], dim=-1)
        return self.net(h)


def mode_centers(config: dict) -> torch.Tensor:
    k = config["num_modes"]
    angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    return (config["radius"] * torch.stack([angles.cos(), angles.sin()], dim=1)).float()


def mode_weights(config: dict) -> torch.Tensor:
    w = config.get("weights")
    k = config["num_modes"]
    w = torch.full((k,), 1.0 / k) if w is None else torch.tensor(w, dtype=torch.float32)
    return w / w.sum()


class Toy2D(TeacherKind):
    name = "toy2d"
    default_preset = "toy2d"
    builtin = True
    train_defaults = {"steps": 8000, "batch_size": 512, "lr": 2e-3}

    def presets(self) -> dict[str, dict]:
        return {
            "toy2d": dict(BASE),
            "toy2d-unbalanced": dict(BASE, weights=UNBALANCED_WEIGHTS),
            "toy2d-flow": dict(FLOW),
        }

    def build(self, config: dict) -> EDMPrecond | FlowDenoiser:
        backbone = Toy2DBackbone(
            config["hidden"],
            config["depth"],
            config["fourier_features"],
            config["fourier_scale"],
            config.get("init_seed", 0),
        )
        if config.get("objective", "edm") == "flow":
            return FlowDenoiser(
                backbone, shift=config.get("shift", 1.0), sigma_data=config["sigma_data"]
            )
        return EDMPrecond(backbone, config["sigma_data"], config["sigma_min"], config["sigma_max"])

    def sample_shape(self, config: dict) -> tuple[int, ...]:
        return (2,)

    def sample_data(
        self, config: dict, n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, None]:
        idx = torch.multinomial(mode_weights(config), n, replacement=True, generator=generator)
        noise = torch.randn(n, 2, generator=generator) * config["mode_std"]
        return mode_centers(config)[idx] + noise, None

    def real_data(self, config: dict):
        from dmdctl.data.real import RealData

        return RealData(
            "the toy2d mixture itself (fresh draws)",
            sampler=lambda n, gen: self.sample_data(config, n, gen),
        )

    def reference_stats(self, config: dict):
        """Exact mean and covariance of the Gaussian mixture (no sampling error)."""
        c = mode_centers(config).double()
        w = mode_weights(config).double()
        mu = (w[:, None] * c).sum(0)
        second = (w[:, None, None] * (c[:, :, None] * c[:, None, :])).sum(0)
        sigma = (
            second
            + config["mode_std"] ** 2 * torch.eye(2, dtype=torch.float64)
            - torch.outer(mu, mu)
        )
        return (
            mu.numpy(),
            sigma.numpy(),
            f"toy2d mixture (exact moments, {config['num_modes']} modes)",
        )

    def quality_metrics(
        self, config: dict, samples: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict:
        """Mode coverage and sharpness, which the 2-D Fréchet distance cannot see."""
        x = samples.float().cpu()
        c = mode_centers(config)
        d = torch.cdist(x, c)
        dist, nearest = d.min(dim=1)
        within = dist <= 3 * config["mode_std"]
        # a mode counts as covered when at least a quarter of its share lands within 3 std of it
        counts = torch.bincount(nearest[within], minlength=len(c)).float()
        expected = mode_weights(config) * len(x)
        return {
            "modes_covered": int((counts >= 0.25 * expected).sum()),
            "num_modes": len(c),
            "frac_within_3std": float(within.float().mean()),
        }

    def save_plot(
        self,
        panels: list[tuple[str, torch.Tensor]],
        path: Path,
        config: dict,
        labels: torch.Tensor | None = None,
    ) -> Path:
        from dmdctl.plots import scatter_panels

        return scatter_panels(
            panels, path, extent=1.6 * config["radius"], centers=mode_centers(config)
        )
