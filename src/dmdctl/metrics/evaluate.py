"""``dmdctl eval-fid``: Fréchet distance (and KID) of samples or images to reference statistics.

What is scored (one of):
- a generator file / distill run (``--generator``) or the teacher's sampler (``--teacher-path``),
  with balanced class labels for class-conditional sources;
- a folder of images (``--images``);
- ``--make-ref FOLDER_OR_NPZ -o ref.npz``: reference statistics of a folder of images or of an
  ADM-style npz (``arr_0``, NHWC uint8);
- ``--stats A.npz --ref B.npz``: the distance between two statistics files.

Features: a built-in teacher kind's own features (identity for toy2d, the digits classifier)
unless ``--features inception``; images are always scored with Inception-v3 pool3 features
(:mod:`dmdctl.metrics.inception`) under a protocol (:mod:`dmdctl.metrics.protocols`). Features are streamed
into float64 sums (:class:`FeatureStats`); KID uses a bounded reservoir of features
(:mod:`dmdctl.metrics.kid`). Under ``torchrun``/``accelerate launch`` each process scores its share of
the batches and the sums are added across processes, which gives the single-process numbers.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dmdctl.config import write_config
from dmdctl.core.sampling import class_labels
from dmdctl.errors import UserError
from dmdctl.files import sha256_file
from dmdctl.generators import generate, source_from
from dmdctl.metrics.fid import (
    FeatureStats,
    frechet_distance,
    load_stats_extra,
    load_stats_npz,
    save_stats_npz,
    stats_from_vector,
    stats_to_vector,
)
from dmdctl.metrics.images import ImageInput
from dmdctl.metrics.kid import KID_SEED, Reservoir
from dmdctl.metrics.protocols import PROTOCOLS, get_protocol
from dmdctl.runtime import Processes, pick_device
from dmdctl.settings.eval_fid import EvalFidConfig
from dmdctl.ui import progress

COMPARABLE_SAMPLES = 10_000  # below this an Inception FID is flagged as not comparable
STATS_META = ("num_samples", "features", "protocol")


def _warn(procs: Processes, message: str) -> None:
    if procs.main:
        sys.stderr.write(f"warning: {message}\n")
        sys.stderr.flush()


# ---------------------------------------------------------------- features


@dataclass
class Extractor:
    fn: object  # samples in [-1, 1] -> features
    name: str
    dim: int | None
    protocol: dict
    inception: object = None  # InceptionFeatures, for uint8 images
    weights: dict | None = None


def _inception(cfg, device, procs: Processes) -> Extractor:
    from dmdctl.metrics.inception import InceptionFeatures

    ext = InceptionFeatures(
        cfg.protocol, cfg.inception_weights, cfg.inception_sha256, device, cfg.inception_batch
    )
    if not ext.weights["official"]:
        _warn(
            procs,
            "Inception weights are not torch-fidelity's official file (sha256 override): "
            "these FIDs are not comparable to published numbers",
        )
    return Extractor(ext, ext.feature_name(), ext.dim, ext.protocol.record(), ext, ext.weights)


def _native(kind) -> Extractor:
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


def _check_sample_count(n: int, dim: int, what: str) -> None:
    if n < dim + 1:
        raise UserError(
            f"{n} {what} give a singular covariance for {dim}-d features: FID needs at least "
            f"{dim + 1} (published Inception FIDs use 50,000)"
        )


def _features_id(name: str) -> str:
    """The part of a features description that must match between a result and its reference."""
    return name.split(", torch-fidelity")[0]


# ---------------------------------------------------------------- references


def _load_reference(cfg, protocol: str, features: str, want_kid: bool):
    """(mu, sigma, record, KID features or None) of ``--ref``, checked against this run."""
    path = Path(cfg.ref)
    mu, sigma = load_stats_npz(path)
    meta = load_stats_extra(path, STATS_META)
    _check_meta(meta, protocol, features, path)
    record = {"path": str(path), "sha256": sha256_file(path)}
    if "num_samples" in meta:
        record["num_samples"] = int(meta["num_samples"])
    want = want_kid or cfg.precision_recall
    feats = load_stats_extra(path, ("kid_features",)).get("kid_features") if want else None
    _need_features(cfg, feats, path)
    return mu, sigma, record, feats


def _need_features(cfg, feats, path) -> None:
    if cfg.precision_recall and feats is None:
        raise UserError(
            f"--precision-recall needs the features of the reference, but {path} holds only "
            "mu/sigma: make it with `dmdctl eval-fid --make-ref ... -o REF.npz` (it keeps up to "
            "--kid-max-features features)"
        )


def _check_meta(meta: dict, protocol: str | None, features: str | None, path: Path) -> None:
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


def _versions(extra: tuple[str, ...] = ()) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("dmdctl", "torch", "numpy", "scipy", *extra):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _version_pkgs(ext: Extractor | None, procs: Processes) -> tuple[str, ...]:
    pkgs: tuple[str, ...] = ()
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


def _kid_result(cfg, feats, ref_feats, standardise: bool = False) -> dict:
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


def _save_stats(cfg, stats: FeatureStats, feats, ext: Extractor) -> dict:
    extra = {
        "num_samples": np.array(stats.n),
        "features": np.array(_features_id(ext.name)),
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


# ---------------------------------------------------------------- entry points


def evaluate(
    cfg: EvalFidConfig, source=None, show_progress: bool = True, multiprocess: bool = False
) -> dict:
    """Score what ``cfg`` names (or ``source``) and return the result (also written to cfg.json).

    ``multiprocess=True`` (the CLI): under torchrun / accelerate launch every process must call
    this, each scores its share and the statistics are summed across processes. The default
    scores everything in this process alone, e.g. when only the main process of a training run
    evaluates.
    """
    # cfg.offline needs no action: nothing in eval-fid downloads (the Inception weights must be
    # local, torch-fidelity's own download is disabled); the flag is accepted for scripts
    if cfg.stats:
        return compare_stats(cfg)
    procs = Processes(cpu=cfg.device == "cpu", join=multiprocess)
    if cfg.images or cfg.make_ref:
        return _score_images(cfg, procs, show_progress)
    return _score_source(cfg, source, procs, show_progress)


def _device(cfg, procs: Processes) -> torch.device:
    if procs.world > 1 and cfg.device == "auto":
        return procs.state.device
    return pick_device(cfg.device)


def _score_source(cfg: EvalFidConfig, source, procs: Processes, show_progress: bool) -> dict:
    source = source or source_from(cfg)
    kind, tconfig = source.kind, source.config
    if kind.text_to_image:
        raise UserError(
            "text-to-image generators are scored from their images: `dmdctl sample --generator "
            "G --prompts captions.txt --out imgs`, then `dmdctl eval-fid --images imgs/images "
            "--features inception --protocol clean --ref REF.npz` (the COCO-30k protocol)"
        )
    use_inception = cfg.features == "inception" or (cfg.features == "auto" and not kind.builtin)
    if use_inception:
        from dmdctl.metrics.inception import FEATURE_DIM

        if len(source.sample_shape) != 3:
            raise UserError(
                f"Inception features need images; {kind.name} samples have shape "
                f"{source.sample_shape} (use --features native)"
            )
        _check_sample_count(cfg.num_samples, FEATURE_DIM, "samples")
    want_kid = cfg.kid or cfg.precision_recall
    builtin_ref = None
    if cfg.ref:
        from dmdctl.metrics.inception import FEATURE_NAME

        expected = (
            (cfg.protocol, FEATURE_NAME) if use_inception else ("native", kind.feature_name())
        )
        mu_ref, sigma_ref, reference, ref_feats = _load_reference(cfg, *expected, want_kid)
    elif use_inception:
        raise UserError(
            "Inception features need reference statistics: pass --ref STATS.npz "
            "(e.g. EDM's fid-refs/imagenet-64x64.npz, or one made with --make-ref)"
        )
    else:
        from dmdctl.metrics.quality import training_reference

        # built-in teachers: their own training data (dmdctl.metrics.quality), features and moments
        builtin_ref = training_reference(kind, tconfig)
        ref = (
            (builtin_ref.mu, builtin_ref.sigma, builtin_ref.description)
            if builtin_ref is not None
            else kind.reference_stats(tconfig)
        )
        if ref is None:
            raise UserError(
                f"teacher '{kind.name}' has no built-in reference; pass --ref STATS.npz"
            )
        mu_ref, sigma_ref, desc = ref
        reference, ref_feats = {"builtin": desc}, None
        if builtin_ref is not None:
            reference["features_of"] = builtin_ref.feature_description
            reference["num_samples"] = int(len(builtin_ref.features))
            ref_feats = builtin_ref.features
        _need_features(cfg, ref_feats, f"the built-in reference of '{kind.name}'")
    device = _device(cfg, procs)
    ext = _inception(cfg, device, procs) if use_inception else _native(kind)
    keep_features = want_kid and (ref_feats is not None or cfg.out is not None)

    source.to(device)
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_samples))
    labels = class_labels(seeds, cfg.seed, source.num_classes)
    # quality metrics of the built-in kinds need the samples: they are small (2-d points, 28x28)
    keep_all = kind.builtin
    kept: list[tuple[np.ndarray, torch.Tensor]] = []
    acc = Accumulator(keep_features, cfg.kid_max_features, procs)
    t0 = time.perf_counter()
    with progress(transient=True, disable=None if (show_progress and procs.main) else True) as bar:
        task = bar.add_task(f"eval {source.description}", total=cfg.num_samples, info="")
        for b, lo in enumerate(range(0, cfg.num_samples, cfg.batch_size)):
            if not procs.mine(b):
                continue
            hi = min(lo + cfg.batch_size, cfg.num_samples)
            idx = np.arange(lo, hi)
            x, _ = generate(source, seeds[lo:hi], cfg.batch_size, labels[lo:hi], device=device)
            acc.update(ext.fn(x), idx)
            if keep_all or lo < 100:
                kept.append((idx, x if keep_all else x[: max(0, 100 - lo)]))
            bar.advance(task, x.shape[0] * procs.world)
    gen_seconds = time.perf_counter() - t0
    stats, feats = acc.reduce(ext.dim)
    if stats.dim != mu_ref.shape[0]:
        raise UserError(
            f"reference has {mu_ref.shape[0]}-d statistics but features are {stats.dim}-d"
        )
    _check_sample_count(stats.n, stats.dim, "samples")
    if use_inception and stats.n < COMPARABLE_SAMPLES:
        _warn(
            procs,
            f"FID on {stats.n} samples is not comparable to 50k-sample FIDs (FID is biased upwards at small N)",
        )
    result = {
        "fid": frechet_distance(stats.mu, stats.sigma, mu_ref, sigma_ref),
        "num_samples": stats.n,
        "reference": reference,
        "features": ext.name,
        "protocol": ext.protocol,
        "source": source.description,
        "nfe": source.nfe,
        "seed_start": cfg.seed,
        "seconds": round(gen_seconds, 2),
    }
    if want_kid and ref_feats is not None:
        result.update(_kid_result(cfg, feats, ref_feats, standardise=builtin_ref is not None))
    if ext.weights:
        result["inception_weights"] = ext.weights
    if procs.world > 1:
        result["num_processes"] = procs.world
    result["versions"] = _versions(_version_pkgs(ext, procs))

    parts = procs.gather(kept) if procs.world > 1 else [kept]
    pieces = sorted((p for part in parts for p in part), key=lambda p: int(p[0][0]))
    samples = torch.cat([p[1] for p in pieces]) if pieces else None
    if keep_all and samples is not None:
        result.update(kind.quality_metrics(tconfig, samples, labels))
    if cfg.grid and procs.main and samples is not None:
        result["grid"] = str(
            kind.save_plot(
                [(source.description, samples[:100])], Path(cfg.grid), tconfig, labels=labels[:100]
            )
        )
    if procs.main:
        if cfg.out:
            result["stats_out"] = _save_stats(cfg, stats, feats, ext)
        write_json(cfg, result)
    return result


def _score_images(cfg: EvalFidConfig, procs: Processes, show_progress: bool) -> dict:
    from dmdctl.metrics.inception import FEATURE_DIM

    images = ImageInput(cfg.make_ref or cfg.images)
    _check_sample_count(images.count, FEATURE_DIM, "images")
    ref_feats = None
    if cfg.images:
        from dmdctl.metrics.inception import FEATURE_NAME

        mu_ref, sigma_ref, reference, ref_feats = _load_reference(
            cfg, cfg.protocol, FEATURE_NAME, cfg.kid
        )
    device = _device(cfg, procs)
    ext = _inception(cfg, device, procs)
    want = cfg.kid or cfg.precision_recall
    keep_features = want and (ref_feats is not None or cfg.out is not None)
    acc = Accumulator(keep_features, cfg.kid_max_features, procs)
    t0 = time.perf_counter()
    with progress(transient=True, disable=None if (show_progress and procs.main) else True) as bar:
        task = bar.add_task(f"features of {images.description}", total=images.count, info="")
        for idx, batch in images.batches(cfg.inception_batch, procs):
            acc.update(ext.inception.from_uint8(batch), idx)
            bar.advance(task, len(idx) * procs.world)
    seconds = time.perf_counter() - t0
    stats, feats = acc.reduce(ext.dim)
    _check_sample_count(stats.n, stats.dim, "images")
    result: dict = {}
    if cfg.images:
        if stats.dim != mu_ref.shape[0]:
            raise UserError(
                f"reference has {mu_ref.shape[0]}-d statistics but features are {stats.dim}-d"
            )
        if stats.n < COMPARABLE_SAMPLES:
            _warn(
                procs,
                f"FID on {stats.n} images is not comparable to 50k-sample FIDs (FID is biased upwards at small N)",
            )
        result["fid"] = frechet_distance(stats.mu, stats.sigma, mu_ref, sigma_ref)
        result["num_samples"] = stats.n
        result["reference"] = reference
        result.update(_kid_result(cfg, feats, ref_feats))
    else:
        result["num_samples"] = stats.n
    result.update(
        {
            "features": ext.name,
            "protocol": ext.protocol,
            "source": images.description,
            "seconds": round(seconds, 2),
            "inception_weights": ext.weights,
        }
    )
    if procs.world > 1:
        result["num_processes"] = procs.world
    result["versions"] = _versions(_version_pkgs(ext, procs))
    if procs.main:
        if cfg.out:
            result["stats_out"] = _save_stats(cfg, stats, feats, ext)
        write_json(cfg, result)
    return result


def compare_stats(cfg: EvalFidConfig) -> dict:
    """``--stats A.npz --ref B.npz``: the distance between two statistics files."""
    a, b = Path(cfg.stats), Path(cfg.ref)
    mu1, sigma1 = load_stats_npz(a)
    mu2, sigma2 = load_stats_npz(b)
    meta_a = load_stats_extra(a, STATS_META)
    meta_b = load_stats_extra(b, STATS_META)
    _check_meta(meta_b, meta_a.get("protocol"), meta_a.get("features"), b)
    if mu1.shape != mu2.shape:
        raise UserError(f"{a} has {mu1.shape[0]}-d statistics but {b} has {mu2.shape[0]}-d")
    dim = mu1.shape[0]
    n = int(meta_a["num_samples"]) if "num_samples" in meta_a else None
    if n is not None:
        _check_sample_count(n, dim, f"samples (in {a})")
        features = str(meta_a.get("features") or meta_b.get("features") or "")
        if (dim == 2048 or features.startswith("inception")) and n < COMPARABLE_SAMPLES:
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
    result = {
        "fid": frechet_distance(mu1, sigma1, mu2, sigma2),
        "num_samples": n,
        "reference": reference,
        "stats": {"path": str(a), "sha256": sha256_file(a)},
        "features": meta_a.get("features") or meta_b.get("features") or unknown,
        "protocol": protocol,
    }
    if cfg.kid or cfg.precision_recall:
        fa = load_stats_extra(a, ("kid_features",)).get("kid_features")
        fb = load_stats_extra(b, ("kid_features",)).get("kid_features")
        _need_features(cfg, fa, a)
        _need_features(cfg, fb, b)
        result.update(_kid_result(cfg, fa, fb))
    result["versions"] = _versions()
    write_json(cfg, result)
    return result


def result_rows(result: dict) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    if "fid" in result:
        rows.append(("FID", result["fid"]))
    if result.get("kid") is not None:
        rows.append(("KID", f"{result['kid']:.5g} ± {result['kid_std']:.2g}"))
    if "kid_interval" in result:
        lo, hi = result["kid_interval"]
        rows.append(
            ("KID (all features), 95% interval", f"{result['kid_all']:.5g} [{lo:.3g}, {hi:.3g}]")
        )
    if "clip_score" in result:
        rows.append(("CLIP score", f"{result['clip_score']:.4f} ± {result['clip_score_std']:.3f}"))
    for key in ("precision", "recall", "density", "coverage"):
        if key in result:
            iv = result.get(f"{key}_interval")
            rows.append(
                (key, f"{result[key]:.4f}" + (f" [{iv[0]:.4f}, {iv[1]:.4f}]" if iv else ""))
            )
    rows.append(("samples", result.get("num_samples")))
    ref = result.get("reference")
    if ref:
        rows.append(("reference", ref.get("path") or ref.get("builtin")))
    rows.append(("features", result["features"]))
    proto = result.get("protocol")
    if isinstance(proto, dict) and proto.get("name") not in (None, "native"):
        rows.append(("protocol", proto["name"]))
    for key, label in (("source", "source"), ("nfe", "NFE")):
        if key in result:
            rows.append((label, result[key]))
    if "stats_out" in result:
        rows.append(("statistics", result["stats_out"]["path"]))
    rows += [
        (k, v)
        for k, v in result.items()
        if k in ("modes_covered", "frac_within_3std", "class_accuracy")
    ]
    return rows
