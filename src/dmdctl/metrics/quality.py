"""Quality of samples against a feature reference: KID, precision/recall, intervals; and the
built-in teachers' own training data as that reference.

References of the built-in teachers (what ``eval-fid`` scores against when no ``--ref`` is given):

- ``digits``: every training image of the teacher (the 1,500 images of the fixed split that
  neither the teacher nor the feature classifier held out), in the classifier's 64-d features.
  FID uses their mean and covariance, KID and precision/recall the features themselves.
- ``toy2d``: the teacher trains on fresh draws of its Gaussian mixture, so its "training data"
  is the mixture itself: FID uses the exact moments, KID and precision/recall a fixed draw of
  10,000 points (seed :data:`TOY2D_REFERENCE_SEED`).

The same-distribution floor (:func:`floor_set`) is real data the reference does not contain,
scored the same way: the 297 held-out digits, or a second, independent draw of the mixture.

KID on the built-in features is computed after :func:`dmdctl.metrics.intervals.standardize` (centred on
the reference mean, divided by the reference's root-mean per-dimension standard deviation):
raw digits-classifier features make the cubic kernel's ``x . y / d`` about 50 and KID of order
1e6. Inception features are used as they are, so Inception KIDs stay comparable to other tools.
Precision and recall do not change under that standardisation (one scale for all dimensions).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import torch

from dmdctl.metrics.intervals import BOOTSTRAP_ROUNDS, kid_bootstrap, standardize
from dmdctl.metrics.kid import KID_SEED, KID_SUBSET_SIZE, KID_SUBSETS, kid
from dmdctl.metrics.prdc import K_NEIGHBOURS, prdc, prdc_bootstrap

TOY2D_REFERENCE_SAMPLES = 10_000
TOY2D_REFERENCE_SEED = 20_000_000
TOY2D_FLOOR_SEED = 20_000_001


@dataclass
class BuiltinReference:
    features: np.ndarray  # raw features of the reference set, float32
    mu: np.ndarray
    sigma: np.ndarray
    description: str  # what FID is measured against
    feature_description: str  # what KID / precision / recall are measured against


def _key(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def training_reference(kind, config: dict) -> BuiltinReference | None:
    """The built-in teacher's own training data as the reference, or None for other kinds."""
    if kind.name not in ("digits", "toy2d"):
        return None
    return _training_reference(kind.name, _key(config))


@functools.lru_cache(maxsize=4)
def _training_reference(name: str, key: str) -> BuiltinReference:
    from dmdctl.metrics.fid import FeatureStats
    from dmdctl.teachers import get_kind

    kind, config = get_kind(name), json.loads(key)
    if name == "digits":
        from dmdctl.teachers.digits import digits_split

        x, _, _, _ = digits_split(config["holdout"], config["split_seed"])
        feats = kind.features(x).numpy()
        stats = FeatureStats(feats.shape[1])
        stats.update(feats)
        desc = f"digits training split ({len(x)} images, all the teacher trained on), classifier features"
        return BuiltinReference(feats.astype(np.float32), stats.mu, stats.sigma, desc, desc)
    pts, _ = kind.sample_data(
        config, TOY2D_REFERENCE_SAMPLES, torch.Generator().manual_seed(TOY2D_REFERENCE_SEED)
    )
    mu, sigma, desc = kind.reference_stats(config)
    feat_desc = (
        f"toy2d mixture, {TOY2D_REFERENCE_SAMPLES} points drawn with seed {TOY2D_REFERENCE_SEED}"
    )
    return BuiltinReference(pts.numpy().astype(np.float32), mu, sigma, desc, feat_desc)


