"""What every eval-fid flow shares: feature extractors (Inception or a built-in kind's own),
streamed statistics (:class:`Accumulator`), built-in and file references, KID / precision-recall
from kept features, the statistics file and the JSON result, the versions recorded."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dmdctl.config import write_config
from dmdctl.errors import UserError
from dmdctl.files import sha256_file
from dmdctl.metrics.fid import (
    FeatureStats,
    load_stats_extra,
    load_stats_npz,
    save_stats_npz,
    stats_from_vector,
    stats_to_vector,
)
from dmdctl.metrics.kid import KID_SEED, Reservoir
from dmdctl.runtime import Processes, pick_device

COMPARABLE_SAMPLES = 10_000  # below this an Inception FID is flagged as not comparable
STATS_META = ("num_samples", "features", "protocol")


def warn(procs: Processes, message: str) -> None:
    if procs.main:
        sys.stderr.write(f"warning: {message}\n")
        sys.stderr.flush()


@dataclass
class Extractor:
    fn: object  # samples in [-1, 1] -> features
    name: str
    dim: int | None
    protocol: dict
    inception: object = None  # InceptionFeatures, for uint8 images
    weights: dict | None = None
    dinov2: object = None  # DinoV2Features (--features dinov2), for uint8 images

    @property
    def metric(self) -> str:
        """The result's key and name of the distance: FD-DINOv2 with DINOv2 features."""
        return "fd_dinov2" if self.dinov2 is not None else "fid"

    def from_uint8(self, images):
        return (self.inception or self.dinov2).from_uint8(images)


def inception_extractor(cfg, device, procs: Processes) -> Extractor:
    from dmdctl.metrics.inception import InceptionFeatures

    ext = InceptionFeatures(
        cfg.protocol, cfg.inception_weights, cfg.inception_sha256, device, cfg.inception_batch
    )
    if not ext.weights["official"]:
        warn(
            procs,
            "Inception weights are not torch-fidelity's official file (sha256 override): "
            "these FIDs are not comparable to published numbers",
        )
    return Extractor(ext, ext.feature_name(), ext.dim, ext.protocol.record(), ext, ext.weights)


def image_extractor(cfg, device, procs: Processes) -> Extractor:
    """The features images are scored with: Inception-v3 (FID), or with --features dinov2 the
    local DINOv2 network (FD-DINOv2)."""
    if cfg.features != "dinov2":
        return inception_extractor(cfg, device, procs)
    from dmdctl.metrics.dinov2 import PROTOCOL, DinoV2Features

    model = DinoV2Features(cfg.dinov2, device, cfg.inception_batch)
    return Extractor(
        model, model.name, model.dim, dict(PROTOCOL), weights=model.weights, dinov2=model
    )


def native_extractor(kind) -> Extractor:
    return Extractor(
        kind.features,
        kind.feature_name(),
        None,
        {
            "name": "native",
            "quantization": "none (features of the float samples as generated)",
            "resize": "none",
            "follows": f"dmdctl built-in {kind.name} evaluation",
        },
    )


def check_sample_count(n: int, dim: int, what: str) -> None:
    if n < dim + 1:
        raise UserError(
            f"{n} {what} give a singular covariance for {dim}-d features: FID needs at least "
            f"{dim + 1} (published Inception FIDs use 50,000)"
        )


def features_id(name: str) -> str:
    """The part of a features description that must match between a result and its reference."""
    return name.split(", torch-fidelity")[0]


def load_reference(cfg, protocol: str, features: str, want_kid: bool):
    """(mu, sigma, record, KID features or None) of ``--ref``, checked against this run; an
    EDM2 reference pickle (``img512.pkl``) gives its ``fid`` or ``fd_dinov2`` entry."""
    path = Path(cfg.ref)
    if path.suffix.lower() == ".pkl":
        return _edm2_reference(cfg, path, protocol, features)
    mu, sigma = load_stats_npz(path)
    meta = load_stats_extra(path, STATS_META)
    check_meta(meta, protocol, features, path)
    record = {"path": str(path), "sha256": sha256_file(path)}
    if "num_samples" in meta:
        record["num_samples"] = int(meta["num_samples"])
    want = want_kid or cfg.precision_recall
    feats = load_stats_extra(path, ("kid_features",)).get("kid_features") if want else None
    need_features(cfg, feats, path)
    return mu, sigma, record, feats


def _edm2_reference(cfg, path: Path, protocol: str, features: str):
    from dmdctl.teachers.edm2.checkpoint import edm2_reference

    metric = "fd_dinov2" if features.startswith("dinov2") else "fid"
    if metric == "fid" and protocol != "edm":
        raise UserError(
            f"{path} is an EDM2 reference, made with NVIDIA's Inception detector as EDM's: "
            "score with --protocol edm"
        )
    if not path.is_file():
        raise UserError(f"reference statistics not found: {path}")
    mu, sigma, n = edm2_reference(path, metric)
    record = {"path": str(path), "sha256": sha256_file(path), "entry": metric,
              "format": "EDM2 reference statistics pickle, read as data"}  # fmt: skip
    if n is not None:
        record["num_samples"] = n
    need_features(cfg, None, path)
    return mu, sigma, record, None


