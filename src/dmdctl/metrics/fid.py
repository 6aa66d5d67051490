"""Streaming feature statistics and the Fréchet distance (pure math, no I/O but npz files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dmdctl.errors import UserError


class FeatureStats:
    """Running sum and sum of outer products in float64: memory does not grow with samples."""

    def __init__(self, dim: int):
        self.dim = dim
        self.n = 0
        self.sum = np.zeros(dim, dtype=np.float64)
        self.sum_outer = np.zeros((dim, dim), dtype=np.float64)

    def update(self, feats: torch.Tensor | np.ndarray) -> None:
        f = (
            feats.detach().cpu().double().numpy()
            if torch.is_tensor(feats)
            else np.asarray(feats, np.float64)
        )
        f = f.reshape(f.shape[0], -1)
        if f.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim}-d features, got {f.shape[1]}")
        self.n += f.shape[0]
        self.sum += f.sum(axis=0)
        self.sum_outer += f.T @ f

    def merge(self, other: FeatureStats) -> FeatureStats:
        self.n += other.n
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    @property
    def mu(self) -> np.ndarray:
        return self.sum / self.n

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance (divides by n - 1), as numpy.cov and the standard FID tools do."""
        if self.n < 2:
            raise UserError(f"need at least 2 samples for a covariance, got {self.n}")
        mu = self.mu
        return (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _frechet_distance_eig(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), via symmetric eigendecompositions
    (the fallback of :func:`frechet_distance` when S1 is singular).

    tr((S1 S2)^1/2) equals the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S1^1/2 S2 S1^1/2, which avoids the non-symmetric ``scipy.linalg.sqrtm``.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise UserError(f"statistics have different shapes: {mu1.shape} vs {mu2.shape}")
    root1 = _sym_sqrt(s1)
    m = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def load_stats_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"reference statistics not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable npz file ({e})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UserError(f"{path} is not an npz file with 'mu' and 'sigma' arrays")
    with data:
        if "mu" not in data or "sigma" not in data:
            raise UserError(
                f"{path} has no 'mu' and 'sigma' arrays (keys: {', '.join(data.files)})"
            )
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


def save_stats_npz(path: Path, mu: np.ndarray, sigma: np.ndarray, **extra) -> Path:
    path = Path(path)
    if path.suffix != ".npz":  # np.savez would append it and the returned path would not exist
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma, **extra)
    return path


# ---------------------------------------------------------------- additions for eval-fid


def stats_to_vector(stats: FeatureStats) -> np.ndarray:
    """(n, sum, sum_outer) as one float64 vector: what processes add up to merge their stats."""
    return np.concatenate([[float(stats.n)], stats.sum, stats.sum_outer.ravel()])


def stats_from_vector(dim: int, vec: np.ndarray) -> FeatureStats:
    vec = np.asarray(vec, np.float64)
    if vec.shape != (1 + dim + dim * dim,):
        raise ValueError(
            f"a {dim}-d statistics vector has {1 + dim + dim * dim} entries, got {vec.shape}"
        )
    stats = FeatureStats(dim)
    stats.n = int(round(vec[0]))
    stats.sum = vec[1 : 1 + dim].copy()
    stats.sum_outer = vec[1 + dim :].reshape(dim, dim).copy()
    return stats


def load_stats_extra(path: Path, keys: tuple[str, ...]) -> dict:
    """Optional arrays of a statistics npz (e.g. num_samples, features, protocol), when present.

    0-d arrays come back as Python scalars/strings; missing keys are left out.
    """
    out = {}
    with np.load(Path(path), allow_pickle=False) as data:
        for k in keys:
            if k in data.files:
                try:
                    v = data[k]
                except ValueError:  # an object array: not ours, ignored
                    continue
                out[k] = v.item() if v.ndim == 0 else v
    return out


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2): the FID of two Gaussians, via a Cholesky
    factor (about 3x less work than the textbook symmetric square roots, same value).

    With S1 = L L^T, the eigenvalues of S1 S2 are those of the symmetric PSD matrix L^T S2 L, so
    tr((S1 S2)^1/2) is the sum of their square roots: one Cholesky factorisation and one
    eigenvalues-only decomposition (LAPACK ``syev``) instead of a full eigendecomposition plus
    an eigenvalue decomposition. Falls back to the square-root form when S1 is not
    positive definite (e.g. fewer samples than dimensions).
    """
    import scipy.linalg

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise UserError(f"statistics have different shapes: {mu1.shape} vs {mu2.shape}")
    try:
        low = np.linalg.cholesky((s1 + s1.T) / 2)
    except np.linalg.LinAlgError:
        return _frechet_distance_eig(mu1, s1, mu2, s2)
    m = low.T @ ((s2 + s2.T) / 2) @ low
    eig = scipy.linalg.eigh((m + m.T) / 2, eigvals_only=True, driver="ev")
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
