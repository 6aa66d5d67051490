"""The training step of the Wan 2.1 T2V 1.3B recipe (``--teacher wan-t2v-1.3b``): seconds per
generator step and peak GPU memory, one JSON row per case.

    python -m benchmarks.wan_step --size wan-1.3b --video-size 81x480x832 --device cuda
    python -m benchmarks.wan_step --size tiny --video-size 5x32x32 --device cpu   # smoke test

``--size wan-1.3b`` builds Wan2.1-T2V-1.3B's transformer (30 blocks of width 1536, random
weights: nothing is downloaded) with the tiny pipeline's small UMT5 encoder and VAE at the
transformer's text width; the prompts are cached (--prompt-cache on), so a step never runs the
encoder, and the VAE runs only for plots, so neither is part of a step. Each step is the
recipe's: 3 generator steps with backward simulation, CFG 3.5 on the real score, 5 fake-score
updates, bf16 autocast, gradient checkpointing; --batch-sizes per process, --fsdp to shard the
generator and the fake score (with torchrun).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def step_rows(args) -> list[dict]:
    from accelerate import Accelerator

    from dmdctl.settings.distill import DistillConfig
    from dmdctl.teachers.wan.testing import build_wan_pipeline
    from dmdctl.training.trainer import DMDTrainer, _forget_other_precision

    root = Path(tempfile.mkdtemp(prefix="wan-step-"))
    folder = build_wan_pipeline(root / "pipe", size=args.size)
    prompts = root / "prompts.txt"
    prompts.write_text("".join(f"a video of scene number {i}\n" for i in range(16)))
    rows = []
    for batch in args.batch_sizes:
        values = DistillConfig.preset_layer({"teacher": "wan-t2v-1.3b"})
        values.update(
            teacher="wan-t2v-1.3b",
            teacher_path=str(folder),
            video_size=args.video_size,
            prompts=str(prompts),
            prompt_cache="on",
            out=str(root / f"run-{batch}"),
            batch_size=batch,
            mixed_precision=args.precision,
            grad_checkpointing=not args.no_checkpointing,
            fsdp=args.fsdp,
            plot_samples=0,
            cpu=torch.device(args.device).type == "cpu",
        )
        if args.fake_updates:
            values["fake_updates"] = args.fake_updates
        cfg = DistillConfig(**values)
        cfg.validate()
        _forget_other_precision(cfg.mixed_precision)
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        row = {"size": args.size, "video": args.video_size, "batch_per_process": batch}
        try:
            trainer = DMDTrainer(cfg, Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu))
            for _ in range(args.warmup):
                trainer.train_step()
            _sync(args.device)
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                logs = trainer.train_step()
                _sync(args.device)
                times.append(time.perf_counter() - t0)
        except torch.OutOfMemoryError:
            rows.append(dict(row, oom=True))
            print(json.dumps(rows[-1]), flush=True)
            continue
        cuda = torch.device(args.device).type == "cuda"
        row.update(
            latent=list(trainer.teacher.sample_shape),
            params=sum(p.numel() for p in trainer.teacher.denoiser.parameters()),
            generator_steps=len(trainer.sigmas),
            fake_updates=cfg.fake_updates,
            precision=cfg.mixed_precision,
            fsdp=cfg.fsdp,
            step_s=statistics.median(times),
            peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            finite=all(torch.isfinite(v).all().item() for v in logs.values()),
            device=torch.cuda.get_device_name() if cuda else "cpu",
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
        del trainer
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="wan-1.3b", choices=["wan-1.3b", "tiny"])
    ap.add_argument("--video-size", default="81x480x832", help="FRAMESxHEIGHTxWIDTH")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="per process")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    ap.add_argument("--fake-updates", type=int, default=0, help="0: the recipe's 5")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    return step_rows(args)


if __name__ == "__main__":
    main()
