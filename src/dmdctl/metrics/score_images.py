"""eval-fid of images: a folder scored with Inception features under a protocol (``--images``), or
reference statistics of a folder or an ADM-style npz (``--make-ref``)."""

from __future__ import annotations

import time

from dmdctl.errors import UserError
from dmdctl.metrics import collect
from dmdctl.metrics.fid import (
    frechet_distance,
)
from dmdctl.metrics.images import ImageInput
from dmdctl.runtime import Processes
from dmdctl.settings.eval_fid import EvalFidConfig
from dmdctl.ui import progress


def score_images(cfg: EvalFidConfig, procs: Processes, show_progress: bool) -> dict:
    from dmdctl.metrics.inception import FEATURE_DIM

    images = ImageInput(cfg.make_ref or cfg.images)
    if cfg.features != "dinov2":  # before the weights are looked for
        collect.check_sample_count(images.count, FEATURE_DIM, "images")
    device = collect.device_of(cfg, procs)
    # Inception (FID), or with --features dinov2 the local DINOv2 network (FD-DINOv2)
    ext = collect.image_extractor(cfg, device, procs)
    collect.check_sample_count(images.count, ext.dim or FEATURE_DIM, "images")
    ref_feats = None
    if cfg.images:
        from dmdctl.metrics.inception import FEATURE_NAME

        expected = (cfg.protocol, FEATURE_NAME)
        if ext.dinov2 is not None:
            expected = (ext.protocol["name"], collect.features_id(ext.name))
        mu_ref, sigma_ref, reference, ref_feats = collect.load_reference(cfg, *expected, cfg.kid)
    want = cfg.kid or cfg.precision_recall
    keep_features = want and (ref_feats is not None or cfg.out is not None)
    acc = collect.Accumulator(keep_features, cfg.kid_max_features, procs)
    t0 = time.perf_counter()
    with progress(transient=True, disable=None if (show_progress and procs.main) else True) as bar:
        task = bar.add_task(f"features of {images.description}", total=images.count, info="")
        for idx, batch in images.batches(cfg.inception_batch, procs):
            acc.update(ext.from_uint8(batch), idx)
            bar.advance(task, len(idx) * procs.world)
    seconds = time.perf_counter() - t0
    stats, feats = acc.reduce(ext.dim)
    collect.check_sample_count(stats.n, stats.dim, "images")
    result: dict = {}
    if cfg.images:
        if stats.dim != mu_ref.shape[0]:
            raise UserError(
                f"reference has {mu_ref.shape[0]}-d statistics but features are {stats.dim}-d"
            )
        name = "FD-DINOv2" if ext.metric == "fd_dinov2" else "FID"
        if stats.n < collect.COMPARABLE_SAMPLES:
            collect.warn(
                procs,
                f"{name} on {stats.n} images is not comparable to 50k-sample {name}s ({name} is biased upwards at small N)",
            )
        result[ext.metric] = frechet_distance(stats.mu, stats.sigma, mu_ref, sigma_ref)
        result["num_samples"] = stats.n
        result["reference"] = reference
        result.update(collect.kid_result(cfg, feats, ref_feats))
    else:
        result["num_samples"] = stats.n
    result.update(
        {
            "features": ext.name,
            "protocol": ext.protocol,
            "source": images.description,
            "seconds": round(seconds, 2),
            "dinov2_weights" if ext.dinov2 is not None else "inception_weights": ext.weights,
        }
    )
    if procs.world > 1:
        result["num_processes"] = procs.world
    result["versions"] = collect.versions(collect.version_pkgs(ext, procs))
    if procs.main:
        if cfg.out:
            result["stats_out"] = collect.save_stats(cfg, stats, feats, ext)
        collect.write_json(cfg, result)
    return result
