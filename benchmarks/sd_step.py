"""SD1.5-shaped DMD: training-step time, model FLOPs utilisation and peak memory, and one-step vs
50-step sampling latency.

Builds a Stable Diffusion pipeline with SD1.5's real network shapes and random weights (860M-
parameter UNet, 64x64 latents = 512 px images), writes it with diffusers' ``save_pretrained``,
loads it back through dmdctl's SD path and runs real ``DMDTrainer`` steps with a preset's own
settings (``--recipe sd15``: DMD2's, 10 fake-score updates per generator step, no regression;
``sd15-dmd``: DMD's LPIPS regression on pairs), with and without gradient checkpointing, and with
speed levers side by side (``--levers``: SDPA backends, channels-last, regional torch.compile).
MFU = the step's FLOPs (counted once with torch's FLOP counter at the real shapes) / step time /
the device's dense bf16 peak (a table of known GPUs; the device name is printed). On CUDA the
host-device syncs of one step are counted. Then it times the 50-step PNDM + CFG 7.5 pipeline
against the exported one-step pipeline (LCMScheduler, 1 step) on the same weights. Random
weights make the timings and memory those of the real model; the images are noise.

    python -m benchmarks.sd_step --batch-sizes 8 32 --levers base sdpa-flash channels-last compile
    python -m benchmarks.sd_step --size tiny --device cpu --skip-latency   # CPU smoke test

``--size sdxl`` builds SDXL base's shapes instead (2.6B-parameter UNet, 128x128 latents = 1024 px,
both text encoders) and times the training step only, with ``--recipe sdxl`` (DMD2's SDXL 4-step
recipe: 5 fake-score updates, the GAN on random captioned images) or ``sdxl-1step``; the sampling
and make-pairs rows are SD1.5's (StableDiffusionPipeline) and are skipped for SDXL shapes.
``--size sd3-medium`` (with ``--recipe sd3``) builds SD3 medium's 2B transformer, CLIP encoders
and VAE, without T5 (as --no-t5: its tokens are zeros of the same shape). Its few prompts are
cached (--prompt-cache auto), so no text encoder runs in the timed step; ``--prompt-cache off``
times the step of a run on a large prompt set, which encodes its prompts in the step.
``--lora-ranks 0 64`` measures full fine-tuning and a rank-64 LoRA generator side by side:

    python -m benchmarks.sd_step --size sdxl --recipe sdxl --batch-sizes 1 2 4 \
        --checkpointing off on --lora-ranks 0 64 --json sdxl.json

``--size flux-dev`` (with ``--recipe flux-dev``: 4 flow steps with backward simulation, 4 fake
updates, the GAN at 0.03 on random captioned images, the guidance input 3.5) builds FLUX.1-dev's
11.9B-parameter transformer (19 double- and 38 single-stream blocks, width 3072), CLIP ViT-L and
VAE at 1024 px (4096 image tokens, 512 T5 tokens); T5-XXL is a one-layer encoder of its width
(the step on cached prompts never runs it; ``--prompt-cache off`` then under-counts T5's cost).
The transformer is written in bf16 (24 GB of disk) and loaded in fp32 (48 GB of host memory per
copy). Full fine-tuning of FLUX.1-dev does not fit one GPU (the generator's and the fake score's
fp32 weights, gradients and AdamW moments are 16 bytes a parameter each, about 380 GB); on one
GPU measure LoRA on both networks (``--lora-ranks 64 --fake-lora-rank 64``), or a slice of the
model's depth with ``--flux-blocks D S`` (D double- and S single-stream blocks at the real
width), full and LoRA, to read the per-block cost:

    python -m benchmarks.sd_step --size flux-dev --recipe flux-dev --batch-sizes 1 \
        --checkpointing off on --lora-ranks 64 --fake-lora-rank 64 --json flux.json
    python -m benchmarks.sd_step --size flux-dev --recipe flux-dev --flux-blocks 2 4 \
        --batch-sizes 1 --checkpointing off on --lora-ranks 0 64 --json flux-slice.json

None of the FLUX.1-dev-sized rows has been run: this machine has no GPU. ``--size tiny-flux``
runs the same code at tiny size on a CPU (tests/test_benchmarks.py).
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


# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets; the device
# name printed by torch is matched by the longest key it contains. Unknown devices get no MFU.
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 NVL": 835.5,
    "H100 PCIe": 756.5,
    "H100": 756.5,
    "GH200": 989.4,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.1,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
    "RTX 6000 Ada": 364.2,
}

# the levers measured side by side (each a fresh trainer, same recipe and shapes)
LEVERS = ("base", "sdpa-flash", "sdpa-efficient", "sdpa-math", "channels-last", "compile")


def peak_tflops(device) -> tuple[str, float | None]:
    if torch.device(device).type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(torch.device(device))
    keys = [k for k in PEAK_BF16_TFLOPS if k in name]
    return name, (PEAK_BF16_TFLOPS[max(keys, key=len)] if keys else None)


def step_flops(trainer) -> float:
    """FLOPs of one training step's network passes at the real shapes (torch's FLOP counter:
    matmuls and convolutions, forward and backward), counted once."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step()
    return float(counter.get_total_flops())


