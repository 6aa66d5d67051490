"""Bad input everywhere: one line on stderr naming the problem and the fix, exit code 2, and
nothing written (the folder tree is byte-for-byte what it was, apart from a disk-full run's own
output folder, which must hold no half-written file).

The cases run in a folder laid out like a user's (``runs/teacher/teacher.safetensors``,
``runs/pairs`` …) so the messages carry stable relative paths. ``docs/ERRORS.md`` is made from
these same cases by ``scripts/bad_inputs_table.py``; each case also checks that its row there
is still true.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ERRORS.md"
SCRIPT = "scripts/bad_inputs_table.py"

T = "--teacher-path runs/teacher/teacher.safetensors"
MP = f"make-pairs {T} --out {{out}} --num-pairs 64 --shard-size 32 --steps 4"
D = f"distill {T} --pairs runs/pairs --out {{out}} --steps 4 --batch-size 16 --pair-batch-size 16 --plot-samples 0"
RUN = D.replace("{out}", "runs/run")
PR = "--teacher digits --out {out} --shard-size 16"
PR_SD = "--teacher-path runs/sd --out {out}"
# an EDM2 run on the tiny random teacher of runs/edm2
E2 = "distill --teacher-path runs/edm2/teacher.safetensors --out {out} --steps 2 --batch-size 2 --reg-weight 0 --plot-samples 0 --cpu"
# a text-to-image run on the tiny SD pipeline (runs/sd) with a prompts file
DSD = "distill --teacher-path runs/sd --prompts runs/prompts.txt --out {out} --steps 2 --batch-size 2 --cpu"
# the same on the tiny FLUX.1 pipeline (runs/flux)
DFLUX = DSD.replace("runs/sd", "runs/flux")
# the same on the tiny Wan text-to-video pipeline (runs/wan)
DWAN = "distill --teacher-path runs/wan --prompts runs/prompts.txt --out {out} --steps 2 --batch-size 2 --cpu"


@dataclass
class Case:
    id: str
    what: str
    command: str  # ``dmdctl`` arguments; {out} is a fresh folder that must not appear
    expect: str  # a fragment of the message
    patch: str | None = None  # a simulated failure (see failure())
    writes: bool = False  # the run starts for real: its {out} may exist, without half files
    launcher: str | None = None  # "torchrun": needs 2 processes (tests/test_multiprocess.py)
    skip_if_cuda: bool = False

    @property
    def out(self) -> str:
        return f"runs/out-{self.id}"

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.command.replace("{out}", self.out))

    @property
    def shown(self) -> str:
        prefix = "torchrun --nproc_per_node 2 -m dmdctl " if self.launcher else "dmdctl "
        return prefix + self.command.replace("{out}", self.out)


CASES = [
    # --- make-pairs ---
    Case(
        "mp-missing-teacher",
        "teacher file does not exist",
        MP.replace(T, "--teacher-path runs/missing.safetensors"),
        "file not found: runs/missing.safetensors",
    ),
    Case(
        "mp-teacher-is-folder",
        "teacher path is a folder",
        MP.replace(T, "--teacher-path runs/teacher"),
        "is a folder; pass the teacher file",
    ),
    Case(
        "mp-teacher-not-safetensors",
        "teacher file is not safetensors",
        MP.replace(T, "--teacher-path runs/garbage.safetensors"),
        "is not a readable safetensors file",
    ),
    Case(
        "mp-generator-as-teacher",
        "a generator file passed as the teacher",
        MP.replace(T, "--teacher-path runs/run/generator.safetensors"),
        "is not a dmdctl teacher file",
    ),
    Case(
        "mp-unknown-preset",
        "unknown teacher preset",
        MP + " --teacher sd99",
        "unknown teacher 'sd99'",
    ),
    Case(
        "mp-wrong-kind",
        "--teacher names another kind than the file holds",
        MP + " --teacher digits",
        "holds a 'toy2d' teacher, but --teacher says 'digits'",
    ),
    Case(
        "mp-negative-num-pairs",
        "negative pair count",
        MP.replace("--num-pairs 64", "--num-pairs -3"),
        "--num-pairs must be positive, got -3",
    ),
    Case(
        "mp-negative-steps",
        "negative sampler steps",
        MP.replace("--steps 4", "--steps -1"),
        "--steps must be >= 0",
    ),
    Case(
        "mp-zero-shard-size",
        "zero shard size",
        MP.replace("--shard-size 32", "--shard-size 0"),
        "--shard-size must be positive",
    ),
    Case("mp-bad-dtype", "unknown storage dtype", MP + " --dtype float8", "--dtype must be one of"),
    Case("mp-bad-device", "not a device", MP + " --device potato", "is not a device"),
    Case(
        "mp-no-gpu",
        "--device cuda on a machine without a GPU",
        MP + " --device cuda",
        "no CUDA GPU is available",
        skip_if_cuda=True,
    ),
    Case(
        "mp-out-is-file",
        "--out is an existing file",
        MP.replace("{out}", "runs/afile.txt"),
        "is a file, not a folder",
    ),
    Case(
        "mp-out-under-file",
        "--out cannot be created (a file in its path)",
        MP.replace("{out}", "runs/afile.txt/pairs"),
        "cannot be created: runs/afile.txt is a file",
    ),
    Case(
        "mp-other-settings",
        "re-run into a pairs folder made with other settings",
        f"make-pairs {T} --out runs/pairs --num-pairs 256 --shard-size 64 --steps 9",
        "already holds pairs made with a different 'sampler'",
    ),
    Case(
        "mp-missing-config",
        "--config file does not exist",
        "make-pairs --config runs/nope.toml",
        "config file not found",
    ),
    Case(
        "mp-bad-toml",
        "--config file is not TOML",
        "make-pairs --config runs/bad.toml",
        "is not valid TOML",
    ),
    Case(
        "mp-unknown-config-key",
        "--config file with a misspelt key",
        "make-pairs --config runs/unknown.toml",
        "unknown key(s)",
    ),
    Case(
        "mp-disk-full",
        "disk full while writing a shard (test: save_file raises ENOSPC)",
        MP,
        "No space left on device",
        patch="shard-enospc",
        writes=True,
    ),
    # --- distill ---
    Case("d-no-teacher", "no teacher given", D.replace(T + " ", ""), "no teacher given"),
    Case(
        "d-no-pairs",
        "regression on, no pairs folder",
        D.replace("--pairs runs/pairs ", ""),
        "no --pairs folder was given",
    ),
    Case(
        "d-pairs-missing",
        "pairs folder does not exist",
        D.replace("runs/pairs", "runs/nothing"),
        "pairs folder not found: runs/nothing",
    ),
    Case(
        "d-pairs-is-file",
        "--pairs is a file",
        D.replace("runs/pairs", "runs/afile.txt"),
        "is a file",
    ),
    Case(
        "d-pairs-not-pairs",
        "--pairs is some other folder",
        D.replace("runs/pairs", "runs/teacher"),
        "has no manifest.json",
    ),
    Case(
        "d-pairs-other-teacher",
        "pairs made by another teacher file",
        D.replace(T, "--teacher-path runs/other/teacher.safetensors"),
        "was made by a different teacher file",
    ),
    Case(
        "d-pairs-other-kind",
        "pairs of another teacher kind (2-D points for an image teacher)",
        D.replace(T, "--teacher-path runs/digits/teacher.safetensors"),
        "was made by a 'toy2d' teacher with samples of shape (2,)",
    ),
    Case(
        "d-pairs-other-resolution",
        "pairs of another resolution (16x16 for an 8x8 teacher)",
        D.replace(T, "--teacher-path runs/digits/teacher.safetensors").replace(
            "runs/pairs", "runs/digits16-pairs"
        ),
        "samples of shape (1, 16, 16), not this 'digits' teacher (1, 8, 8)",
    ),
    Case(
        "d-pairs-corrupt",
        "a pairs shard changed after it was written",
        D.replace("runs/pairs", "runs/pairs-corrupt"),
        "is corrupt or truncated",
    ),
    Case(
        "d-too-many-pairs",
        "--num-pairs beyond what the folder holds",
        D + " --num-pairs 1000",
        "holds only 256 complete pairs",
    ),
    Case(
        "d-negative-steps",
        "negative step count",
        D.replace("--steps 4", "--steps -5"),
        "--steps must be positive, got -5",
    ),
    Case(
        "d-zero-batch",
        "zero batch size",
        D.replace("--batch-size 16", "--batch-size 0"),
        "--batch-size must be positive",
    ),
    Case("d-nan-lr", "learning rate NaN", D + " --lr nan", "--lr must be a number, got nan"),
    Case(
        "d-bad-reg-loss",
        "unknown regression loss",
        D + " --reg-loss l7",
        "--reg-loss must be one of",
    ),
    Case(
        "d-nothing-to-train",
        "both loss weights 0",
        D + " --reg-weight 0 --dm-weight 0",
        "nothing to train",
    ),
    Case(
        "d-step-fracs",
        "noise range inverted",
        D + " --min-step-frac 0.9 --max-step-frac 0.5",
        "need 0 <= --min-step-frac < --max-step-frac <= 1",
    ),
    Case(
        "d-mixed-precision",
        "unknown precision",
        D + " --mixed-precision fp8",
        "--mixed-precision must be",
    ),
    Case(
        "d-gan-real-only",
        "GAN without a fake score",
        D + " --gan-weight 0.01 --real-only",
        "--gan-weight needs --dm-weight > 0 and no --real-only",
    ),
    Case(
        "d-real-data-no-gan",
        "--real-data without the GAN",
        D + " --real-data runs/pairs",
        "--real-data feeds the GAN loss",
    ),
    Case(
        "d-steps-increasing",
        "--denoising-steps not decreasing",
        D + " --denoising-steps 0.5,2",
        "--denoising-steps must be decreasing",
    ),
    Case(
        "d-steps-out-of-range",
        "--denoising-steps beyond the teacher's noise range",
        D + " --denoising-steps 500,1",
        "sigmas must lie in [0.002, 80]",
    ),
    Case(
        "d-cond-timestep-not-sd",
        "--conditioning-timestep on a teacher that is not SD",
        D + " --conditioning-timestep 399",
        "--conditioning-timestep is for SD teachers",
    ),
    Case(
        "d-init-from-missing",
        "--init-from names nothing",
        D + " --init-from runs/nothing",
        "--init-from runs/nothing: no such file or folder",
    ),
    Case(
        "d-negative-keep",
        "negative --keep-checkpoints",
        D + " --keep-checkpoints -1",
        "--keep-checkpoints must be >= 0",
    ),
    Case(
        "d-lr-schedule", "unknown lr schedule", D + " --lr-schedule linear", "--lr-schedule must be"
    ),
    Case(
        "d-out-is-file",
        "--out is an existing file",
        D.replace("{out}", "runs/afile.txt"),
        "is a file, not a folder",
    ),
    Case(
        "d-existing-run",
        "--out holds a run, no --resume",
        RUN,
        "already holds checkpoints of a run",
    ),
    Case(
        "d-resume-nothing",
        "--resume latest with no checkpoint",
        D + " --resume latest",
        "no complete checkpoint under",
    ),
    Case(
        "d-resume-not-checkpoint",
        "--resume names a folder that is no checkpoint",
        D + " --resume runs/pairs",
        "not a checkpoint folder",
    ),
    Case(
        "d-resume-other-batch",
        "resume with other batch sizes",
        RUN.replace("--batch-size 16 --pair-batch-size 16", "--batch-size 32 --pair-batch-size 8")
        + " --resume latest",
        "batch_size 16 there, 32 now; pair_batch_size 16 there, 8 now",
    ),
    Case(
        "d-resume-other-fake",
        "resume without the fake score it was trained with",
        RUN + " --real-only --resume latest",
        "fake score on there, off now",
    ),
    Case(
        "d-resume-other-teacher",
        "resume with another teacher file",
        RUN.replace(T, "--teacher-path runs/other/teacher.safetensors")
        + " --reg-weight 0 --resume latest",
        "was trained from a different teacher file",
    ),
    Case(
        "d-resume-past-steps",
        "resume a checkpoint past --steps",
        RUN.replace("--steps 4", "--steps 2") + " --resume latest",
        "is at step 4, past --steps 2",
    ),
    Case(
        "d-batch-not-divisible",
        "global batch not divisible by the processes (2 processes)",
        D + " --batch-size 63",
        "error: --batch-size 63 is not divisible by the 2 processes",
        launcher="torchrun",
    ),
    Case(
        "d-lora-rank-zero",
        "--lora-rank 0 (leave it out for full fine-tuning)",
        D + " --lora-rank 0",
        "--lora-rank must be positive, got 0",
    ),
    Case(
        "d-lora-not-sd",
        "LoRA on a teacher without a diffusers UNet",
        D + " --lora-rank 4",
        "need a Stable Diffusion teacher",
    ),
    Case(
        "d-fsdp-lora",
        "--fsdp with LoRA (not supported together)",
        D + " --fsdp --lora-rank 4",
        "--fsdp is not available with --lora-rank",
    ),
    Case(
        "d-fsdp-fp16",
        "--fsdp with fp16 (its loss scaler was not run on sharded gradients)",
        D + " --fsdp --mixed-precision fp16",
        "--fsdp is not available with --mixed-precision fp16",
    ),
    Case(
        "d-disk-full",
        "disk full while writing a checkpoint (test: save_file raises ENOSPC)",
        D + " --checkpoint-every 2",
        "No space left on device",
        patch="checkpoint-enospc",
        writes=True,
    ),
    # --- distill, text-to-image: refused before anything (a prompt table, a folder) is written ---
    Case(
        "dsd-conditioning-timestep",
        "--conditioning-timestep outside the scheduler's timesteps",
        f"{DSD} --conditioning-timestep 1000",
        "--conditioning-timestep 1000: timesteps must be integers in 0..999",
    ),
    Case(
        "dsd-gan-without-real-data",
        "the GAN without real samples for a text-to-image teacher",
        f"{DSD} --gan-weight 0.01",
        "needs real samples: make a store once with `dmdctl prepare-real",
    ),
    Case(
        "dsd-raw-real-data",
        "--real-data names a captioned folder, not a store",
        f"{DSD} --gan-weight 0.01 --real-data runs/real/cap-corrupt",
        "--real-data runs/real/cap-corrupt is not a store made by `dmdctl prepare-real`",
    ),
    Case(
        "dsd-real-store-other-teacher",
        "--real-data holds a store made for another teacher",
        f"{DSD} --gan-weight 0.01 --real-data runs/real/store",
        "was made for a teacher with samples in pixels, this teacher has latents",
    ),
    Case(
        "dsd-prompts-bad-row",
        "a JSONL prompts file with a row that has no caption",
        DSD.replace("runs/prompts.txt", "runs/prompts-bad.jsonl"),
        "runs/prompts-bad.jsonl:3 has no 'caption', 'prompt' or 'text' string field",
    ),
    Case(
        "dflux-as-sdxl",
        "a FLUX.1 pipeline given with another architecture's preset",
        f"{DFLUX} --teacher sdxl",
        "runs/flux is a FLUX.1 pipeline, but --teacher sdxl is a recipe for SDXL; use --teacher "
        "flux-dev (or --teacher sd) with this pipeline",
    ),
    Case(
        "dflux-preset-on-sd",
        "the flux-dev preset on an SD1.x pipeline",
        f"{DSD} --teacher flux-dev",
        "runs/sd is an SD1.x/2.x pipeline, but --teacher flux-dev is a recipe for FLUX.1",
    ),
    Case(
        "dflux-no-t5",
        "--no-t5 on a FLUX.1 pipeline (T5 is its only token encoder)",
        f"{DFLUX} --no-t5",
        "--no-t5 is for SD3 teachers (their third text encoder is T5)",
    ),
    Case(
        "dflux-sd-timesteps",
        "SD's integer timesteps as a FLUX generator's steps",
        f"{DFLUX} --denoising-steps 999,499",
        "flow-matching steps are t values in (0, 1], got 999",
    ),
    # --- prepare-real ---
    Case(
        "pr-missing-source",
        "the real images do not exist",
        f"prepare-real runs/missing.npz {PR}",
        "SOURCE runs/missing.npz: no such file or folder",
    ),
    Case(
        "pr-npz-no-arr0",
        "an npz without arr_0",
        f"prepare-real runs/real/no-arr0.npz {PR}",
        "runs/real/no-arr0.npz has no arr_0",
    ),
    Case(
        "pr-npz-float",
        "an npz whose arr_0 is not uint8",
        f"prepare-real runs/real/float.npz {PR}",
        "arr_0 must be uint8 images [N, H, W, C], got float32",
    ),
    Case(
        "pr-labels-out-of-range",
        "a label outside the teacher's classes",
        f"prepare-real runs/real/bad-labels.npz {PR}",
        "arr_1[3] = 12 is not a label in 0..9",
    ),
    Case(
        "pr-npz-unlabelled",
        "an npz without labels for a class-conditional teacher",
        f"prepare-real runs/real/unlabelled.npz {PR}",
        "has no labels (arr_1), but the 'digits' teacher is class-conditional",
    ),
    Case(
        "pr-folder-unlabelled",
        "an image folder for a class-conditional teacher",
        f"prepare-real runs/real/images {PR}",
        "is an image folder without labels, but the teacher is class-conditional",
    ),
    Case(
        "pr-no-captions",
        "a text-to-image teacher with a folder without captions.jsonl",
        f"prepare-real runs/real/images {PR_SD}",
        "a text-to-image teacher needs captions.jsonl",
    ),
    Case(
        "pr-captions-not-json",
        "a captions.jsonl line that is not JSON",
        f"prepare-real runs/real/cap-not-json {PR_SD}",
        "runs/real/cap-not-json/captions.jsonl:2: not JSON",
    ),
    Case(
        "pr-caption-not-text",
        "a caption that is not a string",
        f"prepare-real runs/real/cap-not-text {PR_SD}",
        "runs/real/cap-not-text/captions.jsonl:2: 'caption' must be a string, got int",
    ),
    Case(
        "pr-image-missing",
        "captions.jsonl names an image that is not there",
        f"prepare-real runs/real/cap-missing {PR_SD}",
        "captions.jsonl:3: image gone.png not found",
    ),
    Case(
        "pr-corrupt-image",
        "an image that does not decode (the complete shards are kept)",
        f"prepare-real runs/real/cap-corrupt {PR_SD} --shard-size 1",
        "could not read image 1.png (runs/real/cap-corrupt/captions.jsonl:2): not an image",
        writes=True,
    ),
    Case(
        "pr-other-source",
        "--out holds a store made from another source",
        f"prepare-real runs/real/digits-b.npz {PR.replace('{out}', 'runs/real/store')}",
        "already holds a real-data store made with a different 'source.path'",
    ),
    # --- export ---
    Case(
        "ex-lora-not-lora-run",
        "--format lora of a run trained without --lora-rank",
        "export runs/run --format lora -o {out}",
        "holds no LoRA adapters",
    ),
    Case(
        "ex-diffusers-out-not-empty",
        "--format diffusers into a folder that holds files (here a Wan generator's)",
        "export runs/wan-generator.safetensors --format diffusers -o runs/wan",
        "--out runs/wan exists and is not an empty folder",
    ),
    # --- eval-fid ---
    Case(
        "ef-bootstrap-too-few",
        "too few bootstrap rounds for an interval",
        f"eval-fid {T} --steps 2 --precision-recall --bootstrap 3",
        "--bootstrap must be 0 (no intervals) or at least 10 rounds, got 3",
    ),
    Case(
        "ef-pr-k-zero",
        "precision/recall with k = 0 neighbours",
        f"eval-fid {T} --steps 2 --precision-recall --pr-k 0",
        "--pr-k must be positive, got 0",
    ),
    Case(
        "ef-dinov2-without-network",
        "FD-DINOv2 without a local DINOv2 network",
        f"eval-fid {T} --steps 2 --features dinov2",
        "--features dinov2 and --dinov2 DIR go together",
    ),
    # --- EDM2 teachers (runs/edm2: tiny random nets, and pickles in EDM2's record format) ---
    Case(
        "e2-guidance-without-guide",
        "an EDM2 real score guided without a guiding network",
        f"{E2} --real-guidance 2",
        "--real-guidance 2 guides an EDM2 teacher's real score with a second network",
    ),
    Case(
        "e2-cfg-with-conditional-guide",
        "--guide-mode cfg with a conditional guiding net",
        f"{E2} --real-guidance 2 --guide-net runs/edm2/small.safetensors --guide-mode cfg",
        "--guide-mode cfg needs an unconditional guiding net",
    ),
    Case(
        "e2-guide-for-other-kind",
        "--guide-net on a teacher that is not EDM2",
        f"{D} --guide-net runs/edm2/uncond.safetensors --real-guidance 2",
        "--guide-net is for EDM2 teachers, not 'toy2d'",
    ),
    Case(
        "e2-guide-other-space",
        "a guiding net of another resolution",
        f"{E2} --real-guidance 2 --guide-net runs/edm2/big.safetensors",
        "its img_resolution is 32, the teacher's 16",
    ),
    Case(
        "e2-sample-guidance-without-guide",
        "sampling an EDM2 teacher with --guidance but no guiding net",
        "sample --teacher-path runs/edm2/teacher.safetensors --guidance 2 --out {out}",
        "--guidance 2 needs --guide-net FILE",
    ),
    Case(
        "e2-pickle-mixed-formats",
        "an EDM2 pickle that also holds an EDM network class",
        "convert-edm runs/edm2/mixed.pkl -o {out}/t.safetensors",
        "an EDM2 checkpoint holds no DhariwalUNet object",
    ),
    Case(
        "e2-pickle-object-array",
        "a numpy array of Python objects (here calling os.system) in an EDM2 pickle",
        "convert-edm runs/edm2/object-array.pkl -o {out}/t.safetensors",
        "a numpy value of non-numeric dtype object",
    ),
    Case(
        "e2-vae-folder-without-vae",
        "--vae names a folder that holds no VAE",
        "convert-edm runs/edm2/latent.pkl --vae runs/teacher -o {out}/t.safetensors",
        "runs/teacher holds no VAE",
    ),
    # --- video teachers (Wan) ---
    Case(
        "wan-frames-not-4k1",
        "a frame count the video VAE cannot compress (not 4k + 1)",
        f"{DWAN} --video-size 6x32x32",
        "6 frames is not 4k + 1",
    ),
    Case(
        "wan-side-not-16",
        "a video side that is not a multiple of the VAE's 8x times the 2x2 patch",
        f"{DWAN} --video-size 5x30x32",
        "30x32 pixels must be multiples of 16x16",
    ),
    Case(
        "wan-size-malformed",
        "--video-size without three numbers",
        f"{DWAN} --video-size 5x32",
        "is not FRAMESxHEIGHTxWIDTH",
    ),
    Case(
        "mp-wan-frames",
        "make-pairs at a frame count the VAE cannot compress",
        "make-pairs --teacher-path runs/wan --prompts runs/prompts.txt --video-size 8x32x32 "
        "--out {out} --num-pairs 2 --device cpu",
        "8 frames is not 4k + 1",
    ),
    Case(
        "video-size-image-teacher",
        "--video-size for an image teacher",
        f"{DSD} --video-size 5x32x32",
        "--video-size is for video teachers (Wan)",
    ),
    Case(
        "flow-shift-eps-teacher",
        "--flow-shift for a teacher that is not flow matching",
        f"{DSD} --flow-shift 8",
        "--flow-shift is for flow-matching teachers",
    ),
    Case(
        "wan-folder-sd-preset",
        "a Wan pipeline folder with an SD preset",
        f"{DWAN.replace('distill', 'distill --teacher sd15')} --video-size 5x32x32",
        "is a Wan text-to-video pipeline, but --teacher sd15 is a Stable Diffusion teacher",
    ),
    Case(
        "eval-fid-video",
        "eval-fid of a video (Wan) teacher's sampler",
        "eval-fid --teacher-path runs/wan --num-samples 4 --device cpu",
        "dmdctl has no video metric",
    ),
    Case(
        "eval-fid-video-prompts",
        "eval-fid of a video (Wan) generator over prompts (refused before any video is made)",
        "eval-fid --generator runs/wan-generator.safetensors --prompts runs/prompts.txt "
        "--ref runs/ref.npz --num-samples 2 --device cpu",
        "dmdctl has no video metric",
    ),
    Case(
        "wan-lpips",
        "LPIPS regression for a video teacher",
        f"{DWAN} --video-size 5x32x32 --pairs runs/wan-pairs --reg-weight 1 --reg-loss lpips",
        "--reg-loss lpips needs image teachers",
    ),
]


# --- the folder the cases run in ---------------------------------------------------------------
def build_env(root: Path, teacher: str | None = None, pairs: str | None = None) -> None:
    """Lay out ``root/runs`` (a few seconds); reuse the test session's teacher and pairs if given."""
    from dmdctl.commands.make_pairs import make_pairs
    from dmdctl.commands.train_teacher import train_teacher
    from dmdctl.settings.distill import DistillConfig
    from dmdctl.settings.make_pairs import MakePairsConfig
    from dmdctl.settings.train_teacher import TrainTeacherConfig
    from dmdctl.teachers import KINDS, preset_config, save_teacher
    from dmdctl.training.loop import distill

    runs = root / "runs"
    (runs / "teacher").mkdir(parents=True)
    if teacher:
        shutil.copy(teacher, runs / "teacher" / "teacher.safetensors")
    else:
        train_teacher(TrainTeacherConfig(out=str(runs / "teacher"), steps=300, batch_size=256))
    if pairs:
        shutil.copytree(pairs, runs / "pairs")
    else:
        make_pairs(
            MakePairsConfig(
                teacher_path=str(runs / "teacher" / "teacher.safetensors"),
                out=str(runs / "pairs"),
                num_pairs=256,
                shard_size=64,
                steps=8,
            )
        )
    train_teacher(TrainTeacherConfig(out=str(runs / "other"), steps=5, seed=1))
    digits = KINDS["digits"]
    _, base = preset_config("digits")
    torch.manual_seed(0)
    for name, res in (("digits", 8), ("digits16", 16)):
        config = dict(base, resolution=res)
        save_teacher(digits.build(config), digits, config, runs / name / "teacher.safetensors")
    make_pairs(
        MakePairsConfig(
            teacher_path=str(runs / "digits16" / "teacher.safetensors"),
            out=str(runs / "digits16-pairs"),
            num_pairs=4,
            shard_size=4,
            steps=2,
        )
    )
    shutil.copytree(runs / "pairs", runs / "pairs-corrupt")
    shard = runs / "pairs-corrupt" / "pairs-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    args = dict(
        teacher_path=str(runs / "teacher" / "teacher.safetensors"),
        pairs=str(runs / "pairs"),
        out=str(runs / "run"),
        steps=4,
        batch_size=16,
        pair_batch_size=16,
        plot_samples=0,
        checkpoint_every=4,
    )
    distill(DistillConfig(**args))
    build_real_sources(runs / "real")
    build_edm2(runs / "edm2")
    (runs / "prompts.txt").write_text("a red dog\nthe blue sky\n")
    (runs / "prompts-bad.jsonl").write_text('{"caption": "a"}\n\n{"image": "x.png"}\n')
    (runs / "garbage.safetensors").write_bytes(b"not a safetensors file")
    (runs / "afile.txt").write_text("just a file\n")
    (runs / "bad.toml").write_text("steps = [\n")
    (runs / "unknown.toml").write_text("num_pairz = 3\n")


