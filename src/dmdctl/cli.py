"""The ``dmdctl`` command line: parse, build a config, call one library function, print a table.

Every option defaults to None here so that a value given on the command line can be told apart
from one left out: defaults live in the config dataclasses (shown in ``--help``), a ``--config``
TOML file overrides them, and flags override the file.
"""

from __future__ import annotations

import functools
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .config import default_help as _h
from .config import resolve
from .errors import UserError
from .ui import error_line, print_table, summary_table

app = typer.Typer(
    name="dmdctl",
    help="Distil a diffusion model into a one-step generator with Distribution Matching Distillation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML file with this command's settings; flags override it."),
]


def _versions() -> str:
    parts = [f"dmdctl {__version__}"]
    for pkg in ("torch", "diffusers", "accelerate"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} (not installed)")
    return "\n".join(parts)


def _version_callback(value: bool):
    if value:
        typer.echo(_versions())
        raise typer.Exit()


@app.callback()
def root(
    version_: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Print the versions of dmdctl, torch, diffusers and accelerate.",
        ),
    ] = False,
):
    threads = os.environ.get("DMDCTL_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def user_errors(fn):
    """A user mistake becomes one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if not getattr(e, "quiet", False):  # e.g. said once by the main process of a launch
                error_line(str(e))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            error_line("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _show(title: str, result: dict) -> None:
    print_table(
        summary_table(title, {k: v for k, v in result.items() if not isinstance(v, (dict, list))})
    )


# --- train-teacher -----------------------------------------------------------------------------
from .train_teacher import TrainTeacherConfig  # noqa: E402

TT = TrainTeacherConfig


@app.command("train-teacher")
@user_errors
def train_teacher_cmd(
    teacher: Annotated[
        str | None,
        typer.Argument(
            help=_h(TT, "teacher", "Built-in teacher preset: toy2d or toy2d-unbalanced.")
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help=_h(TT, "out", "Output folder (teacher.safetensors, config.toml).")),
    ] = None,
    steps: Annotated[int | None, typer.Option(help=_h(TT, "steps", "Training steps."))] = None,
    batch_size: Annotated[
        int | None, typer.Option(help=_h(TT, "batch_size", "Batch size."))
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help=_h(TT, "lr", "Peak learning rate (Adam, cosine decay)."))
    ] = None,
    ema_decay: Annotated[
        float | None, typer.Option(help=_h(TT, "ema_decay", "EMA decay of the saved weights."))
    ] = None,
    seed: Annotated[int | None, typer.Option(help=_h(TT, "seed", "Random seed."))] = None,
    report_to: ReportToOpt = None,
    config: ConfigOpt = None,
):
    """Train a built-in teacher (EDM denoiser) from its own data.

    Example: [bold]dmdctl train-teacher toy2d --out runs/teacher[/bold]
    """
    from .train_teacher import train_teacher

    cfg = resolve(
        TT,
        config,
        teacher=teacher,
        out=out,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        ema_decay=ema_decay,
        seed=seed,
        report_to=report_to,
    )
    _show("train-teacher", train_teacher(cfg))


# --- make-pairs --------------------------------------------------------------------------------
from .make_pairs import MakePairsConfig  # noqa: E402

MP = MakePairsConfig
TeacherOpt = Annotated[
    str | None, typer.Option(help="Teacher kind or preset (e.g. toy2d); checked against the file.")
]
TeacherPathOpt = Annotated[
    Path | None,
    typer.Option(
        help="Teacher weights: a dmdctl teacher .safetensors; for --teacher sd15 a diffusers "
        "pipeline folder or hub id \\[default for sd15: stable-diffusion-v1-5/stable-diffusion-v1-5]."
    ),
]
PromptsOpt = Annotated[
    Path | None,
    typer.Option(
        help="Text-to-image teachers: prompts file, one per line, or JSONL with a 'caption' field."
    ),
]
OfflineOpt = Annotated[
    bool | None,
    typer.Option(
        "--offline",
        help="Never touch the network (as HF_HUB_OFFLINE=1): hub ids must be in the local cache.",
    ),
]
ReportToOpt = Annotated[
    str | None,
    typer.Option(
        help="Also report to tensorboard (event files in OUT/trackers/) or wandb: the logged "
        "values (distill: log.jsonl's), distill's sample plots, the config \\[default: none]."
    ),
]
DeviceOpt = Annotated[
    str | None, typer.Option(help="Device: auto, cpu, cuda, cuda:1 … \\[default: auto]")
]


@app.command("make-pairs")
@user_errors
def make_pairs_cmd(
    teacher: TeacherOpt = None,
    teacher_path: TeacherPathOpt = None,
    out: Annotated[
        Path | None, typer.Option(help=_h(MP, "out", "Output folder for shards and manifest.json."))
    ] = None,
    num_pairs: Annotated[
        int | None, typer.Option(help=_h(MP, "num_pairs", "Number of noise→sample pairs."))
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help=_h(MP, "seed", "First seed; pair i uses seed+i."))
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(help=_h(MP, "steps", "Heun steps N of the teacher's sampler (NFE = 2N-1).")),
    ] = None,
    shard_size: Annotated[
        int | None, typer.Option(help=_h(MP, "shard_size", "Pairs per shard (the unit of resume)."))
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help=_h(MP, "batch_size", "Sampler batch size."))
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help=_h(MP, "dtype", "Storage dtype of the targets: float32, float16, bfloat16.")
        ),
    ] = None,
    prompts: PromptsOpt = None,
    scheduler: Annotated[
        str | None,
        typer.Option(help=_h(MP, "scheduler", "Text-to-image teachers: sampler, ddim or pndm.")),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(
            help="Text-to-image teachers: CFG scale (1: none) \\[default: the pairs recipe's, "
            "3.0 for Stable Diffusion: the DMD paper's, equal to its real score's guidance]."
        ),
    ] = None,
    save_images: Annotated[
        bool | None,
        typer.Option(
            "--save-images", help="Text-to-image teachers: also store the decoded images (uint8)."
        ),
    ] = None,
    offline: OfflineOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
):
    """Run the teacher's deterministic ODE sampler on seeded noise and store the pairs.

    --steps 0 (the default) uses the teacher's own default: 18 Heun steps (35 NFE) for the
    built-in teachers, 50 scheduler steps for Stable Diffusion. For --teacher sd15 the pairs are
    latents from the pipeline's scheduler with CFG; pair i uses prompt i mod the prompt count.

    Re-running the same command after an interruption (Ctrl-C, SIGTERM, a crash) makes only the
    missing shards. Several processes split the shards: [bold]accelerate launch --num_processes 8 -m dmdctl make-pairs ...[/bold]

    Example: [bold]dmdctl make-pairs --teacher-path runs/teacher/teacher.safetensors --num-pairs 4096 --out runs/pairs[/bold]
    """
    from accelerate import PartialState

    from .make_pairs import make_pairs

    cfg = resolve(
        MP,
        config,
        teacher=teacher,
        teacher_path=teacher_path,
        out=out,
        num_pairs=num_pairs,
        seed=seed,
        steps=steps,
        shard_size=shard_size,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        prompts=prompts,
        scheduler=scheduler,
        guidance=guidance,
        save_images=save_images,
        offline=offline,
    )
    result = make_pairs(cfg)
    main = PartialState().is_main_process  # the other processes of a launch print nothing
    if main:
        _show("make-pairs", result)
    if "interrupted" in result:
        if main:
            error_line(
                f"stopped by {result['interrupted']}: the complete shards are recorded in "
                f"{Path(cfg.out) / 'manifest.json'} and the unfinished one was dropped. "
                "Resume by running the same command again"
            )
        raise typer.Exit(130 if result["interrupted"] == "SIGINT" else 143)


# --- distill -----------------------------------------------------------------------------------
from .distill import DistillConfig  # noqa: E402

DC = DistillConfig


@app.command("distill")
@user_errors
def distill_cmd(
    teacher: TeacherOpt = None,
    teacher_path: TeacherPathOpt = None,
    pairs: Annotated[
        Path | None,
        typer.Option(help="Pairs folder from make-pairs (needed when --reg-weight > 0)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help=_h(DC, "out", "Run folder (config, log.jsonl, checkpoints, samples, generator).")
        ),
    ] = None,
    steps: Annotated[int | None, typer.Option(help=_h(DC, "steps", "Generator updates."))] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help=_h(DC, "batch_size", "Global generator batch for the DM loss.")),
    ] = None,
    pair_batch_size: Annotated[
        int | None,
        typer.Option(
            help=_h(DC, "pair_batch_size", "Global batch of pairs for the regression loss.")
        ),
    ] = None,
    num_pairs: Annotated[
        int | None, typer.Option(help=_h(DC, "num_pairs", "Use only the first N pairs (0: all)."))
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help=_h(DC, "lr", "Generator learning rate (AdamW)."))
    ] = None,
    fake_lr: Annotated[
        float | None, typer.Option(help=_h(DC, "fake_lr", "Fake-score learning rate (AdamW)."))
    ] = None,
    lr_schedule: Annotated[
        str | None,
        typer.Option(
            help=_h(
                DC,
                "lr_schedule",
                "cosine (to 0 at --steps) or constant, after the warm-up; both learning rates.",
            )
        ),
    ] = None,
    warmup: Annotated[
        int | None,
        typer.Option(
            help=_h(
                DC,
                "warmup",
                "Linear warm-up, in generator steps; the fake score follows the same multiplier "
                "(so its warm-up spans warmup x fake-updates updates).",
            )
        ),
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help=_h(DC, "weight_decay", "AdamW weight decay."))
    ] = None,
    grad_clip: Annotated[
        float | None, typer.Option(help=_h(DC, "grad_clip", "Gradient-norm clipping (0: off)."))
    ] = None,
    reg_loss: Annotated[
        str | None,
        typer.Option(
            help=_h(DC, "reg_loss", "Regression loss: l2, pseudo-huber, lpips (image teachers).")
        ),
    ] = None,
    reg_weight: Annotated[
        float | None,
        typer.Option(
            help=_h(
                DC, "reg_weight", "Weight of the regression loss (0: ablation without regression)."
            )
        ),
    ] = None,
    lpips_net: Annotated[
        str | None, typer.Option(help=_h(DC, "lpips_net", "LPIPS backbone: vgg, alex or squeeze."))
    ] = None,
    lpips_size: Annotated[
        int | None,
        typer.Option(help=_h(DC, "lpips_size", "Images are resized to this many pixels for LPIPS.")),
    ] = None,
    lpips_random_backbone: Annotated[
        bool | None,
        typer.Option(
            "--lpips-random-backbone",
            help="Run LPIPS with a random backbone when the pretrained one is not cached (tests only: it is not LPIPS).",
        ),
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option(
            help=_h(
                DC, "eval_every", "Score the EMA generator every N steps into log.jsonl (0: off)."
            )
        ),
    ] = None,
    eval_samples: Annotated[
        int | None,
        typer.Option(help=_h(DC, "eval_samples", "Samples per evaluation during training.")),
    ] = None,
    dm_weight: Annotated[
        float | None,
        typer.Option(
            help=_h(DC, "dm_weight", "Weight of the DM loss (0: ablation, regression only).")
        ),
    ] = None,
    real_only: Annotated[
        bool | None,
        typer.Option(
            "--real-only/--with-fake",
            help=_h(DC, "real_only", "Ablation: real score only, no fake score."),
        ),
    ] = None,
    fake_updates: Annotated[
        int | None,
        typer.Option(
            help=_h(DC, "fake_updates", "Fake-score updates per generator update (DMD2's TTUR).")
        ),
    ] = None,
    min_step_frac: Annotated[
        float | None,
        typer.Option(
            help=_h(
                DC,
                "min_step_frac",
                "Lowest noise-level index of the DM loss, as a fraction of the grid.",
            )
        ),
    ] = None,
    max_step_frac: Annotated[
        float | None,
        typer.Option(
            help=_h(DC, "max_step_frac", "Highest noise-level index of the DM loss, as a fraction.")
        ),
    ] = None,
    ema_decay: Annotated[
        float | None, typer.Option(help=_h(DC, "ema_decay", "EMA decay of the generator."))
    ] = None,
    mixed_precision: Annotated[
        str | None, typer.Option(help=_h(DC, "mixed_precision", "no, bf16 or fp16 (Accelerate)."))
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option(
            help=_h(DC, "checkpoint_every", "Checkpoint (and sample plot) every N steps.")
        ),
    ] = None,
    keep_checkpoints: Annotated[
        int | None,
        typer.Option(
            help=_h(DC, "keep_checkpoints", "Keep only the newest N checkpoints (0: all).")
        ),
    ] = None,
    log_every: Annotated[
        int | None, typer.Option(help=_h(DC, "log_every", "Log losses every N steps."))
    ] = None,
    plot_samples: Annotated[
        int | None,
        typer.Option(
            help=_h(DC, "plot_samples", "Samples in the plot written at each checkpoint (0: none).")
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help=_h(DC, "seed", "Random seed."))] = None,
    resume: Annotated[
        str | None, typer.Option(help="Continue a run: 'latest' or a checkpoint folder.")
    ] = None,
    cpu: Annotated[
        bool | None, typer.Option("--cpu", help="Train on the CPU even if a GPU is present.")
    ] = None,
    skip_nonfinite: Annotated[
        bool | None,
        typer.Option(
            "--skip-nonfinite",
            help="Skip updates whose loss or gradient is NaN/inf (counted in log.jsonl) instead of stopping the run.",
        ),
    ] = None,
    grad_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--grad-checkpointing",
            help="Recompute activations in the backward pass of the generator and fake score (less memory, ~30% slower).",
        ),
    ] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(
            help=_h(DC, "optimizer", "adamw, or adamw8bit (bitsandbytes, CUDA) to save memory.")
        ),
    ] = None,
    sdpa_backend: Annotated[
        str | None,
        typer.Option(
            help=_h(
                DC,
                "sdpa_backend",
                "Attention kernel of the UNets: auto, flash, efficient, cudnn or math.",
            )
        ),
    ] = None,
    channels_last: Annotated[
        bool | None,
        typer.Option("--channels-last", help="Convolutions in channels-last memory layout."),
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile",
            help="torch.compile each repeated block of the networks (regional compilation: "
            "compiles once per block type; the first steps are slower).",
        ),
    ] = None,
    prompts: PromptsOpt = None,
    real_guidance: Annotated[
        float | None,
        typer.Option(
            help="Text-to-image teachers: CFG scale of the real score (the empty prompt is the "
            "unconditional branch; the fake score has none) \\[default: the preset's: 1.75 "
            "for sd15, 3.0 for sd15-dmd]."
        ),
    ] = None,
    allow_guidance_mismatch: Annotated[
        bool | None,
        typer.Option(
            "--allow-guidance-mismatch",
            help="Train on pairs made with another CFG scale than the real score's (refused "
            "by default: the two losses would pull toward different distributions).",
        ),
    ] = None,
    offline: OfflineOpt = None,
    report_to: ReportToOpt = None,
    config: ConfigOpt = None,
):
    """Train a one-step generator with the DMD loss plus the regression loss on the pairs.

    The defaults shown are the built-in teachers' (ours). A preset brings the recipe it names,
    with every value's source in docs/RECIPES.md: --teacher sd15 is DMD2's SD1.5 recipe (no
    pairs: --prompts only), sd15-dmd the DMD paper's (LPIPS regression on pairs made at the real
    score's guidance), edm-imagenet64 DMD2's, edm-cifar10 DMD's. Flags and --config override them.

    Example: [bold]dmdctl distill --teacher-path runs/teacher/teacher.safetensors --pairs runs/pairs --out runs/dmd[/bold]

    Multi-GPU: [bold]accelerate launch --num_processes 8 -m dmdctl distill ...[/bold] (the batch
    sizes are global; SIGTERM saves a checkpoint and exits 143; resume with --resume latest).
    """
    from accelerate import PartialState

    from .distill import distill, preset_defaults

    cfg = resolve(
        DC,
        config,
        preset_defaults=preset_defaults,
        teacher=teacher,
        teacher_path=teacher_path,
        pairs=pairs,
        out=out,
        steps=steps,
        batch_size=batch_size,
        pair_batch_size=pair_batch_size,
        num_pairs=num_pairs,
        lr=lr,
        fake_lr=fake_lr,
        lr_schedule=lr_schedule,
        warmup=warmup,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        reg_loss=reg_loss,
        reg_weight=reg_weight,
        lpips_net=lpips_net,
        lpips_size=lpips_size,
        lpips_random_backbone=lpips_random_backbone,
        eval_every=eval_every,
        eval_samples=eval_samples,
        dm_weight=dm_weight,
        real_only=real_only,
        fake_updates=fake_updates,
        min_step_frac=min_step_frac,
        max_step_frac=max_step_frac,
        ema_decay=ema_decay,
        mixed_precision=mixed_precision,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        log_every=log_every,
        plot_samples=plot_samples,
        seed=seed,
        resume=resume,
        cpu=cpu,
        skip_nonfinite=skip_nonfinite,
        grad_checkpointing=grad_checkpointing,
        optimizer=optimizer,
        sdpa_backend=sdpa_backend,
        channels_last=channels_last,
        compile=compile,
        prompts=prompts,
        real_guidance=real_guidance,
        allow_guidance_mismatch=allow_guidance_mismatch,
        offline=offline,
        report_to=report_to,
    )
    result = distill(cfg)
    main = PartialState().is_main_process  # the other processes of a launch print nothing
    if main:
        _show("distill", result)
    if "interrupted" in result:
        if main:
            error_line(
                f"stopped by {result['interrupted']} at step {result['step']}; checkpoint saved "
                f"in {Path(cfg.out) / 'checkpoints'}. Resume with the same command plus --resume latest"
            )
        raise typer.Exit(130 if result["interrupted"] == "SIGINT" else 143)


# --- eval-fid ----------------------------------------------------------------------------------
from .eval_fid import EvalFidConfig  # noqa: E402

EF = EvalFidConfig
GeneratorOpt = Annotated[
    Path | None, typer.Option(help="Generator file (export) or distill run folder.")
]


@app.command("eval-fid")
@user_errors
def eval_fid_cmd(
    generator: GeneratorOpt = None,
    teacher: TeacherOpt = None,
    teacher_path: TeacherPathOpt = None,
    steps: Annotated[
        int | None,
        typer.Option(
            help=_h(
                EF, "steps", "Heun steps when scoring the teacher's sampler (1 = one Euler step)."
            )
        ),
    ] = None,
    num_samples: Annotated[
        int | None, typer.Option(help=_h(EF, "num_samples", "Samples to score."))
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help=_h(EF, "seed", "First seed of the scored samples."))
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help=_h(EF, "batch_size", "Generation batch size."))
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            help="Score a folder of images (searched recursively) instead of a generator."
        ),
    ] = None,
    make_ref: Annotated[
        Path | None,
        typer.Option(
            "--make-ref",
            help="Make reference statistics of a folder of images or an ADM-style npz (arr_0, NHWC uint8); needs -o.",
        ),
    ] = None,
    stats: Annotated[
        Path | None,
        typer.Option(help="Statistics npz to compare with --ref (no features are computed)."),
    ] = None,
    ref: Annotated[
        Path | None,
        typer.Option(
            help="Reference statistics npz (mu, sigma); default: the teacher's built-in reference."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Write the statistics (mu, sigma, KID features) of what was scored here.",
        ),
    ] = None,
    features: Annotated[
        str | None,
        typer.Option(
            help=_h(
                EF,
                "features",
                "auto (a built-in teacher's own features; Inception for images), native, or inception.",
            )
        ),
    ] = None,
    protocol: Annotated[
        str | None,
        typer.Option(
            help=_h(
                EF,
                "protocol",
                "How images reach Inception: edm (EDM/ADM, TF1 bilinear) or clean (COCO-30k: crop, LANCZOS 256, clean-fid resize).",
            )
        ),
    ] = None,
    inception_weights: Annotated[
        Path | None,
        typer.Option(
            help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: looked for in $TORCH_HOME/hub/checkpoints/)."
        ),
    ] = None,
    inception_sha256: Annotated[
        str | None,
        typer.Option(
            help="Accept Inception weights with this sha256 instead of the official file's (results are then not comparable)."
        ),
    ] = None,
    inception_batch: Annotated[
        int | None,
        typer.Option(help=_h(EF, "inception_batch", "Images per Inception forward pass.")),
    ] = None,
    offline: Annotated[
        bool | None,
        typer.Option(
            "--offline",
            help="Never download (eval-fid never does: Inception weights must be local).",
        ),
    ] = None,
    kid: Annotated[
        bool | None,
        typer.Option(
            "--kid/--no-kid",
            help=_h(
                EF,
                "kid",
                "Also report KID (± std over subsets) when the reference holds features (built-in "
                "teachers' training data, or --ref made by --make-ref).",
            ),
        ),
    ] = None,
    kid_subsets: Annotated[
        int | None, typer.Option(help=_h(EF, "kid_subsets", "KID: number of random subsets."))
    ] = None,
    kid_subset_size: Annotated[
        int | None,
        typer.Option(
            help=_h(EF, "kid_subset_size", "KID: subset size (capped at the smaller set).")
        ),
    ] = None,
    kid_max_features: Annotated[
        int | None,
        typer.Option(
            help=_h(
                EF, "kid_max_features", "KID: features kept per side (uniform reservoir sample)."
            )
        ),
    ] = None,
    precision_recall: Annotated[
        bool | None,
        typer.Option(
            "--precision-recall/--no-precision-recall",
            help=_h(
                EF,
                "precision_recall",
                "Also report precision, recall (k-NN manifolds), density and coverage against the "
                "reference's features (any feature set; --ref files made by --make-ref).",
            ),
        ),
    ] = None,
    pr_k: Annotated[
        int | None,
        typer.Option(help=_h(EF, "pr_k", "Precision/recall: k of the k-nearest-neighbour balls.")),
    ] = None,
    bootstrap: Annotated[
        int | None,
        typer.Option(
            help=_h(
                EF,
                "bootstrap",
                "Rounds of a bootstrap over samples for 95% intervals of KID and precision/recall "
                "(0: none).",
            )
        ),
    ] = None,
    grid: Annotated[
        Path | None, typer.Option(help="Also save a PNG grid of the first 100 scored samples here.")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the result as JSON here.")
    ] = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
):
    """Fréchet distance (and KID) of a generator, the teacher's sampler or images to reference statistics.

    Example: [bold]dmdctl eval-fid --generator runs/dmd/generator.safetensors --json fid.json[/bold]

    ImageNet 64 (EDM protocol): [bold]dmdctl eval-fid --generator gen.safetensors --features inception --ref imagenet-64x64.npz --num-samples 50000[/bold]

    References: [bold]dmdctl eval-fid --make-ref val2014/ --protocol clean -o coco.npz[/bold];
    two statistics files: [bold]dmdctl eval-fid --stats a.npz --ref b.npz[/bold].
    Built-in teachers are scored against their own training data; KID, precision and recall with
    95% intervals: [bold]dmdctl eval-fid --generator gen.safetensors --precision-recall --bootstrap 200[/bold].
    Multi-GPU: [bold]accelerate launch -m dmdctl eval-fid ...[/bold] (each process scores its share).
    """
    from .eval_fid import evaluate, result_rows

    cfg = resolve(
        EF,
        config,
        generator=generator,
        teacher=teacher,
        teacher_path=teacher_path,
        steps=steps,
        num_samples=num_samples,
        seed=seed,
        batch_size=batch_size,
        images=images,
        make_ref=make_ref,
        stats=stats,
        ref=ref,
        out=out,
        features=features,
        protocol=protocol,
        inception_weights=inception_weights,
        inception_sha256=inception_sha256,
        inception_batch=inception_batch,
        offline=offline,
        kid=kid,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        kid_max_features=kid_max_features,
        precision_recall=precision_recall,
        pr_k=pr_k,
        bootstrap=bootstrap,
        json=json_out,
        grid=grid,
        device=device,
    )
    result = evaluate(cfg, multiprocess=True)
    if int(os.environ.get("RANK", "0")) == 0:
        print_table(summary_table("eval-fid", result_rows(result)))


# --- sample ------------------------------------------------------------------------------------
from .sample import SampleConfig  # noqa: E402

SC = SampleConfig


@app.command("sample")
@user_errors
def sample_cmd(
    generator: GeneratorOpt = None,
    teacher: TeacherOpt = None,
    teacher_path: TeacherPathOpt = None,
    steps: Annotated[
        int | None, typer.Option(help=_h(SC, "steps", "Heun steps when sampling the teacher."))
    ] = None,
    num: Annotated[int | None, typer.Option(help=_h(SC, "num", "Number of samples."))] = None,
    seed: Annotated[
        int | None, typer.Option(help=_h(SC, "seed", "First seed; sample i uses seed+i."))
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help=_h(SC, "batch_size", "Batch size."))
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help=_h(SC, "out", "Output folder (samples.safetensors, samples.png).")),
    ] = None,
    class_label: Annotated[
        int | None,
        typer.Option("--class", help="Sample only this class (class-conditional teachers)."),
    ] = None,
    plot: Annotated[
        bool | None,
        typer.Option("--plot/--no-plot", help=_h(SC, "plot", "Write a PNG of the samples.")),
    ] = None,
    prompt: Annotated[
        str | None, typer.Option(help="Text-to-image generators: one prompt for every image.")
    ] = None,
    prompts: PromptsOpt = None,
    offline: OfflineOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
):
    """Draw samples from a generator or from the teacher's sampler.

    Example: [bold]dmdctl sample --generator runs/dmd/generator.safetensors --num 2000 --out samples[/bold]

    Text-to-image: [bold]dmdctl sample --generator runs/sd/generator.safetensors --prompts prompts.txt --out imgs[/bold]
    writes imgs/images/NNNNN.png (image i: prompt i, seed --seed+i) and imgs/images.jsonl.
    """
    from .sample import sample

    cfg = resolve(
        SC,
        config,
        generator=generator,
        teacher=teacher,
        teacher_path=teacher_path,
        steps=steps,
        num=num,
        seed=seed,
        batch_size=batch_size,
        out=out,
        plot=plot,
        class_label=class_label,
        device=device,
        prompt=prompt,
        prompts=prompts,
        offline=offline,
    )
    result = sample(cfg)
    if result:  # the other processes of a launch print nothing
        _show("sample", result)


# --- export ------------------------------------------------------------------------------------
from .export import ExportConfig  # noqa: E402

EX = ExportConfig


@app.command("export")
@user_errors
def export_cmd(
    source: Annotated[
        Path | None,
        typer.Argument(help="Distill run folder, checkpoint folder, or generator file."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help=_h(EX, "out", "Output file."))
    ] = None,
    ema: Annotated[
        bool | None, typer.Option("--ema/--no-ema", help=_h(EX, "ema", "Export the EMA weights."))
    ] = None,
    format_: Annotated[
        str | None,
        typer.Option(
            "--format",
            help=_h(
                EX,
                "format",
                "safetensors (one file), or diffusers (Stable Diffusion: a pipeline folder).",
            ),
        ),
    ] = None,
    teacher_path: Annotated[
        Path | None,
        typer.Option(
            help="--format diffusers: the teacher pipeline (folder or hub id) to take the VAE, "
            "text encoder and tokenizer from \\[default: the one the generator records]."
        ),
    ] = None,
    offline: OfflineOpt = None,
    config: ConfigOpt = None,
):
    """Export the distilled generator as one safetensors file (config in its metadata).

    Example: [bold]dmdctl export runs/dmd -o generator.safetensors[/bold]

    Stable Diffusion: [bold]dmdctl export runs/sd --format diffusers -o sd-dmd[/bold] writes a folder
    that runs as StableDiffusionPipeline.from_pretrained("sd-dmd")(prompt, num_inference_steps=1,
    guidance_scale=0).
    """
    from .export import export

    cfg = resolve(
        EX,
        config,
        source=source,
        out=out,
        ema=ema,
        format=format_,
        teacher_path=teacher_path,
        offline=offline,
    )
    _show("export", export(cfg))


# --- convert-edm -------------------------------------------------------------------------------
from .edm.convert import ConvertEdmConfig  # noqa: E402

CE = ConvertEdmConfig


@app.command("convert-edm")
@user_errors
def convert_edm_cmd(
    source: Annotated[
        Path | None,
        typer.Argument(help="NVlabs EDM network pickle, e.g. edm-imagenet-64x64-cond-adm.pkl."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help=_h(CE, "out", "Teacher file to write."))
    ] = None,
    entry: Annotated[
        str | None, typer.Option(help=_h(CE, "entry", "Which network of the pickle to convert."))
    ] = None,
    config: ConfigOpt = None,
):
    """Convert an NVlabs EDM checkpoint into a dmdctl teacher (safetensors), without running its code.

    The pickle is read as data by a restricted unpickler: its embedded Python source is never
    executed, and anything outside the EDM network format is refused.

    Example: [bold]dmdctl convert-edm edm-imagenet-64x64-cond-adm.pkl -o teacher.safetensors[/bold]
    """
    from .edm.convert import convert_edm

    cfg = resolve(CE, config, source=source, out=out, entry=entry)
    _show("convert-edm", convert_edm(cfg))


# --- clip-score --------------------------------------------------------------------------------
from .clip_eval import ClipScoreConfig  # noqa: E402

CS = ClipScoreConfig


@app.command("clip-score")
@user_errors
def clip_score_cmd(
    images: Annotated[
        Path | None, typer.Option(help="Folder of images to score (searched recursively).")
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            help="The images.jsonl `dmdctl sample --prompts` wrote (each image with its prompt), "
            "or one prompt per line for the folder's images in sorted order."
        ),
    ] = None,
    clip_model: Annotated[
        str | None,
        typer.Option(
            help="A transformers CLIPModel folder or hub id, with its processor (e.g. "
            "laion/CLIP-ViT-g-14-laion2B-s12B-b42K, the OpenCLIP model GigaGAN and DMD2 use)."
        ),
    ] = None,
    prefix: Annotated[
        str | None,
        typer.Option(
            help=_h(
                CS, "prefix", 'Text put before every prompt (GigaGAN/DMD2: "A photo depicts ").'
            )
        ),
    ] = None,
    resize: Annotated[
        int | None,
        typer.Option(
            help=_h(CS, "resize", "Centre-crop and LANCZOS-resize to this size first (0: none).")
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help=_h(CS, "batch_size", "Batch size."))
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the result as JSON here.")
    ] = None,
    device: DeviceOpt = None,
    offline: OfflineOpt = None,
    config: ConfigOpt = None,
):
    """CLIP score (mean image-prompt cosine similarity) of a folder of images.

    Example: [bold]dmdctl sample --generator sd-gen.safetensors --prompts captions.txt --out imgs &&
    dmdctl clip-score --images imgs/images --prompts imgs/images.jsonl --clip-model CLIP_DIR[/bold]
    """
    from .clip_eval import clip_score_folder

    cfg = resolve(
        CS,
        config,
        images=images,
        prompts=prompts,
        clip_model=clip_model,
        prefix=prefix,
        resize=resize,
        batch_size=batch_size,
        json=json_out,
        device=device,
        offline=offline,
    )
    _show("clip-score", clip_score_folder(cfg))


# --- demo --------------------------------------------------------------------------------------
from .demo import DemoConfig  # noqa: E402

DM = DemoConfig


@app.command("demo")
@user_errors
def demo_cmd(
    teacher: Annotated[
        str | None,
        typer.Argument(
            help=_h(
                DM,
                "teacher",
                "Which demo: digits (8x8 images, about 5 min) or toy2d (2-D points, about 2 min).",
            )
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help=_h(DM, "out", "Output folder."))] = None,
    distill_steps: Annotated[
        int | None,
        typer.Option(help="Steps of each distillation run \\[default: 2000 toy2d, 400 digits]"),
    ] = None,
    num_pairs: Annotated[
        int | None, typer.Option(help="Regression pairs \\[default: 128 toy2d, 1000 digits]")
    ] = None,
    teacher_steps: Annotated[
        int | None,
        typer.Option(
            help="Teacher training steps; 0 uses the shipped teacher \\[default: 8000 toy2d, 0 digits]"
        ),
    ] = None,
    eval_samples: Annotated[
        int | None,
        typer.Option(help="Samples per evaluation \\[default: 10000 toy2d, 1000 digits]"),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Learning rate of the generator and the fake score \\[default: 1e-3 toy2d, 2e-5 digits]"
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help=_h(DM, "seed", "Random seed."))] = None,
    config: ConfigOpt = None,
):
    """The whole method end to end in minutes on a CPU: teacher → pairs → DMD → evaluation → export.

    Example: [bold]dmdctl demo --out dmdctl-demo[/bold]
    """
    from .demo import run_demo

    cfg = resolve(
        DM,
        config,
        teacher=teacher,
        out=out,
        distill_steps=distill_steps,
        num_pairs=num_pairs,
        teacher_steps=teacher_steps,
        eval_samples=eval_samples,
        lr=lr,
        seed=seed,
    )
    run_demo(cfg)


def main() -> None:
    from .runtime import process_session

    # the one place a command's process group is shut down: at the end, on error, on SIGTERM
    with process_session():
        app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