def floor_set(kind, config: dict, num_samples: int | None = None):
    """(samples, labels or None, description): real data outside the reference, for the floor.

    digits: the held-out images (297; ``num_samples`` is ignored, there are no more);
    toy2d: ``num_samples`` (default 10,000) fresh points of the mixture.
    """
    if kind.name == "digits":
        from dmdctl.teachers.digits import digits_split

        _, _, xt, yt = digits_split(config["holdout"], config["split_seed"])
        return xt, yt, f"{len(xt)} held-out digits (never seen by the teacher or the classifier)"
    if kind.name == "toy2d":
        n = num_samples or TOY2D_REFERENCE_SAMPLES
        pts, _ = kind.sample_data(config, n, torch.Generator().manual_seed(TOY2D_FLOOR_SEED))
        return pts, None, f"{n} fresh points of the toy2d mixture (seed {TOY2D_FLOOR_SEED})"
    return None


def score_features(
    feats,
    ref_feats,
    *,
    standardise: bool,
    want_kid: bool = True,
    precision_recall: bool = False,
    k: int = K_NEIGHBOURS,
    bootstrap: int = 0,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> dict:
    """KID (± std over subsets), and optionally precision/recall/density/coverage and bootstrap
    intervals, of ``feats`` (generated) against ``ref_feats`` (the reference), as a flat dict.

    Keys: ``kid``, ``kid_std``, ``kid_subsets``, ``kid_subset_size``, ``kid_features_used``,
    ``kid_standardized``; with ``precision_recall``: ``precision``, ``recall``, ``density``,
    ``coverage``, ``pr_k``, ``pr_features_used`` [generated, reference]; with ``bootstrap`` > 0
    rounds: ``kid_all`` (unbiased KID on all features), ``kid_interval``, ``precision_interval``,
    ... (95% percentile intervals) and ``bootstrap_rounds``.
    """
    f = np.asarray(feats, np.float64)
    r = np.asarray(ref_feats, np.float64)
    if standardise:
        r, f = standardize(r, f)
    out: dict = {}
    if want_kid:
        out.update(kid(f, r, kid_subsets, kid_subset_size, KID_SEED))
        out["kid_features_used"] = [int(len(f)), int(len(r))]
        out["kid_standardized"] = bool(standardise)
        if bootstrap > 0:
            b = kid_bootstrap(f, r, bootstrap, seed=seed)
            out.update(kid_all=b["kid_all"], kid_interval=b["kid_interval"])
    if precision_recall:
        res = prdc(r, f, k=k, per_sample=bootstrap > 0)
        for name in ("precision", "recall", "density", "coverage"):
            out[name] = res[name]
        out["pr_k"] = k
        out["pr_features_used"] = [res["num_fake"], res["num_real"]]
        if bootstrap > 0:
            for name, iv in prdc_bootstrap(res, bootstrap, seed=seed + 1).items():
                out[f"{name}_interval"] = iv
    if bootstrap > 0:
        out["bootstrap_rounds"] = bootstrap
    return out


def score_floor(
    kind,
    config: dict,
    num_samples: int | None = None,
    precision_recall: bool = True,
    bootstrap: int = 0,
    seed: int = 0,
) -> dict | None:
    """The same-distribution floor: real data outside the reference, scored like a model row."""
    from dmdctl.metrics.fid import FeatureStats, frechet_distance

    ref = training_reference(kind, config)
    held = floor_set(kind, config, num_samples)
    if ref is None or held is None:
        return None
    x, y, desc = held
    feats = kind.features(x).double().numpy()
    stats = FeatureStats(feats.shape[1])
    stats.update(feats)
    out = {
        "fid": frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma),
        "num_samples": int(len(x)),
        "reference": {"builtin": ref.description, "features_of": ref.feature_description},
        "features": kind.feature_name(),
        "source": desc,
        "nfe": "-",
    }
    out.update(
        score_features(
            feats,
            ref.features,
            standardise=True,
            precision_recall=precision_recall,
            bootstrap=bootstrap,
            seed=seed,
        )
    )
    out.update(kind.quality_metrics(config, x, y))
    return out


__all__ = [
    "BOOTSTRAP_ROUNDS",
    "BuiltinReference",
    "floor_set",
    "score_features",
    "score_floor",
    "training_reference",
]