def build_edm2(folder: Path) -> None:
    """Tiny random EDM2 teachers (16 px, 10 classes; an unconditional, a smaller and a 32 px
    one) and pickles in EDM2's record format: a latent network, and two bad files."""
    import numpy as np

    from dmdctl.teachers import KINDS, save_teacher
    from test_edm import Persistent, RunsShell
    from test_edm2 import LATENT, TINY, encoder_record, random_net, tiny, write_edm2_pickle

    folder.mkdir(parents=True)
    kind = KINDS["edm2"]
    nets = {"teacher": TINY, "uncond": dict(TINY, label_dim=0), "small": tiny(model_channels=8),
            "big": dict(TINY, img_resolution=32)}  # fmt: skip
    for seed, (name, config) in enumerate(nets.items()):
        den = kind.build(config)
        den.backbone.load_state_dict(random_net(config, seed).state_dict())
        save_teacher(den, kind, config, folder / f"{name}.safetensors")
    write_edm2_pickle(folder / "latent.pkl", random_net(LATENT), LATENT)
    rogue = {"x": Persistent("DhariwalUNet", {"_init_args": (), "_init_kwargs": {}})}
    write_edm2_pickle(folder / "mixed.pkl", random_net(), TINY, extra=rogue)
    evil = np.array([RunsShell(folder / "pwned")], dtype=object)
    write_edm2_pickle(folder / "object-array.pkl", random_net(), TINY,
                      encoder=encoder_record(LATENT, scale=evil))  # fmt: skip