def lever_settings(lever: str) -> dict:
    """A lever as the distill options a user would pass (what is measured is what they get)."""
    if lever.startswith("sdpa-"):
        return {"sdpa_backend": lever.removeprefix("sdpa-")}
    return {"channels-last": {"channels_last": True}, "compile": {"compile": True}}.get(lever, {})


def recipe_config(
    folder: Path,
    prompts: Path,
    pairs: Path | None,
    args,
    batch: int,
    ckpt: bool,
    lever: str,
    lora_rank: int = 0,
):
    """The preset's own settings (docs/RECIPES.md), with the benchmark's shapes on top."""
    from dmdctl.settings.distill import DistillConfig

    values = DistillConfig.preset_layer({"teacher": args.recipe})
    values.update(
        teacher=args.recipe,
        teacher_path=str(folder),
        prompts=str(prompts),
        pairs=str(pairs) if pairs else None,
        out=str(folder.parent / f"run-{batch}-{ckpt}-{lora_rank}"),
        batch_size=batch,
        pair_batch_size=batch,
        mixed_precision=args.precision,
        grad_checkpointing=ckpt,
        warmup=0,
        lpips_random_backbone=True,  # no download here; the random VGG costs what the real one does
        cpu=torch.device(args.device).type == "cpu",
        prompt_cache=args.prompt_cache,
        **lever_settings(lever),
    )
    if args.fake_updates:
        values["fake_updates"] = args.fake_updates
    if args.fake_lora_rank:  # LoRA adapters on the fake score too (FLUX.1-dev on one GPU)
        values["fake_lora_rank"] = args.fake_lora_rank
    if lora_rank:  # LoRA adapters on the generator (the recipe's alpha, or alpha = rank)
        values["lora_rank"] = lora_rank
    else:
        values.pop("lora_rank", None)
        values.pop("lora_alpha", None)
    if args.reg_loss:
        values["reg_loss"] = args.reg_loss
    if args.denoising_steps:
        values["denoising_steps"] = args.denoising_steps
    if values.get("gan_weight", 0) > 0:
        values["real_data"] = str(real_store(folder.parent / "real", folder, max(8, batch)))
    return DistillConfig(**values)


