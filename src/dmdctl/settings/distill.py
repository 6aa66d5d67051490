"""``dmdctl distill``: train a one-step generator with the DMD loss (docs/METHOD.md)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dmdctl.config import Settings
from dmdctl.errors import require
from dmdctl.options import option
from dmdctl.settings.common import (
    no_t5_option,
    offline_option,
    prompt_column_option,
    prompts_option,
    report_to_option,
    teacher_option,
    teacher_path_option,
    video_size_option,
)

# DMD2's SDXL LoRA generator's target modules (main/sd_unified_model.py)
DEFAULT_LORA_TARGETS = (
    "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,"
    "conv_shortcut,downsamplers.0.conv,upsamplers.0.conv,time_emb_proj"
)
REG_LOSSES = ("l2", "pseudo-huber", "lpips")
LR_SCHEDULES = ("cosine", "constant")
MIXED_PRECISION = ("no", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
LPIPS_NETS = ("vgg", "alex", "squeeze")


@dataclass
class DistillConfig(Settings):
    """Settings of ``distill``. The defaults are the built-in teachers' (ours); a teacher preset
    brings its recipe (docs/RECIPES.md) through :meth:`preset_layer`."""

    teacher: str | None = teacher_option()
    teacher_path: str | None = teacher_path_option()
    pairs: str | None = option(
        None,
        "Pairs folder from make-pairs (needed when --reg-weight > 0).",
        path=True,
        panel="Inputs",
    )
    out: str = option(
        "runs/distill",
        "Run folder (config, log.jsonl, checkpoints, samples, generator).",
        path=True,
        panel="Checkpoints and logging",
    )
    steps: int = option(
        2000,
        "Generator updates (a DMD2 script's iterations are steps x fake updates: its 39k-"
        "iteration SD1.5 checkpoint at 10 fake updates is 3,900 steps). A DMD2 preset trains "
        "as long as its published checkpoint (docs/RECIPES.md).",
        min=1,
        show_default=(
            "2000; sd15 3900, sd15-gan 200, sdxl 3800, sdxl-lora 3200, sdxl-1step 4800, "
            "edm-imagenet64 81100, edm-imagenet64-gan 38700"
        ),
        panel="Training",
    )
    batch_size: int = option(
        512, "Global generator batch for the DM loss.", min=1, panel="Training"
    )
    pair_batch_size: int = option(
        512, "Global batch of pairs for the regression loss.", min=1, panel="Training"
    )
    num_pairs: int = option(0, "Use only the first N pairs (0: all).", min=0, panel="Inputs")
    lr: float = option(3e-4, "Generator learning rate (AdamW).", above=0, panel="Training")
    fake_lr: float = option(3e-4, "Fake-score learning rate (AdamW).", above=0, panel="Training")
    lr_schedule: str = option(
        "cosine",
        "After the warm-up: cosine (to 0 at --steps) or constant; both learning rates.",
        choices=LR_SCHEDULES,
        panel="Training",
    )
    warmup: int = option(
        100,
        "Linear warm-up, in generator steps; the fake score follows the same multiplier (so its "
        "warm-up spans warmup x fake-updates updates).",
        min=0,
        panel="Training",
    )
    weight_decay: float = option(0.01, "AdamW weight decay.", min=0, panel="Training")
    grad_clip: float = option(10.0, "Gradient-norm clipping (0: off).", min=0, panel="Training")
    reg_loss: str = option(
        "l2", "Regression loss (lpips: image teachers only).", choices=REG_LOSSES, panel="Losses"
    )
    reg_weight: float = option(
        0.25,
        "Weight of the regression loss (0: ablation without regression).",
        min=0,
        panel="Losses",
    )
    lpips_net: str = option("vgg", "LPIPS backbone.", choices=LPIPS_NETS, panel="Losses")
    lpips_size: int = option(
        32, "Images are resized to this many pixels for LPIPS.", min=1, panel="Losses"
    )
    lpips_random_backbone: bool = option(
        False,
        "Run LPIPS with a random backbone when the pretrained one is not cached (tests only: it "
        "is not LPIPS).",
        panel="Losses",
    )
    dm_weight: float = option(
        1.0, "Weight of the DM loss (0: ablation, regression only).", min=0, panel="Losses"
    )
    real_only: bool = option(
        False,
        "Ablation: real score only, no fake score.",
        flags=("--real-only/--with-fake",),
        panel="Losses",
    )
    fake_updates: int = option(
        1, "Fake-score updates per generator update (DMD2's TTUR).", min=1, panel="Training"
    )
    # DMD2 (docs/METHOD.md, "DMD2"): the GAN on real data, few-step generators
    gan_weight: float = option(
        0.0,
        "Weight of DMD2's GAN loss on the generator (0: no GAN head). A head on the fake "
        "score's bottleneck tells noised real samples from noised generated ones.",
        min=0,
        show_default="0; sd15-gan 1e-3, edm-imagenet64-gan 3e-3",
        panel="DMD2",
    )
    gan_classifier_weight: float = option(
        1e-2,
        "Weight of the GAN head's loss in the fake score's update (DMD2: 1e-2).",
        min=0,
        panel="DMD2",
    )
    real_data: str | None = option(
        None,
        "Real samples for the GAN: a store made once by `dmdctl prepare-real` (from an image "
        "folder, images with captions.jsonl, an ADM/EDM .npz or Parquet files), read by row. "
        "Default: the built-in teachers' own training data.",
        path=True,
        panel="DMD2",
    )
    denoising_steps: str | None = option(
        None,
        "A few-step generator's steps, comma-separated and decreasing: timesteps for SD teachers "
        "(DMD2: 999,749,499,249), sigmas for the others (e.g. 80,2,0.5,0.1). Trained with "
        "backward simulation. Default: one step at the top noise level.",
        panel="DMD2",
    )
    conditioning_timestep: int | None = option(
        None,
        "SD teachers: the timestep a one-step generator is run at on pure noise (DMD2's SDXL "
        "one-step: 399; default 999). Same as --denoising-steps T.",
        min=0,
        panel="DMD2",
    )
    init_from: str | None = option(
        None,
        "Start a new run from a run folder, checkpoint or generator file: its generator (EMA "
        "included) and, from a checkpoint, its fake score; optimisers and step start afresh "
        "(DMD2's two-stage recipes).",
        path=True,
        panel="Checkpoints and logging",
    )
    # LoRA (training/lora.py; docs/RECIPES.md for the defaults' sources)
    lora_rank: int | None = option(
        None,
        "Train LoRA adapters of this rank on the generator's network (UNet, or SD3's or FLUX's "
        "transformer) instead of all its weights (Stable Diffusion teachers; DMD2's SDXL LoRA: "
        "64). Default: full fine-tuning.",
        min=1,
        panel="LoRA",
    )
    lora_alpha: float | None = option(
        None,
        "LoRA alpha: the adapters are scaled by alpha / rank (DMD2's SDXL LoRA: 8 with rank 64). "
        "Default: the rank (scale 1).",
        above=0,
        panel="LoRA",
    )
    lora_targets: str = option(
        DEFAULT_LORA_TARGETS,
        "Comma-separated module-name suffixes of the network that get adapters (default: "
        "DMD2's SDXL LoRA list; modules a network lacks are skipped).",
        panel="LoRA",
    )
    fake_lora_rank: int | None = option(
        None,
        "Train the fake score as LoRA adapters of this rank on the teacher's network (same "
        "alpha and targets; the GAN head stays fully trained). Default: full fine-tuning.",
        min=1,
        panel="LoRA",
    )
    sigma_levels: int = option(
        1000, "Noise levels of the DM loss's grid.", min=1, cli=False, panel="Losses"
    )
    min_step_frac: float = option(
        0.02,
        "Lowest noise-level index of the DM loss, as a fraction of the grid.",
        min=0,
        max=1,
        panel="Losses",
    )
    max_step_frac: float = option(
        0.98,
        "Highest noise-level index of the DM loss, as a fraction of the grid.",
        min=0,
        max=1,
        panel="Losses",
    )
    ema_decay: float = option(
        0.999, "EMA decay of the generator (0: no EMA).", min=0, below=1, panel="Training"
    )
    mixed_precision: str = option(
        "no",
        "Mixed precision (Accelerate).",
        choices=MIXED_PRECISION,
        panel="Device, precision and speed",
    )
    checkpoint_every: int = option(
        500, "Checkpoint (and sample plot) every N steps.", min=1, panel="Checkpoints and logging"
    )
    keep_checkpoints: int = option(
        0, "Keep only the newest N checkpoints (0: all).", min=0, panel="Checkpoints and logging"
    )
    log_every: int = option(50, "Log losses every N steps.", min=1, panel="Checkpoints and logging")
    eval_every: int = option(
        0,
        "Score the EMA generator every N steps into log.jsonl (0: off).",
        min=0,
        panel="Evaluation",
    )
    eval_samples: int = option(
        1000, "Samples per evaluation during training.", min=1, panel="Evaluation"
    )
    plot_samples: int = option(
        2000,
        "Samples in the plot written at each checkpoint (0: none).",
        min=0,
        panel="Checkpoints and logging",
    )
    seed: int = option(0, "Random seed.", min=0, panel="Training")
    resume: str | None = option(
        None, "Continue a run: 'latest' or a checkpoint folder.", panel="Checkpoints and logging"
    )
    cpu: bool = option(
        False, "Train on the CPU even if a GPU is present.", panel="Device, precision and speed"
    )
    skip_nonfinite: bool = option(
        False,
        "Skip updates whose loss or gradient is NaN/inf (counted in log.jsonl) instead of "
        "stopping the run.",
        panel="Training",
    )
    skip_bad_records: bool = option(
        False,
        "A prompt, real sample or pair that can no longer be read (a file changed or was "
        "damaged under the run) is replaced by the next readable row and counted in log.jsonl "
        "(bad_records), instead of stopping the run at its last checkpoint.",
        panel="Inputs",
    )
    grad_checkpointing: bool = option(
        False,
        "Recompute activations in the backward pass of the generator and fake score (less "
        "memory, ~30% slower).",
        panel="Device, precision and speed",
    )
    fsdp: bool = option(
        False,
        "Shard the generator and the fake score over the launch's processes with torch FSDP2 "
        "(per repeated block, then the whole network); the teacher stays whole on each.",
        panel="Device, precision and speed",
    )
    optimizer: str = option(
        "adamw",
        "Optimiser; adamw8bit (bitsandbytes, CUDA) saves memory.",
        choices=OPTIMIZERS,
        panel="Training",
    )
    # speed levers (dmdctl.training.speed; measured by benchmarks/sd_step.py)
    sdpa_backend: str = option(
        "auto",
        "Attention kernel of the UNets.",
        choices=SDPA_BACKENDS,
        panel="Device, precision and speed",
    )
    channels_last: bool = option(
        False, "Convolutions in channels-last memory layout.", panel="Device, precision and speed"
    )
    compile: bool = option(
        False,
        "torch.compile each repeated block of the networks (regional compilation: compiles once "
        "per block type; the first steps are slower).",
        panel="Device, precision and speed",
    )
    # text-to-image (Stable Diffusion) teachers
    prompts: str | None = prompts_option()
    prompt_column: str | None = prompt_column_option()
    prompt_cache: str = option(
        "auto",
        "Text-to-image teachers: encode the drawn prompts in each step with the frozen text "
        "encoders (off), or once into a table in the run folder (on); auto caches a table of "
        "at most 1 GiB (a few thousand prompts) and encodes larger sets in the step.",
        choices=("auto", "on", "off"),
        panel="Inputs",
    )
    real_guidance: float | None = option(
        None,
        "Guidance scale of the real score (the fake score has none). Text-to-image teachers: "
        "CFG, the empty prompt being the unconditional branch. FLUX.1-dev: the transformer's "
        "guidance input, given to the real score, the generator and the fake score alike (one "
        "pass). EDM2 teachers: D_g + w (D - D_g) with the guiding net of --guide-net.",
        min=1,
        show_default="sd15 1.75, sd15-dmd 3.0, flux-dev 3.5, edm2-img512-s-autog 2.1",
        panel="Losses",
    )
    guide_net: str | None = option(
        None,
        "EDM2 teachers: the guiding network of the real score, a converted EDM2 teacher file: "
        "an unconditional net gives classifier-free guidance, a smaller or less-trained "
        "conditional one autoguidance (the published settings: docs/guide/edm.md).",
        path=True,
        panel="Losses",
    )
    guide_mode: str = option(
        "auto",
        "EDM2 teachers: how --guide-net guides: cfg (an unconditional net, given no labels), "
        "autoguidance (a conditional net, given the labels), or auto (by the net's classes).",
        choices=("auto", "cfg", "autoguidance"),
        panel="Losses",
    )
    allow_guidance_mismatch: bool = option(
        False,
        "Train on pairs made with another CFG scale than the real score's (refused by default: "
        "the two losses would pull toward different distributions).",
        panel="Inputs",
    )
    no_t5: bool = no_t5_option()
    video_size: str | None = video_size_option()
    flow_shift: float | None = option(
        None,
        "Flow-matching teachers: the time shift s of the DM loss's and the fake score's noise "
        "levels (t -> s t / (1 + (s - 1) t) on the 1000 training times). Default: the "
        "teacher scheduler's (SD3 3.0, Wan 2.1 3.0).",
        above=0,
        show_default="wan-t2v-1.3b 8.0",
        panel="Losses",
    )
    offline: bool = offline_option()
    report_to: str = report_to_option()

    @staticmethod
    def preset_layer(values: dict[str, Any]) -> dict[str, Any]:
        """The distill recipe a teacher preset carries (docs/RECIPES.md: every value's source)."""
        from dmdctl.teachers import preset_config, preset_of

        found = preset_of(values.get("teacher"), values.get("teacher_path"))
        if found is None:
            return {}
        _, cfg = preset_config(found[1])
        recipe = cfg.get("distill") or cfg.get("recipe", {}).get("distill", {})
        unknown = sorted(set(recipe) - {f.name for f in fields(DistillConfig)})
        if unknown:  # a preset must be runnable as written: no silently dropped settings
            raise RuntimeError(f"preset {found[1]} sets unknown distill settings {unknown}")
        return dict(recipe)

    def step_values(self) -> list[float] | None:
        """--denoising-steps (or --conditioning-timestep) as numbers; None: the default step."""
        if self.conditioning_timestep is not None:
            return [float(self.conditioning_timestep)]
        if self.denoising_steps is None:
            return None
        return parse_steps(self.denoising_steps)

    def check(self) -> None:
        require(
            self.denoising_steps is None or self.conditioning_timestep is None,
            "--conditioning-timestep is a one-step generator's step; give it or "
            "--denoising-steps, not both",
        )
        self.step_values()
        require(
            self.gan_weight == 0 or self.gan_classifier_weight > 0,
            "--gan-weight > 0 needs --gan-classifier-weight > 0 (an untrained GAN head would "
            "only push the generator at random)",
        )
        require(
            self.gan_weight == 0 or (self.dm_weight > 0 and not self.real_only),
            "the GAN head lives on the fake score: --gan-weight needs --dm-weight > 0 and no "
            "--real-only",
        )
        require(
            self.real_data is None or self.gan_weight > 0,
            "--real-data feeds the GAN loss; pass --gan-weight > 0 to use it",
        )
        require(
            self.init_from is None or self.resume is None,
            "--init-from starts a new run from another one; --resume continues this one: "
            "give one of them",
        )
        lora = self.lora_rank is not None or self.fake_lora_rank is not None
        require(
            self.fake_lora_rank is None or (self.dm_weight > 0 and not self.real_only),
            "--fake-lora-rank is for the fake score: it needs --dm-weight > 0 and no --real-only",
        )
        require(
            self.lora_alpha is None or lora,
            "--lora-alpha scales LoRA adapters: pass --lora-rank or --fake-lora-rank too",
        )
        require(
            not lora or any(t.strip() for t in self.lora_targets.split(",")),
            "--lora-targets names no module (give comma-separated name suffixes, e.g. to_q,to_k)",
        )
        require(
            not lora or self.init_from is None,
            "--init-from is not available with --lora-rank / --fake-lora-rank (a LoRA run starts "
            "from the teacher); continue a LoRA run with --resume",
        )
        require(
            self.min_step_frac < self.max_step_frac,
            "need 0 <= --min-step-frac < --max-step-frac <= 1, "
            f"got {self.min_step_frac}, {self.max_step_frac}",
        )
        if self.optimizer == "adamw8bit":
            import importlib.util

            require(
                importlib.util.find_spec("bitsandbytes") is not None,
                "--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes; CUDA only)",
            )
        require(
            not (self.optimizer == "adamw8bit" and self.skip_nonfinite),
            "--skip-nonfinite needs --optimizer adamw (it uses torch's fused AdamW)",
        )
        require(
            not (self.fsdp and lora),
            "--fsdp is not available with --lora-rank / --fake-lora-rank (a LoRA run trains "
            "only small adapters: run it without --fsdp)",
        )
        require(
            not (self.fsdp and self.optimizer == "adamw8bit"),
            "--fsdp needs --optimizer adamw (8-bit AdamW was not run on sharded parameters)",
        )
        require(
            not (self.fsdp and self.compile),
            "--fsdp is not available with --compile (compiled blocks were not run sharded)",
        )
        require(
            not (self.fsdp and self.mixed_precision == "fp16"),
            "--fsdp is not available with --mixed-precision fp16 (its loss scaler was not run "
            "on sharded gradients); use bf16",
        )
        require(
            self.dm_weight > 0 or self.reg_weight > 0,
            "both --dm-weight and --reg-weight are 0: nothing to train",
        )
        require(
            self.resume is None or str(self.resume).strip() != "",
            "--resume needs 'latest' or a checkpoint folder",
        )
        from dmdctl.inputs import check_out_folder, check_teacher_path
        from dmdctl.training.trackers import check_report_to

        check_teacher_path(self.teacher_path, self.teacher)
        require(
            self.init_from is None or Path(self.init_from).exists(),
            f"--init-from {self.init_from}: no such file or folder",
        )
        require(
            self.real_data is None or Path(self.real_data).exists(),
            f"--real-data {self.real_data}: no such file or folder",
        )
        require(
            self.guide_net is None or Path(self.guide_net).is_file(),
            f"--guide-net {self.guide_net}: no such file (pass a teacher file from convert-edm)",
        )
        require(
            self.guide_mode == "auto" or self.guide_net is not None,
            f"--guide-mode {self.guide_mode} needs --guide-net FILE (the guiding network)",
        )
        check_out_folder(Path(self.out))
        check_report_to(self.report_to)
        require(
            self.reg_weight == 0 or self.pairs is not None,
            f"--reg-weight is {self.reg_weight} but no --pairs folder was given "
            "(make one with `dmdctl make-pairs`, or pass --reg-weight 0 to train without regression)",
        )


def parse_steps(text: str) -> list[float]:
    """``"999,749,499,249"`` -> [999.0, 749.0, 499.0, 249.0], checked to be decreasing."""
    try:
        values = [float(v) for v in str(text).replace(" ", "").split(",") if v != ""]
    except ValueError:
        values = []
    require(
        bool(values) and all(v >= 0 for v in values),
        f"--denoising-steps must be comma-separated numbers, got {text!r}",
    )
    require(
        all(b < a for a, b in zip(values, values[1:], strict=False)),
        f"--denoising-steps must be decreasing (the generator goes from noise to data), got {text!r}",
    )
    return values


HELP = """Train a one-step (or few-step) generator with the DMD loss plus the regression loss on the
pairs (DMD), or a GAN loss on real data (DMD2: --gan-weight, --real-data, --denoising-steps).

The defaults shown are the built-in teachers' (ours). A preset brings the recipe it names,
with every value's source in docs/RECIPES.md: --teacher sd15 is DMD2's SD1.5 stage 1 (no
pairs: --prompts only), sd15-gan its stage 2 (GAN on --real-data, from stage 1 with
--init-from), sd15-dmd the DMD paper's (LPIPS regression on pairs made at the real score's
guidance), edm-imagenet64 and edm-imagenet64-gan DMD2's without and with the GAN, edm-cifar10
DMD's. Flags and --config override them.

Example: [bold]dmdctl distill --teacher-path runs/teacher/teacher.safetensors --pairs runs/pairs --out runs/dmd[/bold]

DMD2 on digits, 4 steps (the demo's run): [bold]dmdctl distill --teacher digits --reg-weight 0 --gan-weight 3e-3 --fake-updates 3 --steps 200 --batch-size 64 --lr 1e-4 --fake-lr 1e-4 --warmup 20 --denoising-steps 80,2,0.8,0.35[/bold]

LoRA (SD teachers): [bold]--lora-rank 64 --lora-alpha 8[/bold] trains adapters only (DMD2's SDXL
LoRA values); [bold]dmdctl export RUN --format lora -o DIR[/bold] writes them for
pipe.load_lora_weights(DIR).

Multi-GPU: [bold]accelerate launch --num_processes 8 -m dmdctl distill ...[/bold] (the batch
sizes are global; SIGTERM saves a checkpoint and exits 143; resume with --resume latest).
"""


SETTINGS = DistillConfig
