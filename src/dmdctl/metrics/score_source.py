"""eval-fid of a source of samples: a generator file or run (``--generator``) or the teacher's
sampler (``--teacher-path``), sampled with balanced class labels, scored with the kind's own
features against its built-in reference, or with Inception features against ``--ref``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dmdctl.core.sampling import class_labels
from dmdctl.errors import UserError
from dmdctl.generators import generate, source_from
from dmdctl.metrics import collect
from dmdctl.metrics.fid import (
    frechet_distance,
)
from dmdctl.runtime import Processes
from dmdctl.settings.eval_fid import EvalFidConfig
from dmdctl.ui import progress


def refuse_video(kind) -> None:
    """eval-fid scores images (and built-in kinds' samples); a video kind is refused plainly."""
    if kind.video:
        raise UserError(
            f"{kind.name} samples are videos and dmdctl has no video metric (no FVD): eval-fid "
            "scores images only; `dmdctl sample --generator G --prompts P --out vids` writes "
            "the videos (mp4 and PNG strips) to look at"
        )


def score_source(cfg: EvalFidConfig, source, procs: Processes, show_progress: bool) -> dict:
    source = source or source_from(cfg)
    kind, tconfig = source.kind, source.config
    refuse_video(kind)
    if kind.text_to_image:
        raise UserError(
            "text-to-image generators are scored from their images: `dmdctl sample --generator "
            "G --prompts captions.txt --out imgs`, then `dmdctl eval-fid --images imgs/images "
            "--features inception --protocol clean --ref REF.npz` (the COCO-30k protocol)"
        )
    use_dino = cfg.features == "dinov2"
    use_inception = (
        use_dino or cfg.features == "inception" or (cfg.features == "auto" and not kind.builtin)
    )  # image features: Inception, or DINOv2 (FD-DINOv2)
    ext = None
    if use_inception:
        from dmdctl.metrics.inception import FEATURE_DIM

        if len(source.sample_shape) != 3:
            raise UserError(
                f"Inception features need images; {kind.name} samples have shape "
                f"{source.sample_shape} (use --features native)"
            )
        if use_dino:
            ext = collect.image_extractor(cfg, collect.device_of(cfg, procs), procs)
        collect.check_sample_count(cfg.num_samples, ext.dim if ext else FEATURE_DIM, "samples")
    want_kid = cfg.kid or cfg.precision_recall
    builtin_ref = None
    if cfg.ref:
        from dmdctl.metrics.inception import FEATURE_NAME

        expected = (
            (cfg.protocol, FEATURE_NAME) if use_inception else ("native", kind.feature_name())
        )
        if ext is not None:
            expected = (ext.protocol["name"], collect.features_id(ext.name))
        mu_ref, sigma_ref, reference, ref_feats = collect.load_reference(cfg, *expected, want_kid)
    elif use_inception:
        raise UserError(
            f"{'DINOv2' if use_dino else 'Inception'} features need reference statistics: pass "
            "--ref STATS.npz (e.g. EDM's fid-refs/imagenet-64x64.npz, or one made with "
            "--make-ref" + (" --features dinov2)" if use_dino else ")")
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
        collect.need_features(cfg, ref_feats, f"the built-in reference of '{kind.name}'")
    device = collect.device_of(cfg, procs)
    if ext is None:
        ext = (
            collect.inception_extractor(cfg, device, procs)
            if use_inception
            else collect.native_extractor(kind)
        )
    keep_features = want_kid and (ref_feats is not None or cfg.out is not None)

    source.to(device)
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_samples))
    labels = class_labels(seeds, cfg.seed, source.num_classes)
    # quality metrics of the built-in kinds need the samples: they are small (2-d points, 28x28)
    keep_all = kind.builtin
    kept: list[tuple[np.ndarray, torch.Tensor]] = []
    acc = collect.Accumulator(keep_features, cfg.kid_max_features, procs)
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
    collect.check_sample_count(stats.n, stats.dim, "samples")
    name = "FD-DINOv2" if ext.metric == "fd_dinov2" else "FID"
    if use_inception and stats.n < collect.COMPARABLE_SAMPLES:
        collect.warn(
            procs,
            f"{name} on {stats.n} samples is not comparable to 50k-sample {name}s ({name} is biased upwards at small N)",
        )
    result = {
        ext.metric: frechet_distance(stats.mu, stats.sigma, mu_ref, sigma_ref),
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
        result.update(
            collect.kid_result(cfg, feats, ref_feats, standardise=builtin_ref is not None)
        )
    if ext.weights:
        result["dinov2_weights" if ext.dinov2 is not None else "inception_weights"] = ext.weights
    if procs.world > 1:
        result["num_processes"] = procs.world
    result["versions"] = collect.versions(collect.version_pkgs(ext, procs))

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
            result["stats_out"] = collect.save_stats(cfg, stats, feats, ext)
        collect.write_json(cfg, result)
    return result
