"""``dmdctl make-pairs``: run the teacher's deterministic ODE sampler on seeded noise.

Several processes (``accelerate launch`` / ``torchrun``) split the missing shards between them
(process r makes every world-th missing shard); the main process keeps manifest.json. SIGTERM or
SIGINT stops at the next batch: the unfinished shard is dropped, the complete ones are recorded,
and running the same command again (in any number of processes) makes only what is missing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import PROCESS_GROUP_TIMEOUT, StopRequested, check_launch, use_cpu
from .config import write_config
from .errors import UserError, require
from .pairs import DTYPES, PairWriter
from .runtime import claim_output, holds_output
from .sampling import class_labels, heun_nfe, heun_sample, karras_sigmas, seeded_noise
from .teachers import resolve_teacher
from .ui import progress


def check_out_folder(out: Path, flag: str = "--out") -> None:
    """Refuse an output path that cannot become a folder, before anything is computed or written."""
    out = Path(out)
    if out.exists():
        require(out.is_dir(), f"{flag} {out} is a file, not a folder; choose another {flag}")
        require(os.access(out, os.W_OK), f"{flag} {out} is not writable; choose another {flag}")
        return
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    require(
        parent.is_dir(),
        f"{flag} {out} cannot be created: {parent} is a file; choose another {flag}",
    )
    require(
        os.access(parent, os.W_OK),
        f"{flag} {out} cannot be created: {parent} is not writable; choose another {flag}",
    )


def check_teacher_path(path: str | None, teacher: str | None = None) -> None:
    """--teacher-path must name a readable file (checked before anything is loaded).

    Stable Diffusion teachers are a diffusers pipeline folder or a hub id instead.
    """
    if path is None:
        return
    from .sd.pipeline import is_pipeline_folder, looks_like_hub_id
    from .teachers.sd import is_sd_name

    p = Path(path)
    if is_pipeline_folder(p) or (is_sd_name(teacher) and looks_like_hub_id(str(path))):
        return
    if is_sd_name(teacher):
        raise UserError(
            f"--teacher-path {p} is neither a diffusers pipeline folder (with model_index.json) "
            "nor a hub id like stable-diffusion-v1-5/stable-diffusion-v1-5"
        )
    require(
        p.exists(),
        f"teacher file not found: {p} (check the path, or train one with "
        "`dmdctl train-teacher toy2d --out DIR`)",
    )
    require(
        not p.is_dir(),
        f"--teacher-path {p} is a folder; pass the teacher file in it (e.g. {p / 'teacher.safetensors'})",
    )
    require(
        p.suffix.lower() != ".pkl",
        f"--teacher-path {p} is a pickle, which dmdctl does not load (pickles can run code); "
        f"convert an NVlabs EDM checkpoint with `dmdctl convert-edm {p} -o teacher.safetensors`",
    )
    require(
        not p.is_file() or os.access(p, os.R_OK),
        f"--teacher-path {p} is not readable (permission denied)",
    )


@dataclass
class MakePairsConfig:
    teacher: str | None = None
    teacher_path: str | None = None
    out: str = "runs/pairs"
    num_pairs: int = 4096
    seed: int = 0
    steps: int = 0
    rho: float = 7.0
    shard_size: int = 1024
    batch_size: int = 1024
    dtype: str = "float32"
    device: str = "auto"
    # text-to-image (Stable Diffusion) teachers
    prompts: str | None = None
    scheduler: str = "pndm"
    # None: the teacher's pairs recipe (SD: 3.0, the DMD paper's, equal to its real score's)
    guidance: float | None = None
    save_images: bool = False
    offline: bool = False

    def validate(self) -> None:
        require(self.num_pairs > 0, f"--num-pairs must be positive, got {self.num_pairs}")
        require(
            self.steps >= 0, f"--steps must be >= 0 (0: the teacher's default), got {self.steps}"
        )
        require(
            self.guidance is None or self.guidance >= 1,
            f"--guidance must be >= 1 (1: no guidance), got {self.guidance}",
        )
        require(self.shard_size > 0, f"--shard-size must be positive, got {self.shard_size}")
        require(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        require(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        require(
            self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"
        )
        require(self.rho > 0, f"--rho must be positive, got {self.rho}")
        check_device(self.device)
        check_teacher_path(self.teacher_path, self.teacher)
        check_out_folder(Path(self.out))


def check_device(name: str) -> None:
    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(
            f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        require(
            torch.cuda.is_available(),
            f"--device {name}: no CUDA GPU is available here; use --device cpu or auto",
        )
        require(
            dev.index is None or dev.index < torch.cuda.device_count(),
            f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)",
        )


def pick_device(name: str, state=None) -> torch.device:
    """``auto``: this process's accelerator (one GPU per process when launched several times)."""
    world = state.num_processes if state is not None else 1
    if name == "auto" or (name == "cuda" and world > 1):
        if state is not None:
            return state.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if world > 1 and dev.type != "cpu":
        raise UserError(
            f"--device {name} with {world} processes would put them all on one device; "
            "use --device auto (one GPU per process)"
        )
    return dev


