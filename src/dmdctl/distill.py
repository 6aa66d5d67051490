"""``dmdctl distill``: train a one-step generator with the DMD loss (../shared/docs/DMD.md).

Per step: the generator maps noise to samples x; the frozen teacher (real score) and the
online fake score denoise ``x + sigma * eps``; their difference, normalised per sample, is the
DM gradient carried into the generator by the stop-gradient loss; the regression loss pulls
G(z) onto the teacher's ODE output for the pairs' noise; then the fake score takes
``fake_updates`` denoising steps on detached generator samples.

Every random draw of a step comes from a generator seeded with (seed, step) and is drawn for the
*global* batch, each process taking its slice: a run is reproducible from its step counter alone
(exact resume needs no RNG state) and a 2-process run sees the same numbers as a 1-process run
with the same global batch.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from .checkpoint import find_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .config import write_config
from .denoiser import OneStepGenerator
from .ema import EMA
from .errors import UserError, require
from .generator import save_generator
from .losses import dm_loss, edm_denoising_loss, regression_loss
from .pairs import load_pairs
from .sampling import dmd_sigma_grid, seeded_noise
from .teachers import resolve_teacher
from .ui import info, progress

REG_LOSSES = ("l2", "pseudo-huber", "lpips")
PLOT_SEED_START = 10_000_000  # fixed noise for the sample plots, far from the pairs' seeds


@dataclass
class DistillConfig:
    teacher: str | None = None
    teacher_path: str | None = None
    pairs: str | None = None
    out: str = "runs/distill"
    steps: int = 2000
    batch_size: int = 512
    pair_batch_size: int = 512
    num_pairs: int = 0
    lr: float = 3e-4
    fake_lr: float = 3e-4
    lr_schedule: str = "cosine"
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    reg_loss: str = "l2"
    reg_weight: float = 0.25
    dm_weight: float = 1.0
    real_only: bool = False
    fake_updates: int = 1
    sigma_levels: int = 1000
    min_step_frac: float = 0.02
    max_step_frac: float = 0.98
    ema_decay: float = 0.999
    mixed_precision: str = "no"
    checkpoint_every: int = 500
    keep_checkpoints: int = 0
    log_every: int = 50
    plot_samples: int = 2000
    seed: int = 0
    resume: str | None = None
    cpu: bool = False

    def validate(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "pair_batch_size",
            "fake_updates",
            "sigma_levels",
            "checkpoint_every",
            "log_every",
        ):
            v = getattr(self, name)
            require(v > 0, f"--{name.replace('_', '-')} must be positive, got {v}")
        for name in ("lr", "fake_lr"):
            v = getattr(self, name)
            require(
                v > 0 and math.isfinite(v), f"--{name.replace('_', '-')} must be positive, got {v}"
            )
        for name in (
            "reg_weight",
            "dm_weight",
            "weight_decay",
            "grad_clip",
            "warmup",
            "num_pairs",
            "keep_checkpoints",
            "plot_samples",
        ):
            v = getattr(self, name)
            require(v >= 0, f"--{name.replace('_', '-')} must be >= 0, got {v}")
        require(
            self.reg_loss in REG_LOSSES,
            f"--reg-loss must be one of {', '.join(REG_LOSSES)}, got {self.reg_loss!r}",
        )
        require(
            self.lr_schedule in ("cosine", "constant"),
            f"--lr-schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}",
        )
        require(
            self.mixed_precision in ("no", "bf16", "fp16"),
            f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}",
        )
        require(
            0 <= self.min_step_frac < self.max_step_frac <= 1,
            f"need 0 <= --min-step-frac < --max-step-frac <= 1, got {self.min_step_frac}, {self.max_step_frac}",
        )
        require(0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        require(
            self.dm_weight > 0 or self.reg_weight > 0,
            "both --dm-weight and --reg-weight are 0: nothing to train",
        )
        require(
            self.reg_weight == 0 or self.pairs is not None,
            f"--reg-weight is {self.reg_weight} but no --pairs folder was given "
            "(make one with `dmdctl make-pairs`, or pass --reg-weight 0 to train without regression)",
        )


def lr_multiplier(step: int, cfg: DistillConfig) -> float:
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class StopRequested:
    """Turns SIGTERM/SIGINT into a flag the loop checks, so the run can checkpoint and exit."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class DMDTrainer:
    """Holds the networks, optimisers and EMA of one distillation run."""

    def __init__(self, cfg: DistillConfig, accelerator: Accelerator | None = None):
        self.cfg = cfg
        self.acc = accelerator or Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)
        acc = self.acc
        self.teacher = resolve_teacher(
            cfg.teacher, Path(cfg.teacher_path) if cfg.teacher_path else None
        )
        t = self.teacher
        world = acc.num_processes
        require(
            cfg.batch_size % world == 0,
            f"--batch-size {cfg.batch_size} is not divisible by the {world} processes",
        )
        require(
            cfg.pair_batch_size % world == 0,
            f"--pair-batch-size {cfg.pair_batch_size} is not divisible by the {world} processes",
        )
        self.pairs = None
        if cfg.reg_weight > 0:
            self.pairs = load_pairs(Path(cfg.pairs), t, limit=cfg.num_pairs or None)
        self.lpips = None
        if cfg.reg_weight > 0 and cfg.reg_loss == "lpips":
            raise UserError(
                "--reg-loss lpips needs image teachers; use l2 or pseudo-huber for this teacher"
            )

        self.device = acc.device
        self.real = t.denoiser.to(self.device).eval().requires_grad_(False)
        self.sigma_data = float(self.real.sigma_data)
        generator = OneStepGenerator(
            copy.deepcopy(t.denoiser).requires_grad_(True).train(), t.sigma_max
        )
        self.ema = EMA(generator.denoiser, cfg.ema_decay)
        opt_g = torch.optim.AdamW(
            generator.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay
        )
        self.use_fake = cfg.dm_weight > 0 and not cfg.real_only
        if self.use_fake:
            fake = copy.deepcopy(t.denoiser).requires_grad_(True).train()
            opt_f = torch.optim.AdamW(
                fake.parameters(), lr=cfg.fake_lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay
            )
            self.generator, self.opt_g, self.fake, self.opt_f = acc.prepare(
                generator, opt_g, fake, opt_f
            )
        else:
            self.generator, self.opt_g = acc.prepare(generator, opt_g)
            self.fake = self.opt_f = None
        self.ema_shadow_to(self.device)
        grid = dmd_sigma_grid(t.sigma_min, t.sigma_max, cfg.sigma_levels)
        self.grid = grid.to(self.device)
        self.lo = int(cfg.min_step_frac * cfg.sigma_levels)
        self.hi = max(self.lo + 1, int(cfg.max_step_frac * cfg.sigma_levels))
        self.step = 0
        self.out = Path(cfg.out)

    # --- helpers -------------------------------------------------------------------------
    def ema_shadow_to(self, device) -> None:
        self.ema.shadow = {k: v.to(device) for k, v in self.ema.shadow.items()}

    def _slice(self, x: torch.Tensor) -> torch.Tensor:
        """This process's share of a tensor drawn for the global batch."""
        n = x.shape[0] // self.acc.num_processes
        i = self.acc.process_index
        return x[i * n : (i + 1) * n].to(self.device)

    def _labels(self, n: int, gen: torch.Generator) -> torch.Tensor | None:
        k = self.teacher.num_classes
        return torch.randint(0, k, (n,), generator=gen) if k else None

    def _set_lr(self, step: int) -> None:
        m = lr_multiplier(step, self.cfg)
        for g in self.opt_g.param_groups:
            g["lr"] = self.cfg.lr * m
        if self.opt_f is not None:
            for g in self.opt_f.param_groups:
                g["lr"] = self.cfg.fake_lr * m

    @property
    def unwrapped_generator(self) -> OneStepGenerator:
        return self.acc.unwrap_model(self.generator)

    # --- one training step ---------------------------------------------------------------
    def train_step(self) -> dict[str, torch.Tensor]:
        cfg, acc = self.cfg, self.acc
        gen = step_generator(cfg.seed, self.step)
        shape = self.teacher.sample_shape
        B, P = cfg.batch_size, cfg.pair_batch_size
        self._set_lr(self.step)

        z = self._slice(torch.randn(B, *shape, generator=gen))
        c = self._labels(B, gen)
        c = self._slice(c) if c is not None else None
        sig_idx = self._slice(torch.randint(self.lo, self.hi, (B,), generator=gen))
        eps = self._slice(torch.randn(B, *shape, generator=gen))
        zs, cs = [z], [c]
        if self.pairs is not None:
            pidx = self._slice(torch.randint(0, len(self.pairs), (P,), generator=gen)).cpu()
            zs.append(self.pairs.noise[pidx].to(self.device))
            cs.append(self.pairs.cond[pidx].to(self.device) if c is not None else None)
            y_pair = self.pairs.target[pidx].to(self.device)
        cond_all = torch.cat(cs) if c is not None else None

        logs: dict[str, torch.Tensor] = {}
        with acc.autocast():
            x_all = self.generator(torch.cat(zs), cond_all)
            x = x_all[: z.shape[0]]
            loss_g = x_all.new_zeros((), dtype=torch.float32)
            if cfg.dm_weight > 0:
                with torch.no_grad():
                    sigma = self.grid[sig_idx]
                    noisy = x.detach() + sigma.reshape(-1, *([1] * len(shape))) * eps
                    mu_real = self.real(noisy, sigma, c)
                    if self.use_fake:
                        mu_fake = acc.unwrap_model(self.fake)(noisy, sigma, c)
                    else:
                        # ablation "real score only": the fake score's pull is dropped; x stands in
                        # for mu_fake, which leaves the gradient -s_real (in expectation over eps)
                        mu_fake = x.detach()
                loss_dm = dm_loss(x, mu_real, mu_fake)
                loss_g = loss_g + cfg.dm_weight * loss_dm
                logs["loss_dm"] = loss_dm.detach()
            if self.pairs is not None:
                loss_reg = regression_loss(
                    cfg.reg_loss, x_all[z.shape[0] :], y_pair, lpips_fn=self.lpips
                )
                loss_g = loss_g + cfg.reg_weight * loss_reg
                logs["loss_reg"] = loss_reg.detach()
        acc.backward(loss_g)
        gnorm = acc.clip_grad_norm_(self.generator.parameters(), cfg.grad_clip or float("inf"))
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        self.ema.update(self.unwrapped_generator.denoiser)
        logs["loss_g"] = loss_g.detach()
        logs["grad_norm_g"] = torch.as_tensor(gnorm).detach()

        if self.use_fake:
            x_fake = x.detach()
            for k in range(cfg.fake_updates):
                if k > 0:  # fresh generator samples for each extra fake-score update (TTUR)
                    zk = self._slice(torch.randn(B, *shape, generator=gen))
                    ck = self._labels(B, gen)
                    c = self._slice(ck) if ck is not None else None
                    with torch.no_grad(), acc.autocast():
                        x_fake = self.unwrapped_generator(zk, c)
                # the fake score learns the generator's distribution over the whole noise range
                fidx = self._slice(torch.randint(0, cfg.sigma_levels, (B,), generator=gen))
                feps = self._slice(torch.randn(B, *shape, generator=gen))
                with acc.autocast():
                    loss_f = edm_denoising_loss(
                        self.fake, x_fake.float(), self.grid[fidx], feps, c, self.sigma_data
                    )
                acc.backward(loss_f)
                gnorm_f = acc.clip_grad_norm_(self.fake.parameters(), cfg.grad_clip or float("inf"))
                self.opt_f.step()
                self.opt_f.zero_grad(set_to_none=True)
            logs["loss_fake"] = loss_f.detach()
            logs["grad_norm_fake"] = torch.as_tensor(gnorm_f).detach()
        self.step += 1
        return logs

    # --- checkpoints ---------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        t = self.teacher
        return {
            "config": asdict(self.cfg),
            "teacher_sha256": t.sha256,
            "teacher_kind": t.name,
            "teacher_config": t.config,
            "ema_updates": self.ema.num_updates,
        }

    def save(self) -> Path | None:
        self.acc.wait_for_everyone()
        path = None
        if self.acc.is_main_process:
            models = {"generator": self.unwrapped_generator.denoiser}
            optims = {"generator": self.opt_g}
            if self.use_fake:
                models["fake"] = self.acc.unwrap_model(self.fake)
                optims["fake"] = self.opt_f
            path = save_checkpoint(
                self.out / "checkpoints",
                self.step,
                models,
                optims,
                {"ema": self.ema.state_dict()},
                self.checkpoint_state(),
                keep=self.cfg.keep_checkpoints,
            )
        self.acc.wait_for_everyone()
        return path

    def resume(self, where: str) -> Path:
        path = find_checkpoint(self.out, where)
        state, load = load_checkpoint(path)
        if state.get("teacher_sha256") != self.teacher.sha256:
            raise UserError(
                f"checkpoint {path} was trained from a different teacher file; "
                "resume with the same --teacher-path"
            )
        if (
            bool(state["config"].get("real_only")) != self.cfg.real_only
            or ("fake" in state["optimizers"]) != self.use_fake
        ):
            raise UserError(
                f"checkpoint {path} comes from a run with another fake-score setting "
                "(--real-only / --dm-weight); resume with the same settings"
            )
        try:
            self.unwrapped_generator.denoiser.load_state_dict(load("generator"))
            self.opt_g.load_state_dict(_optim_state(load, state, "generator"))
            if self.use_fake:
                self.acc.unwrap_model(self.fake).load_state_dict(load("fake"))
                self.opt_f.load_state_dict(_optim_state(load, state, "fake"))
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(
                f"checkpoint {path} does not fit this run's networks ({str(e).splitlines()[0]})"
            ) from None
        self.ema.load_state_dict(
            {k: v.to(self.device) for k, v in load("ema").items()}, state["ema_updates"]
        )
        self.step = int(state["step"])
        return path

    def ema_generator(self) -> OneStepGenerator:
        g = copy.deepcopy(self.unwrapped_generator).eval().requires_grad_(False)
        self.ema.copy_to(g.denoiser)
        return g


