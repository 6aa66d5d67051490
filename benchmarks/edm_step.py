"""How fast is a DMD training step on the full EDM ImageNet-64 teacher, and how much GPU memory does it take?

Builds the published ImageNet-64 ADM configuration (295,899,267 parameters; ``--small``: a tiny
ADM for a CPU smoke test) with RANDOM weights (the speed does not depend on them), writes it as
a teacher file in a temporary folder, and runs real ``DMDTrainer.train_step`` calls under
Accelerate's bf16 mixed precision, once with gradient checkpointing off and once on. Each row:
steps/s and samples/s (median over the timed steps after a warm-up step) and
``torch.cuda.max_memory_allocated`` over the row (generator, fake score, teacher, AdamW states,
EMA and activations). No regression loss (DMD2's ImageNet setting), so no pairs are needed.

    python -m benchmarks.edm_step --device cuda                 # full network, batch 32
    python -m benchmarks.edm_step --device cuda --batch 40 --fake-updates 5 --record
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.edm_step --device cpu --small   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DMDCTL_QUIET", "1")

import torch  # noqa: E402

from .common import add_common_args, finish, md_table, say, setup  # noqa: E402

SMALL = {
    "architecture": "DhariwalUNet",
    "img_resolution": 16,
    "img_channels": 3,
    "label_dim": 10,
    "model_kwargs": {
        "model_channels": 32,
        "channel_mult": [1, 2],
        "num_blocks": 1,
        "attn_resolutions": [8],
        "dropout": 0.0,
    },
    "sigma_data": 0.5,
    "sigma_min": 0.002,
    "sigma_max": 80.0,
}


def teacher_config(small: bool) -> dict:
    from dmdctl.teachers import KINDS

    if small:
        return dict(SMALL)
    cfg = dict(KINDS["edm"].presets()["edm-imagenet64"])
    cfg.pop("recipe")
    return cfg


def write_teacher(config: dict, folder: Path) -> tuple[Path, int]:
    from dmdctl.teachers import KINDS, save_teacher

    torch.manual_seed(0)
    denoiser = KINDS["edm"].build(config)
    n = sum(p.numel() for p in denoiser.parameters())
    path = save_teacher(denoiser, KINDS["edm"], config, folder / "edm-teacher.safetensors")
    del denoiser
    return path, n


def run_row(acc, teacher: Path, args, checkpointing: bool, folder: Path) -> dict:
    import dataclasses

    # the lead's `distill --grad-checkpointing` flag, where this version of DistillConfig has it
    from dmdctl.settings.distill import DistillConfig
    from dmdctl.training.trainer import DMDTrainer, enable_checkpointing

    # the lead's `distill --grad-checkpointing` flag, where this version of DistillConfig has it
    has_flag = "grad_checkpointing" in {f.name for f in dataclasses.fields(DistillConfig)}
    flag = {"grad_checkpointing": checkpointing} if has_flag else {}
    cfg = DistillConfig(
        **flag,
        teacher="edm",
        teacher_path=str(teacher),
        out=str(folder / f"run-{int(checkpointing)}"),
        steps=10**6,
        batch_size=args.batch,
        pair_batch_size=args.batch,
        reg_weight=0.0,
        fake_updates=args.fake_updates,
        lr=2e-6,
        fake_lr=2e-6,
        warmup=0,
        mixed_precision="bf16",
        cpu=acc.device.type == "cpu",
    )
    device = acc.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = DMDTrainer(cfg, acc)
    if checkpointing and not has_flag:  # what `distill --grad-checkpointing` does
        enable_checkpointing(acc.unwrap_model(trainer.generator).denoiser)
        enable_checkpointing(acc.unwrap_model(trainer.fake))
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        logs = trainer.train_step()
        float(logs["loss_g"])  # waits for the step
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        say(
            f"checkpointing={'on' if checkpointing else 'off'} step {i + 1}: {time.perf_counter() - t0:.3f} s"
        )
    times.sort()
    t = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    loss = float(logs["loss_g"])
    del trainer, logs
    acc.free_memory()
    gc.collect()
    return {"checkpointing": checkpointing, "s_per_step": t, "peak_gib": peak, "loss": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, repeats=1)
    ap.add_argument("--small", action="store_true", help="a tiny ADM (CPU smoke test)")
    ap.add_argument(
        "--batch", type=int, default=None, help="generator batch (default 32; 4 with --small)"
    )
    ap.add_argument(
        "--fake-updates", type=int, default=1, help="fake-score updates per step (DMD2 ImageNet: 5)"
    )
    ap.add_argument(
        "--steps", type=int, default=None, help="timed steps per row (default 5; 2 with --small)"
    )
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    ap.add_argument(
        "--only", choices=("on", "off"), default=None, help="run one checkpointing setting only"
    )
    args = ap.parse_args()
    args.batch = args.batch or (4 if args.small else 32)
    args.steps = args.steps or (2 if args.small else 5)
    device = setup(args)

    from accelerate import Accelerator

    acc = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    config = teacher_config(args.small)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        teacher, n = write_teacher(config, folder)
        say(f"teacher with {n:,} parameters written in {time.perf_counter() - t0:.1f} s")
        settings = {"off": [False], "on": [True], None: [False, True]}[args.only]
        for ckpt in settings:
            try:
                rows.append(run_row(acc, teacher, args, ckpt, folder))
            except torch.OutOfMemoryError:
                acc.free_memory()
                gc.collect()
                rows.append({"checkpointing": ckpt, "oom": True})
                say(f"checkpointing={'on' if ckpt else 'off'}: out of memory")

    name = "EDM ImageNet-64 ADM" if not args.small else "tiny ADM (--small)"
    table = []
    for r in rows:
        ck = "on" if r["checkpointing"] else "off"
        if r.get("oom"):
            table.append([ck, "out of memory", "-", "-", "-"])
            continue
        peak = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "- (CPU)"
        table.append([ck, f"{1 / r['s_per_step']:.3f}", f"{args.batch / r['s_per_step']:.1f}", peak,
                      f"{r['loss']:.4g}"])  # fmt: skip
    body = (
        f"{name}, {n:,} parameters, random weights; DMD step (DM loss, no regression), "
        f"batch {args.batch}, {args.fake_updates} fake-score update(s) per step, bf16 (Accelerate), "
        f"median of {args.steps} timed steps after {args.warmup} warm-up step(s), device {device}.\n\n"
        + md_table(
            ["grad checkpointing", "steps/s", "samples/s", "max_memory_allocated", "loss_g"], table
        )
    )
    finish(args, "DMD step on an EDM teacher", body, "benchmarks.edm_step")


if __name__ == "__main__":
    main()
