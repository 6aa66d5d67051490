"""``dmdctl distill``: train a one-step generator with the DMD loss (docs/METHOD.md).

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
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from safetensors import SafetensorError

from dmdctl.config import write_config
from dmdctl.core.denoiser import OneStepGenerator, freeze_in_dtype
from dmdctl.core.ema import EMA
from dmdctl.core.generator import save_generator
from dmdctl.core.losses import dm_loss, edm_denoising_loss, regression_loss
from dmdctl.core.lpips_loss import RANDOM_BACKBONE_NOTE
from dmdctl.core.sampling import seeded_noise
from dmdctl.core.schedules import warmup_then
from dmdctl.errors import UserError, require
from dmdctl.pairs import load_pairs
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
from dmdctl.teachers import resolve_teacher
from dmdctl.teachers.sd.denoiser import GuidedDenoiser
from dmdctl.training.checkpoint import (
    append_line,
    config_differences,
    describe_os_error,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
    trim_log,
)
from dmdctl.training.speed import apply_layout_and_compile, attention_backend
from dmdctl.training.trackers import RunTrackers
from dmdctl.training.trackers import accelerator_kwargs as tracker_kwargs
from dmdctl.ui import info, progress

# with several processes a SIGTERM is acted on at a step all of them agree on: the next log,
# checkpoint or evaluation step, or the next multiple of this (a launcher's grace period before
# SIGKILL is often ~30 s: torchrun's, SLURM's default KillWait)
STOP_CHECK_EVERY = 10
PLOT_SEED_START = 10_000_000  # fixed noise for the sample plots, far from the pairs' seeds


def _forget_other_precision(mixed_precision: str) -> None:
    """Accelerate keeps one precision per process; a second run in the same Python process (the
    API, tests, benchmarks) with another --mixed-precision starts from a fresh state."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and str(shared.get("_mixed_precision", mixed_precision)) != mixed_precision:
        AcceleratorState._reset_state()