def process_state(cpu: bool = False):
    """Accelerate's view of the launch (1 process unless started by accelerate launch/torchrun)."""
    from accelerate import PartialState

    state = PartialState(cpu=use_cpu(cpu), timeout=PROCESS_GROUP_TIMEOUT)
    check_launch(state.num_processes)
    return state


class HeunPairs:
    """Built-in and EDM teachers: Heun's method on the Karras schedule, conditions = labels."""

    def __init__(self, teacher, steps: int, rho: float):
        self.denoiser = teacher.denoiser
        self.sigmas = karras_sigmas(steps, teacher.sigma_min, teacher.sigma_max, rho)
        self.num_conditions = teacher.num_classes
        self.nfe = heun_nfe(steps)
        self.settings = {
            "name": "heun",
            "steps": steps,
            "nfe": self.nfe,
            "sigma_min": teacher.sigma_min,
            "sigma_max": teacher.sigma_max,
            "rho": rho,
        }

    def __call__(self, z, c_idx, device) -> dict[str, torch.Tensor]:
        c = c_idx.to(device) if self.num_conditions else None
        return {"target": heun_sample(self.denoiser, z, self.sigmas, c)}


class PromptPairs:
    """Stable Diffusion: the pipeline's scheduler with CFG; conditions index the prompt table."""

    def __init__(self, teacher, cfg: MakePairsConfig, out: Path, device, main: bool, state):
        from .sd.pipeline import SchedulerSampler, load_prompt_table, prompt_table

        require(
            cfg.prompts is not None,
            "a text-to-image teacher needs --prompts FILE (one prompt per line, or JSONL with "
            "a 'caption' field)",
        )
        if main:  # the text encoder runs once; the other processes read its cache
            self.table = prompt_table(teacher, Path(cfg.prompts), out, device)
        state.wait_for_everyone()
        if not main:
            self.table = load_prompt_table(out)
        self.denoiser = teacher.denoiser
        self.teacher = teacher
        self.save_images = cfg.save_images
        self.num_conditions = len(self.table)
        self.sampler = SchedulerSampler(
            teacher.denoiser.unet,
            teacher.config["scheduler_config"],
            cfg.scheduler,
            cfg.steps,
            cfg.guidance,
            self.table.uncond,
        )
        self.nfe = self.sampler.nfe
        self.settings = {
            "name": cfg.scheduler,
            "steps": cfg.steps,
            "nfe": self.nfe,
            "guidance": cfg.guidance,
            "prompts": {"count": len(self.table), "key": self.table.sha256},
            "images": cfg.save_images,
        }

    def __call__(self, z, c_idx, device) -> dict[str, torch.Tensor]:
        emb = self.table.embeddings[c_idx].to(device)
        out = {"target": self.sampler(z, emb)}
        if self.save_images:
            with torch.no_grad():
                img = self.teacher.codec.decode(out["target"])
            out["image"] = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return out


def pairs_guidance(kind, name: str | None) -> float:
    """CFG of the teacher's pairs when --guidance is not given: the named preset's pairs recipe,
    else the first of the kind's presets that has one (pairs exist for DMD v1 recipes only)."""
    presets = kind.presets()
    order = ([name] if name in presets else []) + list(presets)
    for key in order:
        pairs = presets[key].get("pairs")
        if pairs is not None:
            return float(pairs["guidance"])
    return 1.0


