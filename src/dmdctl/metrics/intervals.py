"""Confidence intervals for the quality metrics, and the rule that calls two rows different.

- :func:`standardize`: centre features on the reference set's mean and divide by one scale, the
  root of the reference's mean per-dimension variance. Distances keep their ranks (precision and
  recall do not change) while KID's cubic kernel ``(x . y / d + 1)^3`` sees ``x . y / d`` of
  order 1 instead of the ~50 of the raw digits-classifier features, where a few large products
  dominate and KID comes out of order 1e6.
- :func:`kid_bootstrap`: KID as the unbiased MMD^2 over *all* features of both sets (sizes may
  differ), with a percentile bootstrap interval. Each round draws multinomial weights for both
  sets and evaluates the weighted statistic with same-point pairs left out, so a point drawn
  twice is not paired with itself (that would add its large self-similarity and bias every
  round upwards). All rounds share one pass over the kernel matrices, computed in blocks.
- :func:`bootstrap_mean_interval`: the percentile interval of the mean of per-sample values.
- :func:`compare_intervals` / :func:`separated`: two rows differ only when their intervals do
  not overlap; otherwise they are "not separated".
"""

from __future__ import annotations

import numpy as np
import torch

from dmdctl.errors import UserError

BOOTSTRAP_ROUNDS = 200
LEVEL = 0.95
CHUNK = 1000


def standardize(reference, *others) -> tuple[np.ndarray, ...]:
    """``reference`` and each of ``others`` centred on the reference mean and divided by the
    reference's root-mean per-dimension standard deviation (one scalar for all dimensions)."""
    ref = np.asarray(reference, np.float64)
    mu = ref.mean(0)
    scale = float(np.sqrt(ref.var(0, ddof=1).mean())) if len(ref) > 1 else 0.0
    if not np.isfinite(scale) or scale <= 0:
        raise UserError("cannot standardise features: the reference set has no spread")
    return tuple((np.asarray(x, np.float64) - mu) / scale for x in (ref, *others))


def _percentile_interval(values: np.ndarray, level: float) -> list[float]:
    a = (1 - level) / 2
    lo, hi = np.quantile(values, [a, 1 - a])
    return [float(lo), float(hi)]


def bootstrap_mean_interval(
    values, rounds: int = BOOTSTRAP_ROUNDS, level: float = LEVEL, seed: int = 0
) -> list[float]:
    """Percentile bootstrap interval of ``mean(values)`` (resampling the values)."""
    v = np.asarray(values, np.float64).ravel()
    if len(v) == 0:
        raise UserError("a bootstrap interval needs at least one value")
    rng = np.random.default_rng(seed)
    w = rng.multinomial(len(v), np.full(len(v), 1.0 / len(v)), size=rounds)
    return _percentile_interval(w @ v / len(v), level)


def _kernel(a: torch.Tensor, b: torch.Tensor, d: int) -> torch.Tensor:
    return (a @ b.T / d + 1.0) ** 3


def _weighted_within(x: torch.Tensor, w: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per column of ``w``: sum_{i != j} w_i w_j k(x_i, x_j) / sum_{i != j} w_i w_j."""
    d = x.shape[1]
    total = torch.zeros(w.shape[1], dtype=torch.float64)
    diag = ((x * x).sum(1) / d + 1.0) ** 3
    for lo in range(0, len(x), chunk):
        kblock = _kernel(x[lo : lo + chunk], x, d)
        total += (w[lo : lo + chunk] * (kblock @ w)).sum(0)
    total -= (w * w * diag[:, None]).sum(0)
    pairs = w.sum(0) ** 2 - (w * w).sum(0)
    return total / pairs


def _weighted_cross(
    x: torch.Tensor, y: torch.Tensor, wx: torch.Tensor, wy: torch.Tensor, chunk: int
) -> torch.Tensor:
    d = x.shape[1]
    total = torch.zeros(wx.shape[1], dtype=torch.float64)
    for lo in range(0, len(x), chunk):
        total += (wx[lo : lo + chunk] * (_kernel(x[lo : lo + chunk], y, d) @ wy)).sum(0)
    return total / (wx.sum(0) * wy.sum(0))


def kid_bootstrap(
    features_1,
    features_2,
    rounds: int = BOOTSTRAP_ROUNDS,
    level: float = LEVEL,
    seed: int = 0,
    chunk: int = CHUNK,
) -> dict:
    """Unbiased MMD^2 (cubic kernel) on all features, with a bootstrap interval over samples.

    Returns ``kid_all`` (the estimate on every feature of both sets), ``kid_interval`` [low,
    high] (percentile interval of ``rounds`` resamplings of both sets), ``kid_boot_std`` (the
    standard deviation of those rounds) and ``kid_bootstrap_rounds``.
    """
    x = torch.from_numpy(np.asarray(features_1, np.float64))
    y = torch.from_numpy(np.asarray(features_2, np.float64))
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise UserError(
            f"KID needs two feature sets of the same width, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if len(x) < 2 or len(y) < 2:
        raise UserError(f"KID needs at least 2 features on each side, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)

    def weights(n: int) -> torch.Tensor:
        boot = rng.multinomial(n, np.full(n, 1.0 / n), size=rounds).T  # n x rounds
        return torch.from_numpy(np.concatenate([np.ones((n, 1)), boot], 1).astype(np.float64))

    wx, wy = weights(len(x)), weights(len(y))
    mmd = (
        _weighted_within(x, wx, chunk)
        + _weighted_within(y, wy, chunk)
        - 2 * _weighted_cross(x, y, wx, wy, chunk)
    ).numpy()
    boot = mmd[1:]
    return {
        "kid_all": float(mmd[0]),
        "kid_interval": _percentile_interval(boot, level) if rounds > 1 else None,
        "kid_boot_std": float(boot.std()) if rounds > 1 else None,
        "kid_bootstrap_rounds": rounds,
    }


def compare_intervals(a, b) -> str:
    """``"lower"`` / ``"higher"`` when interval ``a`` lies wholly below / above ``b``, else
    ``"not separated"`` (touching or overlapping intervals are not separated)."""
    (alo, ahi), (blo, bhi) = sorted(a), sorted(b)
    if ahi < blo:
        return "lower"
    if alo > bhi:
        return "higher"
    return "not separated"


def separated(a, b) -> bool:
    """Whether two intervals do not overlap."""
    return compare_intervals(a, b) != "not separated"


def hull(intervals) -> list[float]:
    """The smallest interval holding all of ``intervals`` (e.g. one bootstrap interval per
    seed: a row's interval then spans its seed-to-seed spread as well as sampling noise)."""
    ivs = [sorted(i) for i in intervals]
    return [min(i[0] for i in ivs), max(i[1] for i in ivs)]
