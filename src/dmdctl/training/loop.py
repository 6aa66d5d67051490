"""The distillation run around :class:`~dmdctl.training.trainer.DMDTrainer`: output folder,
resume from a checkpoint, the step loop with logging, checkpoints, sample plots and evaluations,
and a clean stop on SIGTERM/SIGINT (a checkpoint, then exit 143/130).
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from safetensors import SafetensorError

from dmdctl.config import write_config
from dmdctl.core.lpips_loss import RANDOM_BACKBONE_NOTE
from dmdctl.errors import DataError, UserError
from dmdctl.files import describe_os_error
from dmdctl.generators import save_generator
from dmdctl.inputs import resolve_input_paths
from dmdctl.runtime import (
    PROCESS_GROUP_TIMEOUT,
    StopRequested,
    check_launch,
    claim_output,
    holds_output,
    refuse_sharding,
    release_on_return,
    use_cpu,
)
from dmdctl.settings.distill import DistillConfig
from dmdctl.teachers import preset_of, preset_source
from dmdctl.teachers.source import run_length_line
from dmdctl.training.checkpoint import (
    append_line,
    config_differences,
    find_checkpoint,
    list_checkpoints,
    read_checkpoint_state,
    trim_log,
)
from dmdctl.training.trackers import RunTrackers
from dmdctl.training.trackers import accelerator_kwargs as tracker_kwargs
from dmdctl.training.trainer import DMDTrainer, _forget_other_precision
from dmdctl.ui import info, progress

# with several processes a SIGTERM is acted on at a step all of them agree on: the next log,
# checkpoint or evaluation step, or the next multiple of this (a launcher's grace period before
# SIGKILL is often ~30 s: torchrun's, SLURM's default KillWait)
STOP_CHECK_EVERY = 10
PLOT_SEED_START = 10_000_000  # fixed noise for the sample plots, far from the pairs' seeds


def plot_samples(trainer: DMDTrainer, path: Path) -> Path | None:
    n = trainer.cfg.plot_samples
    if n == 0:
        return None
    t = trainer.teacher
    g = trainer.ema_generator()
    seeds = list(range(PLOT_SEED_START, PLOT_SEED_START + n))
    k = trainer.num_conditions
    c = (torch.arange(n, device=trainer.device) % k) if k else None
    with torch.no_grad():
        x = g.sample(seeds, trainer._cond(c), t.sample_shape, trainer.device).float()
        if t.codec.latent:
            vae = t.codec.vae  # on the accelerator only while it decodes
            home = next(vae.parameters()).device
            vae.to(trainer.device)
            x = t.codec.decode(x)
            vae.to(home)
        x = x.cpu()
    if t.text_conditioned:
        c = None  # prompts, not classes: one plain grid
    return trainer.teacher.kind.save_plot(
        [(f"DMD step {trainer.step} (EMA)", x)],
        path,
        trainer.teacher.config,
        labels=c.cpu() if c is not None else None,
    )


def evaluate_generator(trainer: DMDTrainer) -> dict:
    """FID (and the kind's quality metrics) of the current EMA generator, for FID-vs-step curves."""
    from dmdctl.generators import Source
    from dmdctl.metrics.evaluate import evaluate
    from dmdctl.settings.eval_fid import EvalFidConfig

    t = trainer.teacher
    g = trainer.ema_generator()
    source = Source(t.kind, t.config, f"DMD step {trainer.step} (EMA)", g.num_steps, g)
    res = evaluate(
        EvalFidConfig(num_samples=trainer.cfg.eval_samples, device=str(trainer.device)),
        source,
        show_progress=False,
    )
    keep = {
        k: v
        for k, v in res.items()
        if isinstance(v, (int, float)) and k not in ("nfe", "seed_start")
    }
    return {f"eval_{k}": v for k, v in keep.items()}


# settings a resumed run must share with its checkpoint: the networks and optimiser states only
# fit the same teacher and fake-score setting (checked in DMDTrainer.resume / below), and the
# step-seeded draws only continue the same run with the same global batch sizes
RESUME_MUST_MATCH = (
    "batch_size",
    "pair_batch_size",
    "denoising_steps",
    "conditioning_timestep",
    # LoRA: a checkpoint holds adapters of this shape and scale only (training/lora.py)
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "fake_lora_rank",
    # SD3 without T5: the cached prompt embeddings and the generator's conditioning differ
    "no_t5",
    # video teachers: the networks' samples are of this size
    "video_size",
)


def check_resume(ckpt: Path, cfg: DistillConfig) -> dict:
    """Compare a checkpoint's saved config with this run's before anything is built."""
    state = read_checkpoint_state(ckpt)
    diffs = config_differences(state.get("config", {}), asdict(cfg), RESUME_MUST_MATCH)
    fake_then = "fake" in state.get("optimizers", {})
    fake_now = cfg.dm_weight > 0 and not cfg.real_only
    if fake_then != fake_now:
        on = {True: "on", False: "off"}
        diffs.append(
            f"fake score {on[fake_then]} there, {on[fake_now]} now (--dm-weight, --real-only)"
        )
    gan_then, gan_now = bool(state.get("gan", False)), cfg.gan_weight > 0
    if gan_then != gan_now:
        on = {True: "on", False: "off"}
        diffs.append(
            f"GAN head {on[gan_then]} there, {on[gan_now]} now (--gan-weight; to add the GAN to "
            "a trained run, start a new one with --init-from)"
        )
    if diffs:
        raise UserError(
            f"checkpoint {ckpt} comes from a run with other settings: {'; '.join(diffs)}. "
            "Resume with the same values, or start a new run with another --out"
        )
    step = int(state.get("step", 0))
    if step > cfg.steps:
        raise UserError(
            f"checkpoint {ckpt} is at step {step}, past --steps {cfg.steps}; "
            f"pass --steps {step} or more to continue it"
        )
    return state


class StepWatch:
    """Watches every step for non-finite losses and gradients without a host sync per step.

    Each step adds device-side flags (a few tiny tensor ops queued behind the step itself); the
    host reads them only at log, checkpoint and evaluation steps, where it waits anyway, in one
    gather that also carries the other processes' flags, their stop requests, and the losses
    (averaged over processes, so a 2-process log matches a 1-process one).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list[str] | None = None

    def add(self, logs: dict[str, torch.Tensor], step: int) -> None:
        skipped = logs.pop("skipped", None)
        skipped_fake = logs.pop("skipped_fake", None)
        if self.names is None:
            self.names = list(logs)
            self.bad = torch.zeros(len(self.names), device=self.device)
            self.first_bad = torch.full((1,), -1.0, device=self.device)
            self.skipped = torch.zeros(2, device=self.device)
        self.last = torch.stack([logs[k].detach().float().reshape(()) for k in self.names])
        bad = ~torch.isfinite(self.last)
        self.bad += bad
        self.first_bad = torch.where((self.first_bad < 0) & bad.any(), float(step), self.first_bad)
        if skipped is not None:
            self.skipped[0] += skipped
        if skipped_fake is not None:
            self.skipped[1] += skipped_fake

    def collect(self, acc: Accelerator, stop_signal: int | None, bad_records: int = 0) -> dict:
        n = len(self.names)
        stop = torch.tensor([float(stop_signal or 0)], device=self.device)
        records = torch.tensor([float(bad_records)], device=self.device)
        packet = torch.cat([self.last, self.bad, self.first_bad, self.skipped, stop, records])
        rows = acc.gather(packet[None]).cpu().double().reshape(-1, packet.numel())
        firsts = [v for v in rows[:, 2 * n].tolist() if v >= 0]
        return {
            "values": dict(zip(self.names, rows[:, :n].mean(0).tolist(), strict=True)),
            "bad": [
                k for k, b in zip(self.names, rows[:, n : 2 * n].sum(0).tolist(), strict=True) if b
            ],
            "first_bad": int(min(firsts)) if firsts else None,
            "skipped": int(rows[:, 2 * n + 1].max()),
            "skipped_fake": int(rows[:, 2 * n + 2].max()),
            "stop": int(rows[:, 2 * n + 3].max()) or None,
            "bad_records": int(rows[:, 2 * n + 4].sum()),
        }


def run_length(cfg: DistillConfig) -> str:
    """The start-of-run line: --steps in generator steps and in DMD2 iterations and, for a
    preset, the published checkpoint its length comes from."""
    found = preset_of(cfg.teacher, cfg.teacher_path)
    preset = found[1] if found is not None else None
    source = preset_source(preset) if preset is not None else None
    return run_length_line(cfg.steps, cfg.fake_updates, preset, source)


def _json_value(v: float):
    return v if math.isfinite(v) else None  # JSON has no NaN/inf


@holds_output
def distill(cfg: DistillConfig, accelerator: Accelerator | None = None) -> dict:
    cfg.validate()
    out = Path(cfg.out)
    # every check that needs no network comes first: nothing is built or written before it
    ckpt = None
    if cfg.resume:
        ckpt = find_checkpoint(out, cfg.resume)
        check_resume(ckpt, cfg)
    elif list_checkpoints(out / "checkpoints"):
        raise UserError(
            f"{out} already holds checkpoints of a run; pass --resume latest to continue it, "
            "or choose another --out"
        )
    refuse_sharding(accelerator)  # FSDP/DeepSpeed configs: refused before anything is built
    if accelerator is None:
        _forget_other_precision(cfg.mixed_precision)
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            cpu=use_cpu(cfg.cpu),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)],
            **tracker_kwargs(cfg.report_to, out),
        )
    check_launch(accelerator.num_processes)
    claim_output(out, "distill", accelerator)  # one writer per run folder, until distill returns
    trainer = DMDTrainer(cfg, accelerator)
    acc = trainer.acc
    main = acc.is_main_process
    resumed_from = trainer.resume(str(ckpt)) if ckpt is not None else None
    log_path = out / "log.jsonl"
    trackers = release_on_return(
        RunTrackers(acc, cfg.report_to, "dmdctl-distill", asdict(cfg), out)
    )
    # every input was checked (messages name paths as given); the run records them resolved
    resolve_input_paths(cfg, ("teacher_path", "pairs", "prompts", "real_data", "init_from"))
    if main:
        write_config(cfg, out)
        info(run_length(cfg))
        # rows past the checkpoint (a run killed after it) are written again by this run
        dropped = trim_log(log_path, trainer.step)
        if trainer.lpips is not None and trainer.lpips.random_backbone:
            info(
                f"[bold red]warning:[/bold red] regression loss uses LPIPS with a {RANDOM_BACKBONE_NOTE}"
            )
        if cfg.pairs is not None and trainer.pairs is None:
            info(
                f"[bold red]warning:[/bold red] --pairs {cfg.pairs} is not used: --reg-weight is 0"
            )
        if trainer.text_mode:
            info(trainer.text_mode)
        if trainer.real_data is not None:
            info(f"GAN real data: {trainer.real_data.description}")
        if trainer.initialised_from is not None:
            info(f"initialised from {trainer.initialised_from} (fresh optimisers, step 0)")
        if resumed_from:
            note = f"; dropped {dropped} log rows past it" if dropped else ""
            info(f"resumed from {resumed_from} (step {trainer.step}){note}")
    fp16 = cfg.mixed_precision == "fp16"
    watch = StepWatch(acc.device)
    t_start = time.perf_counter()
    t_last, step_last = t_start, trainer.step
    log_step, log_skipped = trainer.step, 0
    last: dict[str, float] = {}
    skipped: dict[str, int] = {}
    interrupted = None
    with StopRequested() as stop, progress(disable=None if main else True) as bar:
        task = bar.add_task("distill", total=cfg.steps, completed=trainer.step, info="")
        while trainer.step < cfg.steps:
            try:
                logs = trainer.train_step()
            except DataError as e:
                found = list_checkpoints(out / "checkpoints")
                raise DataError(
                    f"{e}; stopped at step {trainer.step + 1} without saving: the last "
                    f"checkpoint ({found[-1] if found else 'none yet'}) is intact. Restore the "
                    "file and resume with --resume latest, or pass --skip-bad-records to "
                    "replace such records (counted in log.jsonl)"
                ) from None
            step = trainer.step
            watch.add(logs, step)
            is_log = step % cfg.log_every == 0 or step == cfg.steps
            is_ckpt = step % cfg.checkpoint_every == 0 or step == cfg.steps
            is_eval = bool(cfg.eval_every) and (step % cfg.eval_every == 0 or step == cfg.steps)
            # one process alone may act on its stop flag at once; several agree at the next sync
            if acc.num_processes == 1:
                stop_here = stop.signal is not None
            else:
                stop_here = step % STOP_CHECK_EVERY == 0
            if not (is_log or is_ckpt or is_eval or stop_here):
                bar.update(task, completed=step)
                continue
            seen = watch.collect(acc, stop.signal, trainer.guard.count)
            bad = [k for k in seen["bad"] if not (fp16 and k.startswith("grad_norm"))]
            if bad and not cfg.skip_nonfinite:
                found = list_checkpoints(out / "checkpoints")
                raise UserError(
                    f"non-finite {', '.join(bad)} at step {seen['first_bad']} (checked at step "
                    f"{step}): stopped without saving; the last good checkpoint "
                    f"({found[-1] if found else 'none yet'}) is intact. Resume it with a lower "
                    "--lr (--resume latest), or pass --skip-nonfinite to skip such steps"
                )
            skipped = {
                "skipped_steps": trainer.skipped_steps + seen["skipped"],
                "skipped_fake_updates": trainer.skipped_fake_updates + seen["skipped_fake"],
            }
            if is_log:
                if cfg.skip_nonfinite and step - log_step >= cfg.log_every:
                    if seen["skipped"] - log_skipped >= step - log_step:
                        raise UserError(
                            f"every step from {log_step + 1} to {step} had a non-finite loss or "
                            "gradient and was skipped (--skip-nonfinite): training is stuck. "
                            "Check the teacher and pairs, or resume with a lower --lr"
                        )
                log_step, log_skipped = step, seen["skipped"]
                values = seen["values"]
                now = time.perf_counter()
                rate = (step - step_last) * cfg.batch_size / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                last = dict(values, samples_per_s=rate, lr=trainer.opt_g.param_groups[0]["lr"])
                if cfg.skip_nonfinite:
                    last.update(skipped)
                if cfg.skip_bad_records:
                    last["bad_records"] = seen["bad_records"]
                if main:
                    row = {"step": step, **{k: _json_value(v) for k, v in last.items()}}
                    if trainer.lpips is not None and trainer.lpips.random_backbone:
                        row["warning"] = RANDOM_BACKBONE_NOTE
                    append_line(log_path, json.dumps(row))
                    trackers.log(row)
                bar.update(
                    task,
                    completed=step,
                    info=" ".join(
                        f"{k.replace('loss_', '')} {v:.3g}"
                        for k, v in values.items()
                        if k.startswith("loss")
                    ),
                )
            else:
                bar.update(task, completed=step)
            if is_eval:
                trainer.gather_ema()  # --fsdp: every process takes part; no-op otherwise
                if main:
                    row = evaluate_generator(trainer)
                    append_line(log_path, json.dumps({"step": step, **row}))
                    trackers.log({"step": step, **row})
                    last.update(row)
                # the others wait here, at a barrier with a generous timeout (not inside DDP)
                acc.wait_for_everyone()
                t_last = time.perf_counter()  # evaluation time is not training throughput
            if is_ckpt or seen["stop"]:
                trainer.save(extra=skipped)
                if main:
                    trackers.image(
                        plot_samples(trainer, out / "samples" / f"step-{step:07d}.png"), step
                    )
                acc.wait_for_everyone()
                t_last = time.perf_counter()
            if seen["stop"]:
                interrupted = seen["stop"]
                break
    elapsed = time.perf_counter() - t_start
    result = {
        "out": str(out),
        "step": trainer.step,
        "steps": cfg.steps,
        **{
            k: round(v, 5)
            for k, v in last.items()
            if isinstance(v, (int, float)) and math.isfinite(v)
        },
        "seconds": round(elapsed, 1),
        "reg_loss": (trainer.lpips.description if trainer.lpips is not None else cfg.reg_loss)
        if trainer.pairs is not None
        else "none",
        "reg_weight": cfg.reg_weight,
        "dm_weight": cfg.dm_weight,
        "real_only": cfg.real_only,
        "num_pairs": len(trainer.pairs) if trainer.pairs is not None else 0,
        "generator_steps": len(trainer.sigmas),
        "gan_weight": cfg.gan_weight,
        "processes": acc.num_processes,
    }
    if cfg.skip_nonfinite:
        result.update(skipped)
    if interrupted is not None:
        result["interrupted"] = signal.Signals(interrupted).name
        return result
    trainer.gather_ema()  # --fsdp: the whole EMA, gathered by every process for the main one
    if main:
        t = trainer.teacher
        path = out / "generator.safetensors"
        try:
            network, lora_meta = trainer.file_network()
            save_generator(
                network,
                t.name,
                t.config,
                t.sha256,
                path,
                # the training settings travel with the weights (the diffusers model card)
                extra={
                    "step": str(trainer.step),
                    "ema": "true",
                    "train_config": asdict(cfg),
                    **lora_meta,
                },
                sigmas=trainer.sigmas,
            )
        except (OSError, SafetensorError) as e:
            path.with_name(path.name + ".tmp").unlink(missing_ok=True)
            raise UserError(
                f"could not write {path}: {describe_os_error(e)}; the final checkpoint is saved: "
                f"`dmdctl export {out}` writes the generator from it"
            ) from None
        result["generator"] = str(path)
    acc.wait_for_everyone()
    return result