def real_images(where: Path, folder: Path, n: int) -> Path:
    """``n`` random images at the pipeline's resolution with captions: the GAN's real data (the
    benchmark times the step; what the images show does not matter)."""
    import numpy as np
    from PIL import Image

    if (where / "captions.jsonl").is_file():
        return where
    where.mkdir(parents=True, exist_ok=True)
    from dmdctl.teachers.sd.pipeline import sd_config

    side = int(sd_config(folder, str(folder))["resolution"])
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
            where / f"{i}.png"
        )
        rows.append(json.dumps({"file": f"{i}.png", "caption": f"a photo number {i}"}))
    (where / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return where


def real_store(where: Path, folder: Path, n: int) -> Path:
    """The images of :func:`real_images` made into the store ``distill --real-data`` reads."""
    from dmdctl.commands.prepare_real import prepare_real
    from dmdctl.settings.prepare_real import PrepareRealConfig

    store = where.with_name(where.name + "-store")
    if not (store / "manifest.json").is_file():
        images = real_images(where, folder, n)
        prepare_real(
            PrepareRealConfig(source=str(images), teacher_path=str(folder), out=str(store))
        )
    return store


def train_rows(folder: Path, prompts: Path, args, device) -> list[dict]:
    import gc

    from accelerate import Accelerator

    from dmdctl.commands.make_pairs import make_pairs
    from dmdctl.settings.distill import DistillConfig
    from dmdctl.settings.make_pairs import MakePairsConfig
    from dmdctl.training.trainer import DMDTrainer, _forget_other_precision

    pairs = None
    if DistillConfig.preset_layer({"teacher": args.recipe}).get("reg_weight", 0) > 0:
        # pairs at the recipe's guidance (make-pairs' default for it); their content is noise
        pairs = folder.parent / "pairs"
        make_pairs(
            MakePairsConfig(
                teacher=args.recipe,
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
    gpu_name, peak = peak_tflops(device)
    print(f"device: {gpu_name}; dense bf16 peak: {peak or 'unknown'} TFLOP/s", flush=True)
    rows = []
    cases = [
        (b, c, lv, r)
        for r in args.lora_ranks
        for b in args.batch_sizes
        for c in args.checkpointing
        for lv in args.levers
    ]
    for batch, ckpt, lever, rank in cases:
        cfg = recipe_config(folder, prompts, pairs, args, batch, ckpt, lever, rank)
        cfg.validate()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        _forget_other_precision(cfg.mixed_precision)  # an earlier run in this process
        acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)
        trainer = None
        row = {"lever": lever, "grad_checkpointing": ckpt, "batch_per_gpu": batch, "lora": rank,
               "fake_lora": args.fake_lora_rank}  # fmt: skip
        try:
            trainer = DMDTrainer(cfg, acc)
            t0 = time.perf_counter()
            trainer.train_step()  # the first step pays for compilation, if any
            _sync(device)
            row["first_step_s"] = time.perf_counter() - t0
            for _ in range(max(0, args.warmup - 1)):
                trainer.train_step()
            flops = step_flops(trainer) if lever == "base" or args.count_all else None
            _sync(device)
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                logs = trainer.train_step()
                _sync(device)
                times.append(time.perf_counter() - t0)
            syncs = None
            if torch.device(device).type == "cuda" and lever == "base":
                from .train_step import host_syncs

                syncs = len(host_syncs(trainer.train_step))
        except torch.OutOfMemoryError:
            rows.append(dict(row, oom=True))
            print(json.dumps(rows[-1]), flush=True)
            del trainer, acc
            gc.collect()
            continue
        if flops is None:  # the levers change kernels, not the arithmetic: the base row's count
            flops = next((r["flops"] for r in rows if r.get("flops") and r["batch_per_gpu"] == batch
                          and r["grad_checkpointing"] == ckpt and r["lora"] == rank), None)  # fmt: skip
        finite = all(torch.isfinite(v).all().item() for v in logs.values())
        peak_mem = (
            torch.cuda.max_memory_allocated() / 2**30
            if torch.device(device).type == "cuda"
            else float("nan")
        )
        med = statistics.median(times)
        achieved = flops / med / 1e12 if flops else None
        row.update(
            {
                "recipe": args.recipe,
                "fake_updates": cfg.fake_updates,
                "gan": cfg.gan_weight > 0,
                "generator_steps": len(trainer.sigmas),
                "precision": args.precision,
                "prompts": trainer.text_mode.split(", ", 1)[-1] if trainer.text_mode else "-",
                "step_s": med,
                "steps_per_s": 1 / med,
                "images_per_s": batch / med,
                "peak_gib": peak_mem,
                "flops": flops,
                "tflops_per_s": achieved,
                "mfu": achieved / peak if achieved and peak else None,
                "host_syncs": syncs,
                "finite": finite,
                "device": gpu_name,
            }
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
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

    med = _timed({"teacher": teacher, "one_step": one_step}, args.latency_reps, device)
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


def _timed(fns: dict, reps: int, device) -> dict[str, float]:
    """Median seconds of each function, interleaved A, B, A, B ... after one warm-up call each."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def sampling_lever(folder: Path, lever: str, args, device) -> tuple[dict, torch.Tensor]:
    """One sampling variant on a fresh pipeline: its timings and its image for seed 0."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from dmdctl.training.speed import compile_regions

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[args.precision]
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype).to(device)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    if lever == "channels-last":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if lever == "compile":
        compile_regions(pipe.unet)
        pipe.vae.decoder.compile()
    emb, _ = pipe.encode_prompt("a photo of a cat", device, 1, False)
    side = pipe.unet.config.sample_size
    latents = torch.randn((1, 4, side, side), generator=torch.Generator().manual_seed(0))
    latents = latents.to(device, dtype)

    def with_text(n=1):
        return pipe(["a photo of a cat"] * n, num_inference_steps=1, guidance_scale=0,
                    latents=latents.expand(n, -1, -1, -1), output_type="pt").images  # fmt: skip

    def without_text(n=1):
        return pipe(prompt_embeds=emb.expand(n, -1, -1), num_inference_steps=1, guidance_scale=0,
                    latents=latents.expand(n, -1, -1, -1), output_type="pt").images  # fmt: skip

    image = without_text().float()  # also the warm-up that compiles
    _sync(device)
    first = time.perf_counter() - t0
    med = _timed({"text": with_text, "no_text": without_text}, args.latency_reps, device)
    n = args.throughput_batch
    thr = _timed({"batch": lambda: without_text(n)}, max(1, args.latency_reps // 2), device)
    row = {
        "sampling_lever": lever,
        "ms_with_text_encoder": med["text"] * 1e3,
        "ms_without_text_encoder": med["no_text"] * 1e3,
        "images_per_s": n / thr["batch"],
        "throughput_batch": n,
        "setup_and_first_call_s": first,
    }
    return row, image


def sampling_rows(folder: Path, args, device) -> list[dict]:
    """One-step sampling of a 512 px image at batch 1 (text encoder included and excluded) and at
    batch ``--throughput-batch``, plain and with each sampling lever; every lever's image is
    compared with the plain pipeline's for the same noise."""
    rows, reference = [], None
    for lever in args.sampling_levers:
        row, image = sampling_lever(folder, lever, args, device)
        reference = image if reference is None else reference
        row["max_abs_diff_vs_plain"] = float((image - reference).abs().max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def pairs_rows(folder: Path, prompts: Path, args, device) -> list[dict]:
    """make-pairs for SD against the stock StableDiffusionPipeline producing the same latents
    (PNDM, the recipe's CFG, same noise, same batch), each timed from loading the pipeline to
    the last latent: pairs per second, and the ratio."""
    import shutil

    from diffusers import StableDiffusionPipeline

    from dmdctl.commands.make_pairs import make_pairs
    from dmdctl.data.pairs import load_pairs
    from dmdctl.settings.make_pairs import MakePairsConfig

    n, b = args.pairs_num, args.pairs_batch
    out = folder.parent / "pairs-bench"
    prompt_list = [x for x in prompts.read_text().splitlines() if x.strip()]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[args.precision]

    def ours():
        shutil.rmtree(out, ignore_errors=True)
        make_pairs(MakePairsConfig(teacher="sd15-dmd", teacher_path=str(folder), out=str(out),
                                   num_pairs=n, shard_size=n, batch_size=b, steps=args.pairs_steps,
                                   prompts=str(prompts), device=str(device)))  # fmt: skip

    ours()
    noise = load_pairs(out).noise  # the same noise for the stock pipeline
    guidance = float(json.loads((out / "manifest.json").read_text())["sampler"]["guidance"])

    def stock():  # loads the pipeline too, as make-pairs loads its teacher: like for like
        pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        for i in range(0, n, b):
            idx = list(range(i, min(n, i + b)))
            pipe([prompt_list[j % len(prompt_list)] for j in idx],
                 num_inference_steps=args.pairs_steps, guidance_scale=guidance,
                 latents=noise[idx].to(device, dtype), output_type="latent")  # fmt: skip

    med = _timed({"dmdctl": ours, "diffusers": stock}, max(1, args.latency_reps // 2), device)
    row = {
        "pairs": n,
        "batch": b,
        "steps": args.pairs_steps,
        "guidance": guidance,
        "dmdctl_pairs_per_s": n / med["dmdctl"],
        "diffusers_pairs_per_s": n / med["diffusers"],
        "ratio": med["diffusers"] / med["dmdctl"],
    }
    print(json.dumps(row), flush=True)
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--size",
        choices=[
            *("sd15", "tiny", "sdxl", "tiny-xl", "sd3-medium", "tiny-sd3", "flux-dev", "tiny-flux")
        ],
        default="sd15",
    )
    ap.add_argument(
        "--flux-blocks",
        type=int,
        nargs=2,
        default=None,
        metavar=("DOUBLE", "SINGLE"),
        help="--size flux-dev: this many double- and single-stream blocks instead of 19 and 38",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8], help="per GPU")
    ap.add_argument(
        "--recipe",
        default="sd15",
        choices=["sd15", "sd15-gan", "sd15-dmd", "sdxl", "sdxl-1step", "sd3", "flux-dev"],
        help="the preset whose settings the step uses (docs/RECIPES.md; sd15-gan, sdxl: with "
        "DMD2's GAN, on random captioned images); the SDXL recipes need an SDXL --size",
    )
    ap.add_argument(
        "--denoising-steps", default=None, help="a few-step generator, e.g. 999,749,499,249"
    )
    ap.add_argument("--fake-updates", type=int, default=0, help="0: the recipe's (sd15: 10)")
    ap.add_argument("--reg-loss", default=None, help="override the recipe's (sd15-dmd: lpips)")
    ap.add_argument(
        "--levers",
        nargs="+",
        default=["base"],
        choices=LEVERS,
        help="speed levers measured side by side, each on a fresh trainer",
    )
    ap.add_argument("--count-all", action="store_true", help="count FLOPs for every lever")
    ap.add_argument(
        "--lora-ranks",
        nargs="+",
        type=int,
        default=[0],
        help="generator LoRA ranks to measure side by side (0: full fine-tuning)",
    )
    ap.add_argument(
        "--fake-lora-rank",
        type=int,
        default=0,
        help="LoRA adapters of this rank on the fake score too, in every row (0: full)",
    )
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    ap.add_argument(
        "--prompt-cache",
        default="auto",
        choices=["auto", "on", "off"],
        help="off: the step encodes its prompts (what a run on a large prompt set does)",
    )
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
    ap.add_argument(
        "--sampling-levers",
        nargs="*",
        default=["plain"],
        choices=["plain", "channels-last", "compile"],
        help="one-step sampling variants (none: skip the sampling rows)",
    )
    ap.add_argument("--throughput-batch", type=int, default=64)
    ap.add_argument("--pairs-num", type=int, default=0, help="make-pairs rows (0: skip)")
    ap.add_argument("--pairs-batch", type=int, default=16)
    ap.add_argument("--pairs-steps", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--record", action="store_true", help="append the tables to BENCHMARKS.md")
    args = ap.parse_args()
    from dmdctl.teachers.sd.testing import (
        build_flux_pipeline,
        build_pipeline,
        build_sd3_pipeline,
        build_xl_pipeline,
    )

    arch = {"sdxl": "sdxl", "tiny-xl": "sdxl", "sd3-medium": "sd3", "tiny-sd3": "sd3"}
    arch.update({"flux-dev": "flux", "tiny-flux": "flux"})
    arch = arch.get(args.size, "sd")
    from dmdctl.teachers import get_kind

    if arch != get_kind("sd").preset_arch(args.recipe):
        ap.error(f"--recipe {args.recipe} does not fit --size {args.size}")
    xl = arch != "sd"
    if xl:  # the sampling and pairs rows compare against StableDiffusionPipeline
        args.skip_latency, args.sampling_levers, args.pairs_num = True, [], 0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if arch == "flux":
            size = "flux-dev" if args.size == "flux-dev" else "tiny"
            folder = build_flux_pipeline(Path(tmp) / "pipe", size=size, blocks=args.flux_blocks)
        elif arch == "sd3":
            size = "sd3-medium" if args.size == "sd3-medium" else "tiny"
            folder = build_sd3_pipeline(Path(tmp) / "pipe", size=size)
        elif xl:
            size = "sdxl" if args.size == "sdxl" else "tiny"
            folder = build_xl_pipeline(Path(tmp) / "pipe", size=size)
        else:
            folder = build_pipeline(Path(tmp) / "pipe", size=args.size)
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("a photo of a cat\na red dog on the grass\nthe blue sky\n")
        print(
            f"built and saved a random {args.size} pipeline in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        train = train_rows(folder, prompts, args, args.device)
        latency = [] if args.skip_latency else latency_rows(folder, args, args.device)
        sampling = sampling_rows(folder, args, args.device) if args.sampling_levers else []
        pairs = pairs_rows(folder, prompts, args, args.device) if args.pairs_num else []
    body = [
        f"SD shape `{args.size}` (random weights), device {args.device}, recipe `{args.recipe}` "
        f"(docs/RECIPES.md), {args.precision} autocast, fp32 master weights for the generator "
        "and the fake score, frozen real UNet's weights in the compute dtype. MFU: the step's "
        "FLOPs (torch's FLOP counter, at these shapes) / step time / the device's dense bf16 peak.",
        "",
        "| lever | generator | grad ckpt | batch/GPU | fake updates | step (s) | first step (s) "
        "| images/s | TFLOP/s | MFU | host syncs | peak memory (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in train:
        what = f"LoRA {r['lora']}" if r["lora"] else "full"
        what += f", fake LoRA {r['fake_lora']}" if r.get("fake_lora") else ""
        lead = (
            f"| {r['lever']} | {what} | {'on' if r['grad_checkpointing'] else 'off'} "
            f"| {r['batch_per_gpu']} |"
        )
        if r.get("oom"):
            body.append(f"{lead} | out of memory | | | | | | |")
            continue
        tf = f"{r['tflops_per_s']:.3g}" if r["tflops_per_s"] else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        body.append(
            f"{lead} {r['fake_updates']} | {r['step_s']:.3f} | {r['first_step_s']:.2f} | "
            f"{r['images_per_s']:.1f} | {tf} | {mfu} | {r['host_syncs'] if r['host_syncs'] is not None else '-'} | "
            f"{r['peak_gib']:.1f} |"
        )
    for r in latency:
        body += [
            "",
            "| sampler | latency per image, batch 1 (ms) | speed-up | NFE ratio |",
            "|---|---|---|---|",
            f"| teacher PNDM {r['teacher_steps']} steps + CFG 7.5 | {r['teacher_ms']:.0f} | 1.0 | 1 |",
            f"| one step (LCMScheduler, t=999) | {r['one_step_ms']:.0f} | {r['speedup']:.1f}x | {r['nfe_ratio']} |",
        ]
    if sampling:
        body += [
            "",
            f"One-step sampling, 512 px at this shape, {args.precision}: batch 1 latency with and "
            f"without the text encoder, throughput at batch {args.throughput_batch}; images of "
            "each lever against the plain pipeline's for the same noise.",
            "",
            "| lever | ms, batch 1, with text encoder | ms, without | images/s | setup + first call (s) | max abs diff |",
            "|---|---|---|---|---|---|",
        ]
        for r in sampling:
            body.append(
                f"| {r['sampling_lever']} | {r['ms_with_text_encoder']:.1f} | "
                f"{r['ms_without_text_encoder']:.1f} | {r['images_per_s']:.1f} | "
                f"{r['setup_and_first_call_s']:.1f} | {r['max_abs_diff_vs_plain']:.2g} |"
            )
    for r in pairs:
        body += [
            "",
            f"make-pairs vs the stock StableDiffusionPipeline, same latents ({r['pairs']} pairs, "
            f"batch {r['batch']}, PNDM {r['steps']} steps, CFG {r['guidance']}):",
            "",
            "| dmdctl make-pairs (pairs/s) | diffusers pipeline (pairs/s) | ratio (>= 1: dmdctl not slower) |",
            "|---|---|---|",
            f"| {r['dmdctl_pairs_per_s']:.2f} | {r['diffusers_pairs_per_s']:.2f} | **{r['ratio']:.2f}** |",
        ]
    text = "\n".join(body)
    print(text)
    if args.json:
        rows = {"train": train, "latency": latency, "sampling": sampling, "pairs": pairs}
        args.json.write_text(json.dumps({"machine": machine(), **rows}, indent=1))
    if args.record:
        title = {
            "sdxl": "SDXL-shaped DMD2 step",
            "sd3": "SD3-medium-shaped DMD step",
            "flux": "FLUX.1-dev-shaped DMD2 step",
        }.get(arch, "SD1.5-shaped DMD step and sampling latency")
        append_markdown(title, text, "benchmarks.sd_step")


if __name__ == "__main__":
    main()
