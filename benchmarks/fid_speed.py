"""How fast is dmdctl's Fréchet distance against a scipy.linalg.sqrtm FID, and how fast are Inception features here?

Prints one table: the time of dmdctl's ``frechet_distance`` (symmetric eigendecompositions),
of ``frechet_distance_fast`` (Cholesky + eigenvalues only; what eval-fid uses) and of the
textbook ``scipy.linalg.sqrtm`` formula on the same 2048-d statistics (ratios, target >= 3x, and
their agreement), then Inception-v3 feature throughput (images/s) at a stated batch for the
edm and clean protocols. The network has RANDOM weights (the speed does not depend on them).

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.fid_speed
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("DMDCTL_QUIET", "1")

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.linalg  # noqa: E402
import torch  # noqa: E402

from dmdctl.fid import FeatureStats, frechet_distance, frechet_distance_fast  # noqa: E402
from dmdctl.inception import InceptionFeatures, build_network  # noqa: E402

from .common import append_markdown, machine  # noqa: E402


def sqrtm_fid(mu1, s1, mu2, s2) -> float:
    """The textbook formula, as pytorch-fid / clean-fid compute it (without their eps retry)."""
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def statistics(d: int, n: int, seed: int):
    """Moments of n correlated d-dim features, like Inception pool3 activations (>= 0)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    f = np.maximum(rng.standard_normal((n, d)) @ mix + 0.3, 0)
    s = FeatureStats(d)
    s.update(f)
    return s.mu, s.sigma


def best_time(fn, repeats: int) -> tuple[float, float]:
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return min(times), value


def inception_throughput(protocol: str, batch: int, size: int, repeats: int) -> float:
    torch.manual_seed(0)
    ext = InceptionFeatures(protocol, net=build_network(), batch_size=batch)
    rng = np.random.default_rng(0)
    imgs = torch.from_numpy(rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8))
    ext.from_uint8(imgs[:2])  # warm-up
    t, _ = best_time(lambda: ext.from_uint8(imgs), repeats)
    return batch / t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=4096, help="features behind each statistic")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="images per Inception forward pass")
    ap.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args()

    mu1, s1 = statistics(args.dim, args.samples, 0)
    mu2, s2 = statistics(args.dim, args.samples, 1)
    t_ours, fid_ours = best_time(lambda: frechet_distance(mu1, s1, mu2, s2), args.repeats)
    t_fast, fid_fast = best_time(lambda: frechet_distance_fast(mu1, s1, mu2, s2), args.repeats)
    t_sqrtm, fid_sqrtm = best_time(lambda: sqrtm_fid(mu1, s1, mu2, s2), args.repeats)
    rel = abs(fid_ours - fid_sqrtm) / abs(fid_sqrtm)
    rel_fast = abs(fid_fast - fid_sqrtm) / abs(fid_sqrtm)
    edm = inception_throughput("edm", args.batch, 64, args.repeats)
    clean = inception_throughput("clean", args.batch, 256, args.repeats)

    body = "\n".join(
        [
            f"Fréchet distance on {args.dim}-d statistics (each from {args.samples} correlated "
            f"features), best of {args.repeats}; Inception-v3 (torch-fidelity layout, random "
            f"weights) at batch {args.batch}, {torch.get_num_threads()} torch thread(s), CPU.",
            "",
            "| measurement | dmdctl | reference | ratio / agreement |",
            "|---|---|---|---|",
            f"| FID {args.dim}-d, frechet_distance (eigh + eigvalsh): time | {t_ours:.2f} s | "
            f"{t_sqrtm:.2f} s (scipy {scipy.__version__} sqrtm) | {t_sqrtm / t_ours:.1f}x faster |",
            f"| FID {args.dim}-d, frechet_distance_fast (Cholesky + syev, used by eval-fid): "
            f"time | {t_fast:.2f} s | {t_sqrtm:.2f} s | {t_sqrtm / t_fast:.1f}x faster "
            "(target >= 3x) |",
            f"| FID {args.dim}-d: value | {fid_ours:.10g} / {fid_fast:.10g} | {fid_sqrtm:.10g} | "
            f"relative difference {rel:.1e} / {rel_fast:.1e} |",
            f"| Inception features, edm (64x64 uint8 -> TF1 bilinear 299) | {edm:.2f} images/s | "
            "| |",
            f"| Inception features, clean (256x256 -> crop, LANCZOS 256, PIL bicubic 299) | "
            f"{clean:.2f} images/s | | |",
        ]
    )
    print(f"machine: {machine()}\n")
    print(body)
    if not args.no_append:
        path = append_markdown(
            "FID speed: eigh Fréchet distance vs scipy sqrtm; Inception throughput",
            body,
            "benchmarks.fid_speed",
        )
        print(f"\nappended to {path}")


if __name__ == "__main__":
    main()