def dm_index_range(levels: int, min_frac: float, max_frac: float) -> tuple[int, int]:
    """The DM loss's noise-level indices as a half-open range [lo, hi).

    As in DMD2's code: ``int(min_frac * levels)`` to ``int(max_frac * levels)`` *inclusive*, so
    0.02..0.98 of 1000 levels draws indices 20..980.
    """
    lo = int(min_frac * levels)
    hi = min(levels, int(max_frac * levels) + 1)
    return lo, max(lo + 1, hi)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class DMDTrainer:
    """Holds the networks, optimisers and EMA of one distillation run."""

    # steps whose generator (fake-score) update --skip-nonfinite skipped, over the whole run
    skipped_steps: int = 0
    skipped_fake_updates: int = 0

    def __init__(self, cfg: DistillConfig, accelerator: Accelerator | None = None):
        self.cfg = cfg
        if accelerator is None:
            _forget_other_precision(cfg.mixed_precision)
            accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)
        self.acc = accelerator
        acc = self.acc
        self.teacher = resolve_teacher(
            cfg.teacher, Path(cfg.teacher_path) if cfg.teacher_path else None, cfg.offline
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
        self._setup_conditions(acc)
        self.lpips = None
        if cfg.reg_weight > 0 and cfg.reg_loss == "lpips":
            if len(t.sample_shape) != 3:
                raise UserError(
                    "--reg-loss lpips needs image teachers; use l2 or pseudo-huber for this teacher"
                )
            from dmdctl.core.lpips_loss import ImageLPIPS

            self.lpips = ImageLPIPS(cfg.lpips_net, cfg.lpips_random_backbone, cfg.lpips_size)
            self.lpips.to(acc.device)

        self.device = acc.device
        self.sigma_data = float(t.denoiser.sigma_data)
        # the fake score's loss: the teacher's own training loss (EDM weighting, SD's eps-MSE)
        self.loss_weight = t.denoiser.loss_weight
        generator = OneStepGenerator(
            copy.deepcopy(t.denoiser).requires_grad_(True).train(), t.sigma_max
        )
        if cfg.grad_checkpointing:
            enable_checkpointing(generator.denoiser)
        self.ema = EMA(generator.denoiser, cfg.ema_decay)
        adamw = optimizer_factory(cfg, acc.device)
        opt_g = adamw(generator.parameters(), cfg.lr)
        self.use_fake = cfg.dm_weight > 0 and not cfg.real_only
        fake = None
        if self.use_fake:
            fake = copy.deepcopy(t.denoiser).requires_grad_(True).train()
            if cfg.grad_checkpointing:
                enable_checkpointing(fake)
        # the DM loss's noise levels, read before anything is cast: schedules stay fp32
        grid = t.denoiser.training_sigmas(cfg.sigma_levels)
        # frozen networks run with their *weights* in the compute dtype (fp32 master weights stay
        # with G and the fake); their schedule buffers stay fp32 (freeze_in_dtype)
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        self.real = freeze_in_dtype(t.denoiser, self.device, compute)
        if t.text_conditioned and self.guidance != 1.0:
            self.real = GuidedDenoiser(self.real, self.guidance, self.uncond).to(self.device)
        if self.lpips is not None and t.codec.latent:
            freeze_in_dtype(t.codec.vae, self.device, compute)  # LPIPS sees decoded images
        # --channels-last / --compile: on the three networks, before DDP wraps them
        apply_layout_and_compile(
            [generator.denoiser, t.denoiser, *([fake] if fake is not None else [])],
            cfg.channels_last,
            cfg.compile,
        )
        if self.use_fake:
            opt_f = adamw(fake.parameters(), cfg.fake_lr)
            self.generator, self.opt_g, self.fake, self.opt_f = acc.prepare(
                generator, opt_g, fake, opt_f
            )
        else:
            self.generator, self.opt_g = acc.prepare(generator, opt_g)
            self.fake = self.opt_f = None
        self.ema_shadow_to(self.device)
        self.grid = grid.float().to(self.device)
        self.levels = len(grid)
        self.lo, self.hi = dm_index_range(self.levels, cfg.min_step_frac, cfg.max_step_frac)
        self.step = 0
        self.out = Path(cfg.out)

    # --- helpers -------------------------------------------------------------------------
    def ema_shadow_to(self, device) -> None:
        self.ema.shadow = {k: v.to(device) for k, v in self.ema.shadow.items()}

    def _slice(self, x: torch.Tensor, device=None) -> torch.Tensor:
        """This process's share of a tensor drawn for the global batch, on ``device`` (default:
        the training device). The copy does not wait for the GPU (a blocking host-to-device copy
        synchronises the stream): the draws are fresh host tensors, staged at once by CUDA."""
        n = x.shape[0] // self.acc.num_processes
        i = self.acc.process_index
        return x[i * n : (i + 1) * n].to(device or self.device, non_blocking=True)

    def _setup_conditions(self, acc) -> None:
        """Class labels, or for text-to-image teachers prompt embeddings looked up by index."""
        cfg, t = self.cfg, self.teacher
        self.num_conditions = t.num_classes
        self.gen_table = self.pair_table = None
        self.guidance = 1.0
        if not t.text_conditioned:
            require(cfg.prompts is None, f"--prompts is for text-to-image teachers, not '{t.name}'")
            return
        from dmdctl.teachers.sd.pipeline import load_prompt_table, prompt_table

        if self.pairs is not None:
            self.pair_table = load_prompt_table(Path(cfg.pairs))
        if cfg.prompts is not None:
            if acc.is_main_process:  # the text encoder runs once; the others read its cache
                self.gen_table = prompt_table(t, Path(cfg.prompts), Path(cfg.out), acc.device)
            acc.wait_for_everyone()
            if not acc.is_main_process:
                self.gen_table = load_prompt_table(Path(cfg.out))
        else:
            require(
                self.pair_table is not None,
                "a text-to-image teacher needs --prompts FILE (or --pairs made with prompts)",
            )
            self.gen_table = self.pair_table
        self.num_conditions = len(self.gen_table)
        self.uncond = self.gen_table.uncond
        if cfg.real_guidance is not None:
            self.guidance = float(cfg.real_guidance)
        else:  # a config built without the CLI: the kind's default recipe
            recipe = t.kind.presets()[t.kind.default_preset].get("distill", {})
            self.guidance = float(recipe.get("real_guidance", 1.0))
        if self.pairs is not None:
            made = self.pairs.manifest.get("sampler", {}).get("guidance")
            require(
                made is None or float(made) == self.guidance or cfg.allow_guidance_mismatch,
                f"the pairs in {cfg.pairs} were made with guidance {made}, but the real score "
                f"uses {self.guidance}: the regression and the DM loss would pull toward "
                f"different distributions. Make pairs with --guidance {self.guidance}, pass "
                f"--real-guidance {made}, or --allow-guidance-mismatch to train anyway",
            )
        require(
            cfg.eval_every == 0,
            "--eval-every is not available for text-to-image teachers; sample images with "
            "`dmdctl sample` and score them with `dmdctl eval-fid --images`",
        )

    def _labels(self, n: int, gen: torch.Generator) -> torch.Tensor | None:
        k = self.num_conditions
        return torch.randint(0, k, (n,), generator=gen) if k else None

    def _cond(self, idx: torch.Tensor | None, table=None):
        """What the networks take for condition indices: labels, or prompt embeddings."""
        if idx is None:
            return None
        table = table if table is not None else self.gen_table
        if table is None:
            return idx.to(self.device, non_blocking=True)
        return table.embeddings[idx.cpu()].to(self.device, non_blocking=True)

    def _set_lr(self, step: int) -> None:
        m = warmup_then(step, self.cfg.warmup, self.cfg.steps, self.cfg.lr_schedule)
        for g in self.opt_g.param_groups:
            g["lr"] = self.cfg.lr * m
        if self.opt_f is not None:
            for g in self.opt_f.param_groups:
                g["lr"] = self.cfg.fake_lr * m

    def _gate(self, opt, gnorm) -> torch.Tensor | None:
        """--skip-nonfinite: turn ``opt.step()`` into a no-op when the gradient norm is not finite.

        The optimisers are then fused AdamW, whose kernel takes a ``found_inf`` tensor (the hook
        torch's GradScaler uses) and, when it is 1, leaves parameters, both moments and the step
        count untouched. The decision stays on the device: no host sync, no copy of the weights
        (a torch.where over weights and moments would need both). A non-finite loss gives
        non-finite gradients, and the norm is taken after DDP's all-reduce, so every process
        skips the same steps. Under fp16 the loss scaler sets ``found_inf`` itself.
        """
        if not self.cfg.skip_nonfinite:
            return None
        bad = (~torch.isfinite(torch.as_tensor(gnorm, device=self.device))).float()
        if self.cfg.mixed_precision != "fp16":
            getattr(opt, "optimizer", opt).found_inf = bad
        return bad

    @property
    def unwrapped_generator(self) -> OneStepGenerator:
        return self.acc.unwrap_model(self.generator)

    # --- one training step ---------------------------------------------------------------
    def train_step(self) -> dict[str, torch.Tensor]:
        with attention_backend(self.cfg.sdpa_backend):  # --sdpa-backend
            return self._train_step()

    def _train_step(self) -> dict[str, torch.Tensor]:
        cfg, acc = self.cfg, self.acc
        gen = step_generator(cfg.seed, self.step)
        shape = self.teacher.sample_shape
        B, P = cfg.batch_size, cfg.pair_batch_size
        self._set_lr(self.step)

        z = self._slice(torch.randn(B, *shape, generator=gen))
        c = self._labels(B, gen)
        c = self._cond(self._slice(c, "cpu") if c is not None else None)
        sig_idx = self._slice(torch.randint(self.lo, self.hi, (B,), generator=gen))
        eps = self._slice(torch.randn(B, *shape, generator=gen))
        zs, cs = [z], [c]
        if self.pairs is not None:
            # indices stay on the host, where the pairs are: no device round trip, no sync
            pidx = self._slice(torch.randint(0, len(self.pairs), (P,), generator=gen), "cpu")
            zs.append(self.pairs.noise[pidx].to(self.device, non_blocking=True))
            cs.append(self._cond(self.pairs.cond[pidx], self.pair_table) if c is not None else None)
            y_pair = self.pairs.target[pidx].to(self.device, non_blocking=True)
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
                pred = x_all[z.shape[0] :]
                if self.lpips is not None and self.teacher.codec.latent:
                    # LPIPS compares images: decode both (gradients flow through the decoder)
                    pred = self.teacher.codec.decode(pred)
                    with torch.no_grad():
                        y_pair = self.teacher.codec.decode(y_pair)
                loss_reg = regression_loss(cfg.reg_loss, pred, y_pair, lpips_fn=self.lpips)
                loss_g = loss_g + cfg.reg_weight * loss_reg
                logs["loss_reg"] = loss_reg.detach()
        acc.backward(loss_g)
        gnorm = acc.clip_grad_norm_(self.generator.parameters(), cfg.grad_clip or float("inf"))
        skipped = self._gate(self.opt_g, gnorm)
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        self.ema.update(self.unwrapped_generator.denoiser)
        logs["loss_g"] = loss_g.detach()
        logs["grad_norm_g"] = torch.as_tensor(gnorm).detach()
        if skipped is not None:
            logs["skipped"] = skipped

        if self.use_fake:
            x_fake = x.detach()
            for k in range(cfg.fake_updates):
                if k > 0:  # fresh generator samples for each extra fake-score update (TTUR)
                    zk = self._slice(torch.randn(B, *shape, generator=gen))
                    ck = self._labels(B, gen)
                    c = self._cond(self._slice(ck, "cpu") if ck is not None else None)
                    with torch.no_grad(), acc.autocast():
                        x_fake = self.unwrapped_generator(zk, c)
                # the fake score learns the generator's distribution over the whole noise range
                fidx = self._slice(torch.randint(0, self.levels, (B,), generator=gen))
                feps = self._slice(torch.randn(B, *shape, generator=gen))
                with acc.autocast():
                    loss_f = edm_denoising_loss(
                        self.fake,
                        x_fake.float(),
                        self.grid[fidx],
                        feps,
                        c,
                        self.sigma_data,
                        self.loss_weight,
                    )
                acc.backward(loss_f)
                gnorm_f = acc.clip_grad_norm_(self.fake.parameters(), cfg.grad_clip or float("inf"))
                skipped_f = self._gate(self.opt_f, gnorm_f)
                if skipped_f is not None:
                    logs["skipped_fake"] = logs.get("skipped_fake", 0) + skipped_f
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

    def save(self, extra: dict | None = None) -> Path | None:
        """Checkpoint on the main process; the others wait at the barriers around it."""
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
                dict(self.checkpoint_state(), **(extra or {})),
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
            ema = {k: v.to(self.device) for k, v in load("ema").items()}
        except SafetensorError as e:
            raise UserError(
                f"checkpoint {path} is damaged ({e}); resume from an earlier one with "
                f"--resume {path.parent}/step-N"
            ) from None
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(
                f"checkpoint {path} does not fit this run's networks ({str(e).splitlines()[0]})"
            ) from None
        self.ema.load_state_dict(ema, state["ema_updates"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.skipped_fake_updates = int(state.get("skipped_fake_updates", 0))
        return path

    def ema_generator(self) -> OneStepGenerator:
        g = copy.deepcopy(self.unwrapped_generator).eval().requires_grad_(False)
        self.ema.copy_to(g.denoiser)
        return g


def enable_checkpointing(denoiser: torch.nn.Module) -> None:
    """--grad-checkpointing: recompute activations in the backward pass (the outermost network
    that supports it: diffusers UNets, the EDM networks)."""
    for m in denoiser.modules():
        fn = getattr(m, "enable_gradient_checkpointing", None)
        if callable(fn):
            fn()
            return
    raise UserError("--grad-checkpointing: this teacher's network does not support it")


def optimizer_factory(cfg: DistillConfig, device):
    """AdamW as DMD2 uses it; fused on CUDA and CPU; 8-bit (bitsandbytes) to save optimizer memory."""
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError(
                "--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes; CUDA only)"
            ) from None

        def make(params, lr):
            return bnb.optim.AdamW8bit(
                params, lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay
            )

        return make

    # --skip-nonfinite needs the fused kernel, which can skip a step on the device (_gate);
    # on the CPU too it beats torch's default (single-tensor) AdamW: benchmarks/train_step.py
    fused = True if cfg.skip_nonfinite or torch.device(device).type in ("cuda", "cpu") else None

    def make(params, lr):
        return torch.optim.AdamW(
            params, lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, fused=fused
        )

    return make


def _optim_state(load, state: dict, name: str) -> dict:
    from dmdctl.training.checkpoint import unflatten_optimizer

    return unflatten_optimizer(load(f"optim_{name}"), state["optimizers"][name])


def plot_samples(trainer: DMDTrainer, path: Path) -> Path | None:
    n = trainer.cfg.plot_samples
    if n == 0:
        return None
    t = trainer.teacher
    g = trainer.ema_generator()
    seeds = list(range(PLOT_SEED_START, PLOT_SEED_START + n))
    z = seeded_noise(seeds, t.sample_shape, trainer.device)
    k = trainer.num_conditions
    c = (torch.arange(n, device=trainer.device) % k) if k else None
    with torch.no_grad():
        x = g(z, trainer._cond(c)).float()
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
    from dmdctl.core.generator import Source
    from dmdctl.metrics.evaluate import EvalFidConfig, evaluate

    t = trainer.teacher
    source = Source(t.kind, t.config, f"DMD step {trainer.step} (EMA)", 1, trainer.ema_generator())
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
RESUME_MUST_MATCH = ("batch_size", "pair_batch_size")


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

    def collect(self, acc: Accelerator, stop_signal: int | None) -> dict:
        n = len(self.names)
        stop = torch.tensor([float(stop_signal or 0)], device=self.device)
        packet = torch.cat([self.last, self.bad, self.first_bad, self.skipped, stop])
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
        }


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
    if main:
        write_config(cfg, out)
        # rows past the checkpoint (a run killed after it) are written again by this run
        dropped = trim_log(log_path, trainer.step)
        if trainer.lpips is not None and trainer.lpips.random_backbone:
            info(
                f"[bold red]warning:[/bold red] regression loss uses LPIPS with a {RANDOM_BACKBONE_NOTE}"
            )
        if cfg.pairs is not None and trainer.pairs is None:
            info(
                f"[bold red]warning:[/bold red] --pairs {cfg.pairs} is not used: --reg-weight is 0 "
                "(the sd15 and edm-imagenet64 recipes, DMD2's, have no regression loss)"
            )
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
            logs = trainer.train_step()
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
            seen = watch.collect(acc, stop.signal)
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
        "processes": acc.num_processes,
    }
    if cfg.skip_nonfinite:
        result.update(skipped)
    if interrupted is not None:
        result["interrupted"] = signal.Signals(interrupted).name
        return result
    if main:
        t = trainer.teacher
        path = out / "generator.safetensors"
        try:
            save_generator(
                trainer.ema_generator().denoiser,
                t.name,
                t.config,
                t.sha256,
                path,
                # the training settings travel with the weights (the diffusers model card)
                extra={"step": str(trainer.step), "ema": "true", "train_config": asdict(cfg)},
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