def need_features(cfg, feats, path) -> None:
    if cfg.precision_recall and feats is None:
        raise UserError(
            f"--precision-recall needs the features of the reference, but {path} holds only "
            "mu/sigma: make it with `dmdctl eval-fid --make-ref ... -o REF.npz` (it keeps up to "
            "--kid-max-features features)"
        )


def check_meta(meta: dict, protocol: str | None, features: str | None, path: Path) -> None:
    if protocol and "protocol" in meta and str(meta["protocol"]) != protocol:
        raise UserError(
            f"{path} was made with protocol '{meta['protocol']}' but this run uses '{protocol}': "
            f"pass --protocol {meta['protocol']} (or remake the reference)"
        )
    if features and "features" in meta and str(meta["features"]) != features:
        raise UserError(
            f"{path} holds statistics of '{meta['features']}' features but this run uses "
            f"'{features}'"
        )


def versions(extra: tuple[str, ...] = ()) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("dmdctl", "torch", "numpy", "scipy", *extra):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def version_pkgs(ext: Extractor | None, procs: Processes) -> tuple[str, ...]:
    pkgs: tuple[str, ...] = ()
    if ext is not None and ext.dinov2 is not None:
        pkgs += ("transformers",)
    if ext is not None and ext.inception is not None:
        pkgs += ("torch-fidelity",)
        if ext.protocol["name"] == "clean":
            pkgs += ("clean-fid", "pillow")
    if procs.world > 1:
        pkgs += ("accelerate",)
    return pkgs


class Accumulator:
    """Streaming FeatureStats plus, when KID is wanted, a bounded reservoir of features."""

    def __init__(self, keep_features: bool, cap: int, procs: Processes):
        self.stats: FeatureStats | None = None
        self.reservoir: Reservoir | None = None
        self.keep = keep_features
        self.cap = cap
        self.procs = procs

    def update(self, feats: torch.Tensor, index: np.ndarray) -> None:
        if self.stats is None:
            self.stats = FeatureStats(feats.shape[1])
            if self.keep:
                self.reservoir = Reservoir(
                    feats.shape[1], self.cap, seed=KID_SEED + self.procs.rank
                )
        self.stats.update(feats)
        if self.reservoir is not None:
            self.reservoir.update(feats, index)

    def reduce(self, dim_hint: int | None) -> tuple[FeatureStats, np.ndarray | None]:
        procs = self.procs
        dims = procs.gather(self.stats.dim if self.stats else None)
        dim = next((d for d in dims if d is not None), dim_hint)
        if dim is None:
            raise UserError("nothing was scored")
        local = self.stats or FeatureStats(dim)
        stats = stats_from_vector(dim, procs.sum(stats_to_vector(local)))
        feats = None
        if self.keep:
            mine = self.reservoir or Reservoir(dim, self.cap)
            parts = procs.gather(mine) if procs.world > 1 else [mine]
            feats = (Reservoir.merge(parts, seed=KID_SEED) if len(parts) > 1 else parts[0]).features
        return stats, feats


def kid_result(cfg, feats, ref_feats, standardise: bool = False) -> dict:
    """KID (and with --precision-recall precision, recall, density, coverage; with --bootstrap
    their intervals) of the kept features against the reference's (see :mod:`dmdctl.metrics.quality`)."""
    if not (cfg.kid or cfg.precision_recall):
        return {}
    if ref_feats is None or feats is None:
        return {"kid": None, "kid_note": "the reference holds no features (only mu/sigma); "
                "make one with --make-ref to get KID"}  # fmt: skip
    if ref_feats.shape[1] != feats.shape[1]:
        raise UserError(
            f"reference KID features are {ref_feats.shape[1]}-d but features are {feats.shape[1]}-d"
        )
    from dmdctl.metrics.quality import score_features

    return score_features(
        feats,
        ref_feats,
        standardise=standardise,
        want_kid=cfg.kid,
        precision_recall=cfg.precision_recall,
        k=cfg.pr_k,
        bootstrap=cfg.bootstrap,
        kid_subsets=cfg.kid_subsets,
        kid_subset_size=cfg.kid_subset_size,
        seed=cfg.seed,
    )


def save_stats(cfg, stats: FeatureStats, feats, ext: Extractor) -> dict:
    extra = {
        "num_samples": np.array(stats.n),
        "features": np.array(features_id(ext.name)),
        "protocol": np.array(ext.protocol["name"]),
    }
    if feats is not None:
        extra["kid_features"] = feats.astype(np.float32)
    path = save_stats_npz(Path(cfg.out), stats.mu, stats.sigma, **extra)
    return {"path": str(path), "sha256": sha256_file(path)}


def write_json(cfg, result: dict) -> None:
    """The result as JSON at ``--json`` (with the settings next to it), when asked."""
    if cfg.json:
        path = Path(cfg.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        write_config(cfg, path.parent, name=path.stem + ".config.toml")


def device_of(cfg, procs: Processes) -> torch.device:
    if procs.world > 1 and cfg.device == "auto":
        return procs.state.device
    return pick_device(cfg.device)