@holds_output
def make_pairs(cfg: MakePairsConfig) -> dict:
    cfg.validate()
    teacher = resolve_teacher(
        cfg.teacher, Path(cfg.teacher_path) if cfg.teacher_path else None, cfg.offline
    )
    if cfg.steps == 0:
        cfg.steps = teacher.kind.default_steps_for(teacher.config)
    if cfg.guidance is None:
        cfg.guidance = pairs_guidance(teacher.kind, cfg.teacher)
    state = process_state(cpu=cfg.device == "cpu")
    main, rank, world = state.is_main_process, state.process_index, state.num_processes
    device = pick_device(cfg.device, state)
    out = Path(cfg.out)
    claim_output(out, "make-pairs", state)  # one writer per folder, until make_pairs returns
    if teacher.text_conditioned:
        sampler = PromptPairs(teacher, cfg, out, device, main, state)
        if cfg.save_images:
            teacher.codec.vae.to(device)
    else:
        require(
            cfg.prompts is None, f"--prompts is for text-to-image teachers, not '{teacher.name}'"
        )
        sampler = HeunPairs(teacher, cfg.steps, cfg.rho)
    settings = {
        "teacher": {"kind": teacher.name, "sha256": teacher.sha256, "config": teacher.config},
        "sampler": sampler.settings,
        "seed_start": cfg.seed,
        "num_pairs": cfg.num_pairs,
        "shard_size": cfg.shard_size,
        "dtype": cfg.dtype,
        "sample_shape": list(teacher.sample_shape),
        "num_classes": sampler.num_conditions,
    }
    # the main process checks the folder, verifies its shards and merges what a killed run left;
    # the others read the result, and nobody writes a shard before everybody has read it
    writer = PairWriter(out, settings, main=main)
    if main:
        write_config(cfg, out)
    state.wait_for_everyone()
    if not main:
        writer.reload()
    todo = writer.missing()
    done_before = writer.complete_pairs
    state.wait_for_everyone()
    mine = todo[rank::world]
    teacher.denoiser.to(device)
    t0 = time.perf_counter()
    made = 0
    stopped = None
    with StopRequested() as stop, progress(disable=None if main else True) as bar:
        task = bar.add_task("make-pairs", total=cfg.num_pairs, completed=done_before, info="")
        for index in mine:
            seeds = writer.shard_seeds(index)
            noise = seeded_noise(seeds, teacher.sample_shape)
            cond = class_labels(seeds, cfg.seed, sampler.num_conditions)
            made_here: dict[str, list[torch.Tensor]] = {}  # target (and SD's decoded image)
            for i in range(0, len(seeds), cfg.batch_size):
                if stop.signal is not None:
                    break  # drop the unfinished shard: a re-run makes it again
                z = noise[i : i + cfg.batch_size].to(device)
                for k, v in sampler(z, cond[i : i + cfg.batch_size], device).items():
                    made_here.setdefault(k, []).append(v.cpu())
                bar.advance(task, z.shape[0] * world)
            if stop.signal is not None:
                stopped = stop.name
                break
            made_now = {k: torch.cat(v) for k, v in made_here.items()}
            tensors = {
                "noise": noise,
                "target": made_now.pop("target").to(DTYPES[cfg.dtype]),
                "cond": cond,
                "seed": torch.tensor(seeds, dtype=torch.int64),
                **made_now,
            }
            writer.write_shard(index, tensors)
            made += len(seeds)
            bar.update(task, info=f"shard {index + 1}/{writer.num_shards}")
    elapsed = time.perf_counter() - t0
    state.wait_for_everyone()  # every process's shards are on disk (or dropped)
    if main:
        writer.merge()
    result = {
        "out": str(out),
        "pairs": cfg.num_pairs,
        "complete_pairs": writer.complete_pairs if main else "-",
        "made_now": writer.complete_pairs - done_before if main else made,
        "resumed_after_shard": (todo[0] if todo else writer.num_shards) if done_before else "-",
        "shards": writer.num_shards,
        "processes": world,
        "nfe_per_pair": sampler.nfe,
        "pairs_per_s": round(made * world / elapsed, 1) if made else "-",
    }
    if writer.remade:
        result["remade_shards"] = len(writer.remade)
    if stopped is not None:
        result["interrupted"] = stopped
    return result
