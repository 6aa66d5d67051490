"""eval-fid ``--stats A.npz --ref B.npz``: the distance between two statistics files."""

from __future__ import annotations

import sys
from pathlib import Path

from dmdctl.errors import UserError
from dmdctl.files import sha256_file
from dmdctl.metrics import collect
from dmdctl.metrics.fid import (
    frechet_distance,
    load_stats_extra,
    load_stats_npz,
)
from dmdctl.metrics.protocols import PROTOCOLS, get_protocol
from dmdctl.settings.eval_fid import EvalFidConfig


def compare_stats(cfg: EvalFidConfig) -> dict:
    """``--stats A.npz --ref B.npz``: the distance between two statistics files."""
    a, b = Path(cfg.stats), Path(cfg.ref)
    mu1, sigma1 = load_stats_npz(a)
    mu2, sigma2 = load_stats_npz(b)
    meta_a = load_stats_extra(a, collect.STATS_META)
    meta_b = load_stats_extra(b, collect.STATS_META)
    collect.check_meta(meta_b, meta_a.get("protocol"), meta_a.get("features"), b)
    if mu1.shape != mu2.shape:
        raise UserError(f"{a} has {mu1.shape[0]}-d statistics but {b} has {mu2.shape[0]}-d")
    dim = mu1.shape[0]
    n = int(meta_a["num_samples"]) if "num_samples" in meta_a else None
    if n is not None:
        collect.check_sample_count(n, dim, f"samples (in {a})")
        features = str(meta_a.get("features") or meta_b.get("features") or "")
        if (dim == 2048 or features.startswith("inception")) and n < collect.COMPARABLE_SAMPLES:
            sys.stderr.write(
                f"warning: FID on {n} samples is not comparable to 50k-sample FIDs "
                "(FID is biased upwards at small N)\n"
            )
    reference = {"path": str(b), "sha256": sha256_file(b)}
    if "num_samples" in meta_b:
        reference["num_samples"] = int(meta_b["num_samples"])
    protocol_name = meta_a.get("protocol") or meta_b.get("protocol")
    unknown = "unknown (not recorded in the files)"
    if protocol_name in PROTOCOLS:
        protocol = get_protocol(protocol_name).record()
    else:
        protocol = {"name": protocol_name or unknown}
    features = str(meta_a.get("features") or meta_b.get("features") or "")
    metric = "fd_dinov2" if features.startswith("dinov2") else "fid"
    result = {
        metric: frechet_distance(mu1, sigma1, mu2, sigma2),
        "num_samples": n,
        "reference": reference,
        "stats": {"path": str(a), "sha256": sha256_file(a)},
        "features": meta_a.get("features") or meta_b.get("features") or unknown,
        "protocol": protocol,
    }
    if cfg.kid or cfg.precision_recall:
        fa = load_stats_extra(a, ("kid_features",)).get("kid_features")
        fb = load_stats_extra(b, ("kid_features",)).get("kid_features")
        collect.need_features(cfg, fa, a)
        collect.need_features(cfg, fb, b)
        result.update(collect.kid_result(cfg, fa, fb))
    result["versions"] = collect.versions()
    collect.write_json(cfg, result)
    return result
