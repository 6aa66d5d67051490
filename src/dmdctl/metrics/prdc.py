"""Precision, recall, density and coverage of generated samples in a feature space.

Pure functions of two feature sets, ``real`` (the reference, N x d) and ``fake`` (the generated
samples, M x d):

- **precision** (Kynkäänniemi et al. 2019): the fraction of fake samples that fall inside the
  real manifold, i.e. within the k-th-nearest-neighbour radius of at least one real sample.
  Sharp samples that look like data score high, even if they are all the same.
- **recall**: the fraction of real samples inside the fake manifold (balls of the fakes' own
  k-NN radii). A collapsed generator covers little of the data and scores low.
- **density** (Naeem et al. 2020): the number of real balls containing each fake, averaged and
  divided by k; about 1 when both sets come from the same distribution, not capped at 1.
- **coverage**: the fraction of real samples whose ball contains at least one fake sample;
  unlike recall it uses only the real balls, so outliers among the fakes do not inflate it.

k = 3 by default, as in the precision/recall paper. A point lies in a ball when its distance to
the centre is at most the radius (``<=``), so two identical sets score 1 everywhere.

Distances are computed in float64 blocks of ``chunk`` rows against the whole other set, never as
one N x M matrix: 10,000 x 10,000 features need ``chunk * 10,000 * 8`` bytes at a time (80 MB at
the default chunk of 1,000). Precision and density depend on N, recall and coverage on M (the
balls shrink as the sets grow): compare rows scored with the same counts.

All four are averages of per-sample indicators (fakes for precision and density, reals for
recall and coverage), so :func:`prdc` also returns those per-sample values and
:func:`prdc_bootstrap` resamples them for a confidence interval; the manifolds (the k-NN radii)
are held fixed in that resampling, so the interval is the one of sampling the evaluated points.
"""

from __future__ import annotations

import numpy as np
import torch

from dmdctl.errors import UserError

K_NEIGHBOURS = 3
CHUNK = 1000
METRICS = ("precision", "recall", "density", "coverage")


def _as_tensor(x) -> torch.Tensor:
    if torch.is_tensor(x):
        t = x.detach().cpu().double()
    else:
        t = torch.from_numpy(np.asarray(x, np.float64))
    return t.reshape(len(t), -1)


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(1)


def _distances(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of ``a`` (a block) and all rows of ``b``."""
    d2 = _sq_norms(a)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return d2.clamp_min_(0).sqrt_()


def knn_radii(x, k: int = K_NEIGHBOURS, chunk: int = CHUNK) -> np.ndarray:
    """Distance of each row of ``x`` to its k-th nearest *other* row (the radius of its ball)."""
    t = _as_tensor(x)
    n = len(t)
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    if n < k + 1:
        raise UserError(f"k-NN radii with k = {k} need at least {k + 1} samples, got {n}")
    sq = _sq_norms(t)
    out = torch.empty(n, dtype=torch.float64)
    for lo in range(0, n, chunk):
        d = _distances(t[lo : lo + chunk], t, sq)
        # each row's own distance (0) is among the k + 1 smallest; the largest of them is the k-th
        # nearest other point (with duplicates the self entry may be swapped for a tie: same value)
        rows = torch.arange(len(d))
        d[rows, rows + lo] = -1.0  # make sure the self entry is the one dropped
        out[lo : lo + chunk] = d.topk(k + 1, dim=1, largest=False).values[:, -1]
    return out.numpy()


def prdc(real, fake, k: int = K_NEIGHBOURS, chunk: int = CHUNK, per_sample: bool = False) -> dict:
    """Precision, recall, density and coverage of ``fake`` against ``real`` (k-NN manifolds).

    With ``per_sample=True`` the result also holds the per-sample values the four are means of:
    ``in_real`` (per fake: inside any real ball), ``real_balls`` (per fake: how many real balls
    hold it), ``in_fake`` (per real: inside any fake ball), ``covered`` (per real: its ball holds
    a fake).
    """
    r = _as_tensor(real)
    f = _as_tensor(fake)
    if r.shape[1] != f.shape[1]:
        raise UserError(
            f"precision/recall need two feature sets of the same width, got {r.shape[1]}-d "
            f"and {f.shape[1]}-d"
        )
    r_rad = torch.from_numpy(knn_radii(r, k, chunk))
    f_rad = torch.from_numpy(knn_radii(f, k, chunk))
    r_sq, f_sq = _sq_norms(r), _sq_norms(f)
    real_balls = torch.zeros(len(f), dtype=torch.int64)  # per fake: real balls containing it
    nearest_fake = torch.full((len(r),), float("inf"), dtype=torch.float64)
    for lo in range(0, len(f), chunk):
        d = _distances(f[lo : lo + chunk], r, r_sq)  # fakes x reals
        real_balls[lo : lo + chunk] = (d <= r_rad[None, :]).sum(1)
        nearest_fake = torch.minimum(nearest_fake, d.min(0).values)
    in_fake = torch.zeros(len(r), dtype=torch.bool)  # per real: inside some fake ball
    for lo in range(0, len(r), chunk):
        d = _distances(r[lo : lo + chunk], f, f_sq)  # reals x fakes
        in_fake[lo : lo + chunk] = (d <= f_rad[None, :]).any(1)
    in_real = real_balls > 0
    covered = nearest_fake <= r_rad
    out = {
        "precision": float(in_real.double().mean()),
        "recall": float(in_fake.double().mean()),
        "density": float(real_balls.double().mean() / k),
        "coverage": float(covered.double().mean()),
        "k": k,
        "num_real": len(r),
        "num_fake": len(f),
    }
    if per_sample:
        out.update(
            in_real=in_real.numpy(),
            real_balls=real_balls.numpy(),
            in_fake=in_fake.numpy(),
            covered=covered.numpy(),
        )
    return out


def prdc_bootstrap(per_sample: dict, rounds: int = 200, level: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap intervals of the four metrics from :func:`prdc`'s per-sample values.

    Precision and density resample the fakes, recall and coverage the reals (with replacement,
    ``rounds`` times); returns ``{metric: [low, high]}``.
    """
    from dmdctl.metrics.intervals import bootstrap_mean_interval

    k = per_sample["k"]
    values = {
        "precision": per_sample["in_real"].astype(np.float64),
        "density": per_sample["real_balls"].astype(np.float64) / k,
        "recall": per_sample["in_fake"].astype(np.float64),
        "coverage": per_sample["covered"].astype(np.float64),
    }
    return {
        name: bootstrap_mean_interval(v, rounds, level, seed + i)
        for i, (name, v) in enumerate(values.items())
    }