def build_real_sources(real: Path) -> None:
    """Good and bad sources for prepare-real, tiny SD and FLUX.1 pipelines (runs/sd, runs/flux)
    and a store made from runs/real/digits.npz for the digits teacher (runs/real/store)."""
    import json

    import numpy as np
    from PIL import Image

    from dmdctl.commands.prepare_real import prepare_real
    from dmdctl.settings.prepare_real import PrepareRealConfig
    from dmdctl.teachers.sd.testing import build_flux_pipeline, build_pipeline

    build_pipeline(real.parent / "sd")
    build_flux_pipeline(real.parent / "flux")
    from dmdctl.teachers.wan.testing import build_wan_pipeline

    build_wan_pipeline(real.parent / "wan")
    from dmdctl.commands.make_pairs import make_pairs
    from dmdctl.settings.make_pairs import MakePairsConfig

    (real.parent / "wan-prompts.txt").write_text("a red dog\n")
    make_pairs(
        MakePairsConfig(
            teacher_path=str(real.parent / "wan"),
            prompts=str(real.parent / "wan-prompts.txt"),
            video_size="5x32x32",
            scheduler="unipc",
            guidance=3.5,
            out=str(real.parent / "wan-pairs"),
            num_pairs=2,
            steps=1,
            device="cpu",
        )
    )
    from dmdctl.generators import save_generator
    from dmdctl.teachers import resolve_teacher

    wan = resolve_teacher(None, real.parent / "wan", video_size="5x32x32")  # as a generator
    save_generator(
        wan.denoiser, "wan", wan.config, wan.sha256, real.parent / "wan-generator.safetensors"
    )
    real.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 20)
    np.savez(real / "digits.npz", images, labels)
    np.savez(real / "digits-b.npz", images[::-1], labels[::-1])
    np.savez(real / "no-arr0.npz", images=images)
    np.savez(real / "float.npz", images.astype(np.float32), labels)
    np.savez(real / "bad-labels.npz", images, np.where(np.arange(20) == 3, 12, labels))
    np.savez(real / "unlabelled.npz", images)
    (real / "images").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
            real / "images" / f"{i}.png"
        )
    good = json.dumps({"file": "0.png", "caption": "a red dog"})
    lines = {
        "cap-not-json": [good, "{file: 1.png}"],
        "cap-not-text": [good, json.dumps({"file": "1.png", "caption": 7})],
        "cap-missing": [good, json.dumps({"file": "1.png", "caption": "x"}),
                        json.dumps({"file": "gone.png", "caption": "x"})],
        "cap-corrupt": [good, json.dumps({"file": "1.png", "caption": "the blue sky"})],
    }  # fmt: skip
    for name, rows in lines.items():
        shutil.copytree(real / "images", real / name)
        (real / name / "captions.jsonl").write_text("\n".join(rows) + "\n")
    (real / "cap-corrupt" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    prepare_real(PrepareRealConfig(str(real / "digits.npz"), teacher="digits",
                                   out=str(real / "store"), shard_size=16))  # fmt: skip


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@contextlib.contextmanager
def failure(name: str | None):
    """Simulated failures: the named write raises ENOSPC (disk full)."""
    if name is None:
        yield
        return
    target = {
        "shard-enospc": "dmdctl.data.pairs.save_file",
        "checkpoint-enospc": "dmdctl.training.checkpoint.save_file",
    }
    with mock.patch(target[name], _enospc):
        yield


def run_case(case: Case) -> tuple[int, list[str]]:
    """Run one case in this process (cwd = the env root): (exit code, non-empty stderr lines)."""
    from typer.testing import CliRunner

    from dmdctl.cli import app

    with failure(case.patch):
        r = CliRunner().invoke(app, case.argv)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    if case.writes:  # a run that started says what it runs (its length, its data) before failing
        starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
        lines = lines[starts[0] :] if starts else lines
    return r.exit_code, lines


def normalise(message: str) -> str:
    """Hashes differ between machines (a teacher trained elsewhere): hide them."""
    return re.sub(r"\b[0-9a-f]{12}\b", "<sha>", message)


def render_row(case: Case, message: str) -> str:
    cell = normalise(message).replace("|", "\\|")
    return f"| `{case.id}` | {case.what} | `{case.shown}` | `` {cell} `` |"


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root, with size and modification time for files."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        if p.is_file()
        else (-1, 0)
        for p in sorted(root.rglob("*"))
    }


