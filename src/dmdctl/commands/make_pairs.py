"""``dmdctl make-pairs``: run the teacher's deterministic ODE sampler on seeded noise.

Several processes (``accelerate launch`` / ``torchrun``) split the missing shards between them
(process r makes every world-th missing shard); the main process keeps manifest.json. SIGTERM or
SIGINT stops at the next batch: the unfinished shard is dropped, the complete ones are recorded,
and running the same command again (in any number of processes) makes only what is missing.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dmdctl.commands import report
from dmdctl.config import write_config
from dmdctl.core.sampling import class_labels, seeded_noise, teacher_sampler
from dmdctl.data.pairs import DTYPES, PairWriter
from dmdctl.errors import require
from dmdctl.inputs import resolve_input_paths
from dmdctl.runtime import StopRequested, claim_output, holds_output, pick_device, process_state
from dmdctl.settings.make_pairs import MakePairsConfig
from dmdctl.teachers import resolve_teacher
from dmdctl.ui import progress


class HeunPairs:
    """Built-in and EDM teachers: the teacher's Heun sampler (on the flow ODE for flow-matching
    teachers); conditions are class labels."""

    def __init__(self, teacher, steps: int, rho: float):
        self.sampler = teacher_sampler(teacher.denoiser, steps, rho)
        self.num_conditions = teacher.num_classes
        self.nfe = self.sampler.nfe
        self.settings = self.sampler.settings

    def __call__(self, z, c_idx, device) -> dict[str, torch.Tensor]:
        c = c_idx.to(device) if self.num_conditions else None
        return {"target": self.sampler(z, c)}


class PromptPairs:
    """Stable Diffusion: the pipeline's scheduler with CFG; a pair's condition is a row of the
    prompts file (indexed, never read whole), encoded with the batch that uses it."""

    def __init__(self, teacher, cfg: MakePairsConfig, device):
        from dmdctl.data.prompts import PAIRS_PROMPTS, PromptFile
        from dmdctl.files import sha256_file
        from dmdctl.teachers.sd.pipeline import SchedulerSampler

        require(
            cfg.prompts is not None,
            "a text-to-image teacher needs --prompts FILE (one prompt per line, or JSONL with "
            "a 'caption' field)",
        )
        self.prompts = PromptFile(cfg.prompts, cfg.prompt_column)
        self.encoder = teacher.text_encoder().to(device)
        self.teacher = teacher
        self.save_images = cfg.save_images
        self.num_conditions = len(self.prompts)
        self.sampler = SchedulerSampler(
            teacher.denoiser,
            teacher.config["scheduler_config"],
            cfg.scheduler,
            cfg.steps,
            cfg.guidance,
            self.encoder.uncond(device),
        )
        self.nfe = self.sampler.nfe
        self.settings = {
            "name": cfg.scheduler,
            "steps": cfg.steps,
            "nfe": self.nfe,
            "guidance": cfg.guidance,
            # the pairs' conditions are rows of this file, kept in the pairs folder
            "prompts": {
                "file": PAIRS_PROMPTS + self.prompts.path.suffix.lower(),
                "count": len(self.prompts),
                "column": getattr(self.prompts, "column", None),
                "sha256": sha256_file(self.prompts.path),
            },
            "images": cfg.save_images,
        }

    def keep_prompts(self, folder: Path) -> None:
        from dmdctl.data.prompts import copy_prompts

        copy_prompts(self.prompts, folder)

    def __call__(self, z, c_idx, device) -> dict[str, torch.Tensor]:
        emb = self.encoder(self.prompts.texts(c_idx.tolist()), device)
        out = {"target": self.sampler(z, emb)}
        if self.save_images:
            with torch.no_grad():
                img = self.teacher.codec.decode(out["target"])
            out["image"] = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return out


@holds_output
def make_pairs(cfg: MakePairsConfig) -> dict:
    cfg.validate()
    teacher = resolve_teacher(
        cfg.teacher,
        Path(cfg.teacher_path) if cfg.teacher_path else None,
        cfg.offline,
        cfg.no_t5,
        cfg.video_size,
    )
    if cfg.steps == 0:
        cfg.steps = teacher.kind.default_steps_for(teacher.config)
    if cfg.guidance is None:  # no pairs recipe applies (resolve's preset layer): no guidance
        cfg.guidance = 1.0
    state = process_state(cpu=cfg.device == "cpu")
    main, rank, world = state.is_main_process, state.process_index, state.num_processes
    device = pick_device(cfg.device, state)
    out = Path(cfg.out)
    claim_output(out, "make-pairs", state)  # one writer per folder, until make_pairs returns
    if teacher.text_conditioned:
        sampler = PromptPairs(teacher, cfg, device)
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
    resolve_input_paths(cfg, ("teacher_path", "prompts"))  # recorded resolved, once checked
    if main:
        if teacher.text_conditioned:
            sampler.keep_prompts(out)
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


def run(cfg: MakePairsConfig) -> int | None:
    """Run the command on resolved settings (its help: :data:`dmdctl.settings.make_pairs.HELP`)."""
    return report(
        "make-pairs",
        make_pairs(cfg),
        f": the complete shards are recorded in {Path(cfg.out) / 'manifest.json'} and the "
        "unfinished one was dropped. Resume by running the same command again",
    )
