"""How fast is dmdctl's Fréchet distance against a scipy.linalg.sqrtm FID, and how fast are Inception features here?

Prints one table: the time of dmdctl's square-root form (symmetric eigendecompositions; the
fallback for a singular covariance), of ``frechet_distance`` (Cholesky + eigenvalues only; what
every score uses) and of the
textbook ``scipy.linalg.sqrtm`` formula on the same 2048-d statistics (ratios, target >= 3x, and
their agreement), then Inception-v3 feature throughput (images/s) at a stated batch for the
edm and clean protocols against the bare network on ready 299x299 input (the share of the
pipeline's throughput the network allows). The network has RANDOM weights (the speed does not
depend on them). Needs torch-fidelity for the Inception rows (skipped with a note without it).

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.fid_speed
    python -m benchmarks.fid_speed --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("DMDCTL_QUIET", "1")

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.linalg  # noqa: E402
import torch  # noqa: E402

from dmdctl.metrics.fid import FeatureStats, _frechet_distance_eig, frechet_distance  # noqa: E402

from .common import (  # noqa: E402
    add_common_args,
    finish,
    fmt_s,
    interleaved,
    md_table,
    median,
    missing_packages,
    say,
    setup,
)


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


def inception_rows(args, device) -> list[list]:
    """Features per second of the eval-fid pipeline (protocol resize + network) against the bare
    network on ready 299x299 input, interleaved, per protocol."""
    from dmdctl.metrics.inception import InceptionFeatures, build_network, pool3_from_normalized

    torch.manual_seed(0)
    net = build_network().eval()
    rng = np.random.default_rng(0)
    b = args.batch
    ready = torch.from_numpy(rng.standard_normal((b, 3, 299, 299)).astype(np.float32)).to(device)

    def bare():
        with torch.no_grad():
            pool3_from_normalized(net, ready)

    runs = {"bare network": bare}
    sizes = {"edm": 64, "clean": 256}
    for protocol, size in sizes.items():
        ext = InceptionFeatures(protocol, net=net, batch_size=b, device=device)
        imgs = torch.from_numpy(rng.integers(0, 256, (b, 3, size, size), dtype=np.uint8))
        runs[protocol] = lambda ext=ext, imgs=imgs: ext.from_uint8(imgs)
    say(f"fid_speed: Inception features, batch {b}, {', '.join(runs)}")
    times = interleaved(runs, args.repeats, device)
    tb = median(times["bare network"])
    rows = [["Inception pool3, bare network on ready 299x299 float input", f"{b / tb:,.1f} images/s",
             "", ""]]  # fmt: skip
    what = {"edm": "edm (64x64 uint8 -> TF1 bilinear 299)",
            "clean": "clean (256x256 -> crop, LANCZOS 256, PIL bicubic 299)"}  # fmt: skip
    for protocol in sizes:
        t = median(times[protocol])
        rows.append([f"Inception features, eval-fid pipeline, {what[protocol]}",
                     f"{b / t:,.1f} images/s", f"bare network {b / tb:,.1f} images/s",
                     f"**{tb / t:.2f}** of the bare network's throughput"])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, repeats=3)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=4096, help="features behind each statistic")
    ap.add_argument("--batch", type=int, default=32, help="images per Inception forward pass")
    ap.add_argument("--no-sqrtm", action="store_true", help="skip the slow scipy sqrtm reference")
    ap.add_argument("--no-append", action="store_true", help=argparse.SUPPRESS)  # the default now
    args = ap.parse_args(argv)
    device = setup(args)

    say(f"fid_speed: Fréchet distance on {args.dim}-d statistics")
    mu1, s1 = statistics(args.dim, args.samples, 0)
    mu2, s2 = statistics(args.dim, args.samples, 1)
    value = {}

    def run(name, fn):
        def go():
            value[name] = fn(mu1, s1, mu2, s2)

        return go

    runs = {"eigh": run("eigh", _frechet_distance_eig), "fast": run("fast", frechet_distance)}
    if not args.no_sqrtm:
        runs["sqrtm"] = run("sqrtm", sqrtm_fid)
    times = interleaved(runs, args.repeats, torch.device("cpu"), warmup=0)
    t_ours, t_fast = median(times["eigh"]), median(times["fast"])
    rows = []
    if "sqrtm" in times:
        t_sqrtm, fid_sqrtm = median(times["sqrtm"]), value["sqrtm"]
        rel = abs(value["eigh"] - fid_sqrtm) / abs(fid_sqrtm)
        rel_fast = abs(value["fast"] - fid_sqrtm) / abs(fid_sqrtm)
        ref = f"{fmt_s(t_sqrtm)} (scipy {scipy.__version__} sqrtm)"
        rows += [
            [f"FID {args.dim}-d, square-root form (eigh + eigvalsh): time", fmt_s(t_ours), ref,
             f"**{t_sqrtm / t_ours:.1f}x** faster"],
            [f"FID {args.dim}-d, frechet_distance (Cholesky + syev, used by eval-fid): time",
             fmt_s(t_fast), ref, f"**{t_sqrtm / t_fast:.1f}x** faster (target >= 3x)"],
            [f"FID {args.dim}-d: value", f"{value['eigh']:.10g} / {value['fast']:.10g}",
             f"{fid_sqrtm:.10g}", f"relative difference {rel:.1e} / {rel_fast:.1e}"],
        ]  # fmt: skip
    else:
        rows += [
            [f"FID {args.dim}-d, frechet_distance vs the square-root form: time", fmt_s(t_fast),
             fmt_s(t_ours), f"**{t_ours / t_fast:.1f}x** faster"],
        ]  # fmt: skip
    note = ""
    if missing_packages(["torch_fidelity"]):
        note = " Inception rows skipped: needs torch-fidelity (not installed)."
    else:
        rows += inception_rows(args, device)
    body = "\n".join(
        [
            f"Fréchet distance on {args.dim}-d statistics (each from {args.samples} correlated "
            f"features), median of {args.repeats} interleaved runs on the CPU; Inception-v3 "
            f"(torch-fidelity layout, random weights) at batch {args.batch} on {device}, "
            f"{torch.get_num_threads()} torch thread(s).{note}",
            "",
            md_table(["measurement", "dmdctl", "reference", "ratio / agreement"], rows),
        ]
    )
    return finish(
        args,
        "FID speed: eigh Fréchet distance vs scipy sqrtm; Inception throughput",
        body,
        "benchmarks.fid_speed",
    )


if __name__ == "__main__":
    main()