# --- the test ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(toy_teacher, toy_pairs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        build_env(root, toy_teacher, toy_pairs)
    finally:
        os.chdir(cwd)
    return root


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(case, env, monkeypatch):
    doc = DOC.read_text() if DOC.is_file() else ""
    if case.launcher:  # run for real in tests/test_multiprocess.py; here only its documented row
        assert render_row(case, case.expect) in doc, f"docs/ERRORS.md is stale: run {SCRIPT}"
        return
    if case.skip_if_cuda and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(env)
    before = snapshot(env)
    code, lines = run_case(case)
    assert code == 2, (code, lines)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and case.expect in lines[0], lines[0]
    out = env / case.out
    if case.writes:
        # the run had started: its folder may exist, but no temporary or half-written file
        leftovers = [p for p in out.rglob("*") if ".tmp" in p.name or p.name == ".progress"]
        assert not leftovers, leftovers
        if (out / "checkpoints").is_dir():
            assert not any((out / "checkpoints").iterdir())
        shutil.rmtree(out, ignore_errors=True)
    assert not out.exists()
    assert snapshot(env) == before  # nothing else created, changed or removed
    assert render_row(case, lines[0]) in doc, f"docs/ERRORS.md is stale: run {SCRIPT}"


def test_there_are_enough_documented_cases():
    assert len(CASES) >= 20
    assert len({c.id for c in CASES}) == len(CASES)