def _optim_state(load, state: dict, name: str) -> dict:
    from .checkpoint import unflatten_optimizer

    return unflatten_optimizer(load(f"optim_{name}"), state["optimizers"][name])


def plot_samples(trainer: DMDTrainer, path: Path) -> Path | None:
    n = trainer.cfg.plot_samples
    if n == 0:
        return None
    g = trainer.ema_generator()
    seeds = list(range(PLOT_SEED_START, PLOT_SEED_START + n))
    z = seeded_noise(seeds, trainer.teacher.sample_shape, trainer.device)
    k = trainer.teacher.num_classes
    c = (torch.arange(n, device=trainer.device) % k) if k else None
    with torch.no_grad():
        x = g(z, c).float().cpu()
    return trainer.teacher.kind.save_plot(
        [(f"DMD step {trainer.step} (EMA)", x)],
        path,
        trainer.teacher.config,
        labels=c.cpu() if c is not None else None,
    )


def distill(cfg: DistillConfig, accelerator: Accelerator | None = None) -> dict:
    trainer = DMDTrainer(cfg, accelerator)
    acc = trainer.acc
    out = trainer.out
    main = acc.is_main_process
    resumed_from = None
    if cfg.resume:
        resumed_from = trainer.resume(cfg.resume)
    elif main and list_checkpoints(out / "checkpoints"):
        raise UserError(
            f"{out} already holds checkpoints of a run; pass --resume latest to continue it, "
            "or choose another --out"
        )
    if main:
        write_config(cfg, out)
        if resumed_from:
            info(f"resumed from {resumed_from} (step {trainer.step})")
    log_path = out / "log.jsonl"
    t_start = time.perf_counter()
    t_last, step_last = t_start, trainer.step
    last: dict[str, float] = {}
    interrupted = None
    with StopRequested() as stop, progress(disable=None if main else True) as bar:
        task = bar.add_task("distill", total=cfg.steps, completed=trainer.step, info="")
        while trainer.step < cfg.steps:
            logs = trainer.train_step()
            step = trainer.step
            if step % cfg.log_every == 0 or step == cfg.steps:
                values = {k: float(v) for k, v in logs.items()}
                if not all(math.isfinite(v) for v in values.values()):
                    bad = ", ".join(k for k, v in values.items() if not math.isfinite(v))
                    raise UserError(
                        f"non-finite {bad} at step {step}: stopping without saving; the last "
                        "good checkpoint is intact (try a lower --lr)"
                    )
                now = time.perf_counter()
                rate = (step - step_last) * cfg.batch_size / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                last = dict(values, samples_per_s=rate, lr=trainer.opt_g.param_groups[0]["lr"])
                if main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": step, **last}) + "\n")
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
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop.signal is not None:
                trainer.save()
                if main:
                    plot_samples(trainer, out / "samples" / f"step-{step:07d}.png")
            if stop.signal is not None:
                interrupted = stop.signal
                break
    elapsed = time.perf_counter() - t_start
    result = {
        "out": str(out),
        "step": trainer.step,
        "steps": cfg.steps,
        **{k: round(v, 5) for k, v in last.items()},
        "seconds": round(elapsed, 1),
        "reg_loss": cfg.reg_loss if trainer.pairs is not None else "none",
        "reg_weight": cfg.reg_weight,
        "dm_weight": cfg.dm_weight,
        "real_only": cfg.real_only,
        "num_pairs": len(trainer.pairs) if trainer.pairs is not None else 0,
    }
    if interrupted is not None:
        result["interrupted"] = signal.Signals(interrupted).name
        return result
    if main:
        t = trainer.teacher
        save_generator(
            trainer.ema_generator().denoiser,
            t.name,
            t.config,
            t.sha256,
            out / "generator.safetensors",
            extra={"step": str(trainer.step), "ema": "true"},
        )
        result["generator"] = str(out / "generator.safetensors")
    acc.wait_for_everyone()
    return result
