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

One module per flow: :mod:`~dmdctl.metrics.score_source` (generators and teachers),
:mod:`~dmdctl.metrics.score_images` (image folders, ``--make-ref``),
:mod:`~dmdctl.metrics.compare_stats` (two statistics files); what they share (extractors,
references, statistics, KID, the JSON result) is :mod:`~dmdctl.metrics.collect`.
"""

from __future__ import annotations

from dmdctl.metrics.compare_stats import compare_stats
from dmdctl.metrics.score_images import score_images
from dmdctl.metrics.score_source import score_source
from dmdctl.runtime import Processes
from dmdctl.settings.eval_fid import EvalFidConfig


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
        return score_images(cfg, procs, show_progress)
    return score_source(cfg, source, procs, show_progress)


def result_rows(result: dict) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    if "fid" in result:
        rows.append(("FID", result["fid"]))
    if "fd_dinov2" in result:
        rows.append(("FD-DINOv2", result["fd_dinov2"]))
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
