"""SD1.5-shaped DMD: training-step time and peak memory, and one-step vs 50-step sampling latency.

Builds a Stable Diffusion pipeline with SD1.5's real network shapes and random weights (860M-
parameter UNet, 64x64 latents = 512 px images), writes it with diffusers' ``save_pretrained``,
loads it back through dmdctl's ``--teacher sd15`` path and runs real ``DMDTrainer`` steps
(generator, frozen real UNet with CFG, fake UNet with TTUR) in bf16 autocast with fp32 master
weights, with and without gradient checkpointing. Then it times the 50-step PNDM + CFG 7.5
pipeline against the exported one-step pipeline (LCMScheduler, 1 step) on the same weights.
Random weights make the timings and memory those of the real model; the images are noise.

    python -m benchmarks.sd_step                # GPU: the SD1.5 shape
    python -m benchmarks.sd_step --size tiny    # CPU smoke test (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DMDCTL_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from .common import append_markdown, machine  # noqa: E402


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def train_rows(folder: Path, prompts: Path, args, device) -> list[dict]:
    from dmdctl.distill import DistillConfig, DMDTrainer
    from dmdctl.make_pairs import MakePairsConfig, make_pairs

    # a few real pairs so the regression loss runs too (latent L2; the pairs' content is noise)
    pairs = folder.parent / "pairs"
    make_pairs(
        MakePairsConfig(
            teacher="sd15",
            teacher_path=str(folder),
            out=str(pairs),
            num_pairs=max(args.batch_sizes),
            shard_size=max(args.batch_sizes),
            batch_size=max(args.batch_sizes),
            steps=2,
            prompts=str(prompts),
            device=str(device),
        )
    )
    rows = []
    for batch, ckpt in [(b, c) for b in args.batch_sizes for c in args.checkpointing]:
        import gc

        from accelerate import Accelerator

        cfg = DistillConfig(
            teacher="sd15",
            teacher_path=str(folder),
            pairs=str(pairs),
            out=str(folder.parent / f"run-{batch}-{ckpt}"),
            batch_size=batch,
            pair_batch_size=batch,
            fake_updates=args.fake_updates,
            mixed_precision=args.precision,
            grad_checkpointing=ckpt,
            warmup=0,
            lr=1e-5,
            fake_lr=1e-5,
            cpu=torch.device(device).type == "cpu",
        )
        cfg.validate()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)
        trainer = None
        try:
            trainer = DMDTrainer(cfg, acc)
            for _ in range(args.warmup):
                trainer.train_step()
            _sync(device)
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                logs = trainer.train_step()
                _sync(device)
                times.append(time.perf_counter() - t0)
        except torch.OutOfMemoryError:
            rows.append({"grad_checkpointing": ckpt, "batch_per_gpu": batch, "oom": True})
            print(json.dumps(rows[-1]), flush=True)
            del trainer, acc
            gc.collect()
            continue
        finite = all(torch.isfinite(v).all().item() for v in logs.values())
        peak = (
            torch.cuda.max_memory_allocated() / 2**30
            if torch.device(device).type == "cuda"
            else float("nan")
        )
        med = statistics.median(times)
        rows.append(
            {
                "grad_checkpointing": ckpt,
                "batch_per_gpu": batch,
                "fake_updates": args.fake_updates,
                "precision": args.precision,
                "step_s": med,
                "steps_per_s": 1 / med,
                "images_per_s": batch / med,
                "peak_gib": peak,
                "finite": finite,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del trainer, acc, logs
        gc.collect()
    return rows


def latency_rows(folder: Path, args, device) -> list[dict]:
    """Teacher 50 steps PNDM + CFG against the same UNet as a one-step LCMScheduler pipeline."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[args.precision]
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    teacher_sched = pipe.scheduler
    one_sched = LCMScheduler.from_config(pipe.scheduler.config)

    def teacher():
        pipe.scheduler = teacher_sched
        pipe("a photo of a cat", num_inference_steps=args.teacher_steps, guidance_scale=7.5)

    def one_step():
        pipe.scheduler = one_sched
        pipe("a photo of a cat", num_inference_steps=1, guidance_scale=0)

    fns = {"teacher": teacher, "one_step": one_step}
    for f in fns.values():  # warm-up
        f()
    times = {k: [] for k in fns}
    for _ in range(args.latency_reps):
        for k, f in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {
        "teacher_ms": med["teacher"] * 1e3,
        "one_step_ms": med["one_step"] * 1e3,
        "speedup": med["teacher"] / med["one_step"],
        "nfe_ratio": 2 * args.teacher_steps,
        "teacher_steps": args.teacher_steps,
        "precision": args.precision,
    }
    print(json.dumps(row), flush=True)
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["sd15", "tiny"], default="sd15")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8], help="per GPU")
    ap.add_argument("--fake-updates", type=int, default=1)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    ap.add_argument(
        "--checkpointing",
        nargs="+",
        type=lambda s: s == "on",
        default=[False, True],
        help="on/off values to measure (default: off on)",
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--teacher-steps", type=int, default=50)
    ap.add_argument("--latency-reps", type=int, default=3)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--record", action="store_true", help="append the tables to BENCHMARKS.md")
    args = ap.parse_args()
    from dmdctl.sd.testing import build_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = build_pipeline(Path(tmp) / "pipe", size=args.size)
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("a photo of a cat\na red dog on the grass\nthe blue sky\n")
        print(
            f"built and saved a random {args.size} pipeline in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        train = train_rows(folder, prompts, args, args.device)
        latency = [] if args.skip_latency else latency_rows(folder, args, args.device)
    body = [
        f"SD shape `{args.size}` (random weights), device {args.device}, {args.precision} autocast, "
        "fp32 master weights for the generator and the fake score, frozen real UNet in the "
        "compute dtype, real-score CFG 1.75, latent L2 regression.",
        "",
        "| grad checkpointing | batch/GPU | fake updates | step (s) | images/s | peak memory (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in train:
        if r.get("oom"):
            body.append(
                f"| {'on' if r['grad_checkpointing'] else 'off'} | {r['batch_per_gpu']} | "
                f"{args.fake_updates} | out of memory | | |"
            )
            continue
        body.append(
            f"| {'on' if r['grad_checkpointing'] else 'off'} | {r['batch_per_gpu']} | "
            f"{r['fake_updates']} | {r['step_s']:.3f} | {r['images_per_s']:.1f} | {r['peak_gib']:.1f} |"
        )
    for r in latency:
        body += [
            "",
            "| sampler | latency per image, batch 1 (ms) | speed-up | NFE ratio |",
            "|---|---|---|---|",
            f"| teacher PNDM {r['teacher_steps']} steps + CFG 7.5 | {r['teacher_ms']:.0f} | 1.0 | 1 |",
            f"| one step (LCMScheduler, t=999) | {r['one_step_ms']:.0f} | {r['speedup']:.1f}x | {r['nfe_ratio']} |",
        ]
    text = "\n".join(body)
    print(text)
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(), "train": train, "latency": latency}, indent=1)
        )
    if args.record:
        append_markdown("SD1.5-shaped DMD step and sampling latency", text, "benchmarks.sd_step")


if __name__ == "__main__":
    main()
