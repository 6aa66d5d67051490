"""The DMD training step (docs/METHOD.md): :class:`DMDTrainer` holds the networks, optimisers
and EMA of one distillation run and takes one step at a time.

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

import contextlib
import copy
import functools
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from dmdctl.core.denoiser import FlowDenoiser, StepGenerator, freeze_in_dtype
from dmdctl.core.ema import EMA
from dmdctl.core.gan import (
    GANHead,
    bottleneck_features,
    bottleneck_tap,
    classifier_gan_loss,
    feature_shape,
    frozen,
    generator_gan_loss,
)
from dmdctl.core.losses import denoising_error, dm_loss, edm_denoising_loss, regression_loss
from dmdctl.core.schedules import warmup_then
from dmdctl.data import RowGuard, check_together
from dmdctl.data.pairs import open_pairs
from dmdctl.errors import UserError, require
from dmdctl.settings.distill import DistillConfig
from dmdctl.teachers import resolve_teacher
from dmdctl.teachers.sd.denoiser import GuidedDenoiser
from dmdctl.teachers.sd.flux import embed_guidance
from dmdctl.training import lora, sharding
from dmdctl.training.checkpoint import (
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from dmdctl.training.speed import apply_layout_and_compile, attention_backend


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
        """Every check before anything is built or written, then the networks, in this order
        (each step's order inside is kept: the weights and RNG draws follow it bit for bit)."""
        self.cfg = cfg
        if accelerator is None:
            _forget_other_precision(cfg.mixed_precision)
            accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)
        self.acc = accelerator
        # frozen networks run with their *weights* in the compute dtype (fp32 master weights stay
        # with G and the fake); their schedule buffers stay fp32 (freeze_in_dtype)
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        self._load_teacher()  # checks: the teacher, its LoRA targets, batch sizes
        self._open_sources()  # checks: steps, pairs, prompts, real data, their shards' sha256
        self._load_lpips()
        generator = self._build_generator(compute)  # with LoRA, sharding, its EMA
        fake = self._build_fake(compute)  # with LoRA
        # prompts: encoded in the step, or a small table computed once (the first write)
        self._setup_conditions(self.acc, compute)
        grid = self._freeze_teacher(compute)  # the real score; the DM loss's noise levels
        self._layout_and_shard_fake(generator, fake)
        head = self._build_gan_head(fake)
        opts = self._make_optimisers(generator, fake, head)
        self._prepare({"generator": generator, "fake": fake, "head": head}, opts)
        self.ema_shadow_to(self.device)
        self.grid = grid.float().to(self.device)
        self.levels = len(grid)
        self.lo, self.hi = dm_index_range(self.levels, cfg.min_step_frac, cfg.max_step_frac)
        self.step = 0
        self.out = Path(cfg.out)
        self.initialised_from = self.init_from(cfg.init_from) if cfg.init_from else None

    def _load_teacher(self) -> None:
        """The teacher; --lora-rank / --fake-lora-rank (training/lora.py) refused here for
        non-UNet teachers; the batch sizes split over the processes."""
        cfg = self.cfg
        self.teacher = resolve_teacher(
            cfg.teacher,
            Path(cfg.teacher_path) if cfg.teacher_path else None,
            cfg.offline,
            cfg.no_t5,
            cfg.video_size,
        )
        if cfg.flow_shift is not None:
            require(
                isinstance(self.teacher.denoiser, FlowDenoiser),
                "--flow-shift is for flow-matching teachers (SD3, Wan, toy2d-flow)",
            )
            self.teacher.denoiser.set_shift(cfg.flow_shift)
        self.lora, self.fake_lora = lora.specs(cfg)
        for spec in (self.lora, self.fake_lora):
            if spec is not None:
                lora.check(self.teacher.denoiser, spec)
        world = self.acc.num_processes
        require(
            cfg.batch_size % world == 0,
            f"--batch-size {cfg.batch_size} is not divisible by the {world} processes",
        )
        require(
            cfg.pair_batch_size % world == 0,
            f"--pair-batch-size {cfg.pair_batch_size} is not divisible by the {world} processes",
        )

    def _open_sources(self) -> None:
        """Every check comes before anything is built or written: the generator's steps, the
        sources a step draws from (opened by every process on its own, read by row), and their
        shards' sha256 (shared out between the processes)."""
        cfg, t = self.cfg, self.teacher
        self.sigmas = generator_sigmas(cfg, t)
        self.guard = RowGuard(cfg.skip_bad_records)  # rows that turn bad inside the run
        self._open_guide()
        self.pairs = None
        if cfg.reg_weight > 0:
            self.pairs = open_pairs(Path(cfg.pairs), t, limit=cfg.num_pairs or None)
        self._open_prompt_sources()
        self.use_gan = cfg.gan_weight > 0
        self.real_data = self._open_real_data() if self.use_gan else None
        checks = []
        if self.pairs is not None:
            checks += [
                functools.partial(self.pairs.verify, [k]) for k in range(len(self.pairs.entries))
            ]
        if self.real_data is not None and hasattr(self.real_data, "verify"):
            checks += [
                functools.partial(self.real_data.verify, [k])
                for k in range(self.real_data.num_shards)
            ]
        check_together(self.acc, checks)

    def _load_lpips(self) -> None:
        """--reg-loss lpips: refused for non-image teachers, loaded otherwise."""
        cfg = self.cfg
        self.lpips = None
        if cfg.reg_weight > 0 and cfg.reg_loss == "lpips":
            if len(self.teacher.sample_shape) != 3:
                raise UserError(
                    "--reg-loss lpips needs image teachers; use l2 or pseudo-huber for this teacher"
                )
            from dmdctl.core.lpips_loss import ImageLPIPS

            self.lpips = ImageLPIPS(cfg.lpips_net, cfg.lpips_random_backbone, cfg.lpips_size)
            self.lpips.to(self.acc.device)

    def _build_generator(self, compute: torch.dtype | None) -> StepGenerator:
        """The generator, a copy of the teacher (LoRA: only the adapters train, the base frozen
        in the compute dtype); --fsdp: sharded over the launch (training/sharding.py), its EMA
        made from the sharded parameters."""
        cfg, t, acc = self.cfg, self.teacher, self.acc
        self.device = acc.device
        self.sigma_data = float(t.denoiser.sigma_data)
        # the fake score's loss: the teacher's own training loss (EDM weighting, SD's eps-MSE)
        self.loss_weight = t.denoiser.loss_weight
        generator = StepGenerator(training_copy(t.denoiser), self.sigmas)
        self.gen_names = self.fake_names = None
        if self.lora:
            self.gen_names = lora.add_lora(generator.denoiser, self.lora, cfg.seed, compute)
        if cfg.grad_checkpointing:
            enable_checkpointing(generator.denoiser)
        self.mesh = sharding.mesh(acc.device) if cfg.fsdp else None
        if self.mesh is not None:
            sharding.shard(generator.denoiser.to(acc.device), self.mesh)
        self.ema = EMA(self.trained_state(generator.denoiser), cfg.ema_decay)
        return generator

    def _build_fake(self, compute: torch.dtype | None) -> torch.nn.Module | None:
        """The fake score, another copy of the teacher (its own LoRA adapters); None when the
        run has no DM loss."""
        cfg = self.cfg
        self.use_fake = cfg.dm_weight > 0 and not cfg.real_only
        if not self.use_fake:
            return None
        fake = training_copy(self.teacher.denoiser)
        if self.fake_lora:
            self.fake_names = lora.add_lora(fake, self.fake_lora, cfg.seed + 1, compute)
        if cfg.grad_checkpointing:
            enable_checkpointing(fake)
        return fake

    def _freeze_teacher(self, compute: torch.dtype | None) -> torch.Tensor:
        """The real score: the teacher frozen in the compute dtype (with CFG for text teachers).
        Returns the DM loss's noise levels, read before anything is cast (schedules stay fp32)."""
        t = self.teacher
        grid = t.denoiser.training_sigmas(self.cfg.sigma_levels)
        self.real = freeze_in_dtype(t.denoiser, self.device, compute)
        if t.text_conditioned and self.guidance != 1.0:
            self.real = GuidedDenoiser(self.real, self.guidance, self.uncond).to(self.device)
        if self.guide is not None and self.guidance != 1.0:
            # EDM2: D_g + w (D - D_g), the guiding net frozen like the teacher
            from dmdctl.teachers.edm2.kind import GuidedEDM2

            guide = freeze_in_dtype(self.guide.denoiser, self.device, compute)
            self.real = GuidedEDM2(self.real, guide, self.guidance, self.guide_conditional)
        if self.lpips is not None and t.codec.latent:
            freeze_in_dtype(t.codec.vae, self.device, compute)  # LPIPS sees decoded images
        return grid

    def _layout_and_shard_fake(self, generator: StepGenerator, fake) -> None:
        """--channels-last / --compile on the three networks, before DDP wraps them; then the
        fake score's shards (--fsdp)."""
        apply_layout_and_compile(
            [generator.denoiser, self.teacher.denoiser, *([fake] if fake is not None else [])],
            self.cfg.channels_last,
            self.cfg.compile,
        )
        if self.mesh is not None and fake is not None:
            sharding.shard(fake.to(self.device), self.mesh)

    def _build_gan_head(self, fake) -> GANHead | None:
        """DMD2's GAN: a head on the fake score's bottleneck (sized by one probe pass), trained
        by the fake's optimiser; its initial weights follow --seed."""
        if not self.use_gan:
            return None
        t = self.teacher
        if self.mesh is None:  # (a sharded module is already there; .to() would replace
            fake.to(self.device)  # its DTensor parameters behind FSDP's back)
        try:
            shape = feature_shape(fake, t.sample_shape, t.sigma_max, self._cond(self._probe_cond()))
        except ValueError as e:
            raise UserError(f"--gan-weight: {e}") from None
        # how a transformer's tokens lie (a video's: frames, rows, columns); None: a square
        token_grid = getattr(t.denoiser, "token_grid", None)
        grid = token_grid(t.sample_shape) if token_grid is not None else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            try:
                head = GANHead(shape, grid).to(self.device)
            except ValueError as e:
                raise UserError(f"--gan-weight: {e}") from None
        if self.mesh is not None:
            sharding.shard(head, self.mesh)
            sharding.reshard(fake)  # after the probe's forward pass
        return head

    def _make_optimisers(self, generator: StepGenerator, fake, head) -> dict:
        """AdamW of the generator's trainable parameters, and of the fake score's with the GAN
        head's (none without a fake score). Made from the sharded parameters under --fsdp."""
        cfg = self.cfg
        adamw = optimizer_factory(cfg, self.acc.device)
        opt_g = adamw(trainable(generator), cfg.lr)
        opt_f = None
        if self.use_fake:
            fake_params = trainable(fake) + (list(head.parameters()) if self.use_gan else [])
            opt_f = adamw(fake_params, cfg.fake_lr)
        return {"opt_g": opt_g, "opt_f": opt_f}

    def _prepare(self, nets: dict, opts: dict) -> None:
        """What Accelerate prepares, in this order: the networks (not when sharded: prepare
        would wrap them in DDP) and their optimisers (mixed precision, accumulation
        bookkeeping); each becomes an attribute of the trainer."""
        parts = {**opts} if self.mesh is not None else {**nets, **opts}
        names = [n for n, v in parts.items() if v is not None]
        prepared = self.acc.prepare(*(parts[n] for n in names))
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        for name, value in {**nets, **opts, **dict(zip(names, prepared, strict=True))}.items():
            setattr(self, name, value)

    def _probe_cond(self):
        """One sample's condition index (for the probe that sizes the GAN head)."""
        return torch.zeros(1, dtype=torch.int64) if self.num_conditions else None

    def _open_real_data(self):
        """The GAN's real samples: a store made by ``dmdctl prepare-real`` (opened here, read
        by row in the step), or the built-in teachers' own data."""
        from dmdctl.data.real import load_real_data

        return load_real_data(self.cfg.real_data, self.teacher)

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

    def _open_guide(self) -> None:
        """EDM2 teachers: the real score's guiding net (--guide-net) and scale (--real-guidance),
        checked against the teacher (the same space; classes as --guide-mode says)."""
        cfg, t = self.cfg, self.teacher
        self.guide, self.guide_conditional = None, False
        guided_kind = t.kind.name == "edm2"
        if cfg.guide_net is None:
            w = float(cfg.real_guidance) if cfg.real_guidance is not None else 1.0
            recipe = t.kind.presets().get(str(cfg.teacher), {}).get("recipe", {})
            which = recipe.get("guiding_checkpoint")
            which = (
                f"this preset's: {which} converted" if which else "docs/guide/edm.md lists EDM2's"
            )
            require(
                not guided_kind or w == 1.0,
                f"--real-guidance {w:g} guides an EDM2 teacher's real score with a second "
                "network: pass --guide-net FILE (a converted EDM2 net, unconditional for "
                f"classifier-free guidance or smaller/less trained for autoguidance; {which}), "
                "or --real-guidance 1",
            )
            return
        require(guided_kind, f"--guide-net is for EDM2 teachers, not '{t.name}'")
        from dmdctl.teachers import load_teacher
        from dmdctl.teachers.edm2.kind import guide_mode

        self.guide = load_teacher(Path(cfg.guide_net), expected="edm2")
        self.guide_conditional = guide_mode(
            t.config, self.guide.config, cfg.guide_mode, cfg.guide_net
        )

    def _open_prompt_sources(self) -> None:
        """Text-to-image teachers: index the prompts (--prompts, or the pairs' own); every check
        on them and on guidance comes here, before anything is written."""
        cfg, t = self.cfg, self.teacher
        self.num_conditions = t.num_classes
        self.gen_prompts = self.pair_prompts = None
        self.guidance = 1.0
        if not t.text_conditioned:
            require(cfg.prompts is None, f"--prompts is for text-to-image teachers, not '{t.name}'")
            if self.guide is not None and cfg.real_guidance is not None:
                self.guidance = float(cfg.real_guidance)
            return
        from dmdctl.data.prompts import PromptFile, pairs_prompt_source

        if self.pairs is not None:
            self.pair_prompts = pairs_prompt_source(Path(cfg.pairs), self.pairs.manifest)
        if cfg.prompts is not None:
            self.gen_prompts = PromptFile(cfg.prompts, cfg.prompt_column)
        else:
            require(
                self.pair_prompts is not None,
                "a text-to-image teacher needs --prompts FILE (or --pairs made with prompts)",
            )
            self.gen_prompts = self.pair_prompts
        self.num_conditions = len(self.gen_prompts)
        if cfg.real_guidance is not None:
            self.guidance = float(cfg.real_guidance)
        else:  # a config built without the CLI: the kind's default recipe
            recipe = t.kind.presets()[t.kind.default_preset_for(t.config)].get("distill", {})
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
        # FLUX.1-dev: the guidance value is an input of the transformer, for the real score, the
        # generator and the fake score alike, not a second (unconditional) pass
        self.guidance = embed_guidance(t, self.guidance)
        require(
            cfg.eval_every == 0,
            "--eval-every is not available for text-to-image teachers; sample images with "
            "`dmdctl sample` and score them with `dmdctl eval-fid --images`",
        )

    def _setup_conditions(self, acc, compute) -> None:
        """Prompt conditions: a table for a small prompt set (--prompt-cache), else the frozen
        text encoders on the device, in the compute dtype, run on the rows a step draws (the
        pairs' prompts and the real data's captions too)."""
        self.gen_table = self.pair_table = None
        self.text_mode = None
        if not self.teacher.text_conditioned:
            return
        from dmdctl.data.prompts import setup_prompt_conditions

        captions = getattr(self.real_data, "conditioning", None) == "captions"
        self.gen_table, self.pair_table, self.text_mode = setup_prompt_conditions(
            self.teacher,
            self.gen_prompts,
            self.pair_prompts,
            self.cfg.prompt_cache,
            Path(self.cfg.out),
            acc,
            compute,
            need_encoder=captions,
        )
        self.uncond = self.gen_table.uncond

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
        return self.guard.read(lambda rows: table(torch.tensor(rows)), idx.tolist(), len(table))

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

    def trained_state(self, denoiser, fake: bool = False):
        """What the EMA and checkpoints hold of a network: all of it, or its LoRA adapters."""
        names = self.fake_names if fake else self.gen_names
        return denoiser if names is None else lora.TrainableState(denoiser, names)

    def file_network(self) -> tuple[torch.nn.Module, dict]:
        """The EMA generator's network as its generator file stores it, and metadata to add
        (LoRA: the merged network plus the adapters, training/lora.py)."""
        d = self.ema_generator().denoiser
        if self.lora is None:
            return d, {}
        if self.cfg.mixed_precision in ("bf16", "fp16"):
            # the base trained in the compute dtype: the file merges the adapters into the
            # teacher's own weights instead, as load_lora_weights on the teacher and an export
            # from a checkpoint do (so `sample` and the exported LoRA agree)
            weights = lora.TrainableState(d, self.gen_names).state_dict()
            state = {
                "lora": {"generator": self.lora.as_meta()},
                "config": asdict(self.cfg),
                "teacher_sha256": self.teacher.sha256,
            }
            d = lora.checkpoint_network(state, weights, offline=self.cfg.offline)
        return lora.GeneratorFileState(d), lora.file_metadata(self.lora)

    @property
    def unwrapped_generator(self) -> StepGenerator:
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
        s0 = self.sigmas[0]
        inputs, cs = [z * self.unwrapped_generator.input_scale], [c]
        if self.pairs is not None:
            # indices stay on the host, where the pairs are: no device round trip, no sync
            pidx = self._slice(torch.randint(0, len(self.pairs), (P,), generator=gen), "cpu")
            z_pair, y_pair, c_pair = self.guard.read(
                self.pairs.rows, pidx.tolist(), len(self.pairs)
            )
            inputs.append(
                z_pair.to(self.device, non_blocking=True) * self.unwrapped_generator.input_scale
            )
            cs.append(self._cond(c_pair, self.pair_table) if c is not None else None)
            y_pair = y_pair.to(self.device, non_blocking=True)
        # draws that only few-step and GAN runs make come last: a DMD run draws what it always did
        at = None
        if len(self.sigmas) > 1:
            # backward simulation: the input at step k is what inference feeds step k
            inputs[0], at = self._simulate(z, c, gen)
        if self.use_gan:
            gan_idx = self._slice(torch.randint(0, self.levels, (B,), generator=gen))
            gan_eps = self._slice(torch.randn(B, *shape, generator=gen))
        levels = [at if at is not None else z.new_full((z.shape[0],), s0)]
        if self.pairs is not None:  # the pairs map pure noise to images: the first step's job
            levels.append(inputs[1].new_full((inputs[1].shape[0],), s0))
        cond_all = torch.cat(cs) if c is not None else None

        logs: dict[str, torch.Tensor] = {}
        # the GAN's generator loss runs through the fake score and head with their weights
        # frozen until the backward pass is done (activation checkpointing recomputes then)
        no_weight_grads = contextlib.ExitStack()
        if self.use_gan:
            no_weight_grads.enter_context(
                frozen(acc.unwrap_model(self.fake), acc.unwrap_model(self.head))
            )
        with no_weight_grads, acc.autocast():
            x_all = self.generator(torch.cat(inputs), cond_all, at=torch.cat(levels))
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
            if self.use_gan:
                # non-saturating GAN loss through the frozen fake score and head (DMD2)
                sg = self.grid[gan_idx]
                fake_net, head = acc.unwrap_model(self.fake), acc.unwrap_model(self.head)
                feats = self._features(
                    fake_net, x + sg.reshape(-1, *([1] * len(shape))) * gan_eps, sg, c
                )
                loss_gan = generator_gan_loss(head(feats))
                loss_g = loss_g + cfg.gan_weight * loss_gan
                logs["loss_gan"] = loss_gan.detach()
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
        params = [p for group in self.opt_g.param_groups for p in group["params"]]
        gnorm = acc.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        skipped = self._gate(self.opt_g, gnorm)
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        after_optimizer_step(self.unwrapped_generator.denoiser)
        self.ema.update(self.trained_state(self.unwrapped_generator.denoiser))
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
                        x_fake = self._sample_steps(zk, c, gen)
                # the fake score learns the generator's distribution over the whole noise range
                fidx = self._slice(torch.randint(0, self.levels, (B,), generator=gen))
                feps = self._slice(torch.randn(B, *shape, generator=gen))
                with acc.autocast():
                    if self.use_gan:
                        loss_f = self._fake_and_head_loss(x_fake.float(), fidx, feps, c, gen, logs)
                    else:
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
                params = [p for group in self.opt_f.param_groups for p in group["params"]]
                gnorm_f = acc.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
                skipped_f = self._gate(self.opt_f, gnorm_f)
                if skipped_f is not None:
                    logs["skipped_fake"] = logs.get("skipped_fake", 0) + skipped_f
                self.opt_f.step()
                self.opt_f.zero_grad(set_to_none=True)
                after_optimizer_step(acc.unwrap_model(self.fake))
            logs["loss_fake"] = loss_f.detach()
            logs["grad_norm_fake"] = torch.as_tensor(gnorm_f).detach()
        self.step += 1
        return logs

    def _simulate(self, z: torch.Tensor, c, gen: torch.Generator):
        """DMD2's backward simulation: one step k drawn for the batch; the current generator runs
        from ``z`` through steps 0..k-1 without gradients, each estimate renoised with fresh
        noise to the next step's level. Returns the inputs at step k and their levels."""
        K, shape = len(self.sigmas), self.teacher.sample_shape
        k = int(torch.randint(0, K, (1,), generator=gen))
        B = self.cfg.batch_size
        noise = [self._slice(torch.randn(B, *shape, generator=gen)) for _ in range(k)]
        g = self.unwrapped_generator
        x_in = z * g.input_scale
        with torch.no_grad(), self.acc.autocast():
            for j in range(k):
                x0 = g.denoiser(x_in, self.sigmas[j], c).float()
                x_in = x0 + self.sigmas[j + 1] * noise[j]
        return x_in, z.new_full((z.shape[0],), self.sigmas[k])

    def _sample_steps(self, z: torch.Tensor, c, gen: torch.Generator) -> torch.Tensor:
        """Generator samples as a training step makes them (at a simulated step), no gradients."""
        g = self.unwrapped_generator
        if len(self.sigmas) == 1:
            return g(z, c)
        x_in, at = self._simulate(z, c, gen)
        return g(x_in, c, at=at)

    def _fake_and_head_loss(self, x_fake, fidx, feps, c, gen, logs) -> torch.Tensor:
        """The fake score's denoising loss and the GAN head's loss, in one forward pass.

        The noised generator samples of the denoising loss are also the head's fake examples
        (both draw their levels uniformly over the whole grid, as DMD2's diffusion GAN does);
        real samples are noised to levels of their own and run in the same batch.
        """
        B = self.cfg.batch_size
        shape = self.teacher.sample_shape
        xr, cr = self._real_rows(B, gen)
        ridx = self._slice(torch.randint(0, self.levels, (B,), generator=gen))
        reps = self._slice(torch.randn(B, *shape, generator=gen))
        sf, sr = self.grid[fidx], self.grid[ridx]
        view = (-1, *([1] * len(shape)))
        fake = self.acc.unwrap_model(self.fake)
        with bottleneck_tap(fake) as feats:
            pred = self.fake(x_fake + sf.reshape(view) * feps, sf, c)
        loss_den = denoising_error(pred, x_fake, sf, self.sigma_data, self.loss_weight)
        # the real samples only need the features: their pass ends at the bottleneck
        real_feats = self._features(
            fake, xr + sr.reshape(view) * reps, sr, cr.to(c.dtype) if c is not None else None
        )
        n = x_fake.shape[0]
        logits = self.head(torch.cat([feats[-1], real_feats]))
        loss_cls = classifier_gan_loss(logits[n:], logits[:n])
        logs["loss_cls"] = loss_cls.detach()
        logs["real_logit"] = logits[n:].detach().float().mean()
        logs["fake_logit"] = logits[:n].detach().float().mean()
        return loss_den + self.cfg.gan_classifier_weight * loss_cls

    def _features(self, net: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond):
        """The GAN head's input: ``net``'s bottleneck features of ``x``, the pass ended there
        (a sharded network runs whole: FSDP's hooks expect each forward they enter to end)."""
        if self.mesh is None:
            return bottleneck_features(net, x, sigma, cond)
        with bottleneck_tap(net) as feats:
            net(x, sigma, cond)
        return feats[-1]

    def _real_rows(self, B: int, gen: torch.Generator):
        """This process's share of B real samples drawn with the step's generator: rows of a
        store (only these are read) or of the built-in data, with their conditions (labels,
        or captions encoded like prompts)."""
        if getattr(self.real_data, "sampler", None) is not None:  # an endless built-in source
            xr, cr = self.real_data.draw(B, gen)
            return self._slice(xr), (self._slice(cr) if cr is not None else None)
        idx = self._slice(torch.randint(0, len(self.real_data), (B,), generator=gen), "cpu")
        xr, cr = self.guard.read(
            lambda rows: self.real_data.rows(torch.tensor(rows)), idx.tolist(), len(self.real_data)
        )
        if isinstance(cr, list):
            cr = self.gen_table.encode(cr)
        return xr.to(self.device, non_blocking=True), (
            cr.to(self.device, non_blocking=True) if cr is not None else None
        )

    # --- checkpoints ---------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        t = self.teacher
        return {
            "config": asdict(self.cfg),
            "teacher_sha256": t.sha256,
            "teacher_kind": t.name,
            "teacher_config": t.config,
            "ema_updates": self.ema.num_updates,
            "gan": self.use_gan,
            "generator_sigmas": self.sigmas,
            "guide_sha256": self.guide.sha256 if self.guide is not None else None,
            "lora": {
                "generator": self.lora.as_meta() if self.lora else None,
                "fake": self.fake_lora.as_meta() if self.fake_lora else None,
            },
        }

    def save(self, extra: dict | None = None) -> Path | None:
        """Checkpoint on the main process; the others wait at the barriers around it."""
        self.acc.wait_for_everyone()
        path = None
        main = self.acc.is_main_process
        models = {"generator": self.trained_state(self.unwrapped_generator.denoiser)}
        optims = {"generator": self.opt_g}
        if self.use_fake:
            models["fake"] = self.trained_state(self.acc.unwrap_model(self.fake), fake=True)
            optims["fake"] = self.opt_f  # with the GAN head's parameters, when there is one
        if self.use_gan:
            models["gan_head"] = self.acc.unwrap_model(self.head)
        if self.mesh is not None:
            sharding.reshard(*(m for m in models.values()))
            # whole tensors gathered by every process (collectives), kept by the main one: the
            # files of a DDP run, key for key (training/sharding.py)
            models = {n: sharding.gather_state(m.state_dict(), main) for n, m in models.items()}
            optims = {n: sharding.gather_optimizer(o, main) for n, o in optims.items()}
        ema = self.gather_ema()
        if main:
            path = save_checkpoint(
                self.out / "checkpoints",
                self.step,
                models,
                optims,
                {"ema": ema},
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
        if bool(state.get("gan", False)) != self.use_gan:
            raise UserError(
                f"checkpoint {path} comes from a run {'with' if state.get('gan') else 'without'} "
                "the GAN head (--gan-weight); resume with the same setting, or start a new run "
                "from it with --init-from"
            )
        try:
            g = self.trained_state(self.unwrapped_generator.denoiser)
            self._load_net(g, load("generator"))
            self._load_optim(self.opt_g, _optim_state(load, state, "generator"))
            if self.use_fake:
                fake = self.trained_state(self.acc.unwrap_model(self.fake), fake=True)
                self._load_net(fake, load("fake"))
                if self.use_gan:
                    self._load_net(self.acc.unwrap_model(self.head), load("gan_head"))
                self._load_optim(self.opt_f, _optim_state(load, state, "fake"))
            ema = self._ema_shards(load("ema"))
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

    def _load_net(self, net: torch.nn.Module, full: dict) -> None:
        """A network's whole state dict into it (cut to this process's shards under --fsdp)."""
        if self.mesh is not None:
            sharding.reshard(net)
            sharding.load_module(net, full)
        else:
            net.load_state_dict(full)

    def _load_optim(self, opt, full: dict) -> None:
        if self.mesh is not None:
            full = sharding.shard_optimizer_state(opt, full)
        opt.load_state_dict(full)

    def _ema_shards(self, full: dict) -> dict:
        """A whole EMA state as the shadow holds it (this process's shards under --fsdp)."""
        if self.mesh is not None:
            ref = self.trained_state(self.unwrapped_generator.denoiser).state_dict()
            full = sharding.cut_state_like(full, ref)
        return {k: v.to(self.device) for k, v in full.items()}

    _ema_full: tuple[int, dict] | None = None

    def gather_ema(self) -> dict:
        """The whole EMA state; under --fsdp a collective every process calls (the main process
        gets the tensors, kept for :meth:`ema_generator` at this step; the others get {})."""
        if self.mesh is None:
            return self.ema.state_dict()
        if self._ema_full is None or self._ema_full[0] != self.step:
            sharding.reshard(self.unwrapped_generator.denoiser)
            ref = self.trained_state(self.unwrapped_generator.denoiser).state_dict()
            self._ema_full = None  # the previous step's copy goes before the new one is made
            full = sharding.gather_like(self.ema.state_dict(), ref, self.acc.is_main_process)
            self._ema_full = (self.step, full)
        return self._ema_full[1]

    def ema_generator(self) -> StepGenerator:
        if self.mesh is None:
            g = copy.deepcopy(self.unwrapped_generator).eval().requires_grad_(False)
            self.ema.copy_to(self.trained_state(g.denoiser))
            return g
        # a whole network on this process: the teacher's structure with the gathered EMA
        # weights, in the training dtype (gather_ema ran on every process at this step)
        if self._ema_full is None or self._ema_full[0] != self.step or not self._ema_full[1]:
            raise RuntimeError("ema_generator under --fsdp needs gather_ema() at this step")
        d = copy.deepcopy(self.teacher.denoiser)
        d.load_state_dict(self._ema_full[1], assign=True)
        d = d.to(self.device).eval().requires_grad_(False)
        return StepGenerator(d, self.sigmas)

    def init_from(self, where: str) -> Path:
        """--init-from: weights of another run (generator, EMA, fake score and GAN head when it
        has them and this run uses them), with fresh optimisers at step 0 (DMD2's second
        stage). A generator file gives the generator and its EMA."""
        from dmdctl.generators import load_generator_state
        from dmdctl.teachers import GENERATOR_FORMAT, read_metadata

        path = Path(where)
        if not path.exists():
            raise UserError(f"--init-from {path}: no such file or folder")
        g = self.unwrapped_generator.denoiser
        try:
            if path.is_file():
                if read_metadata(path).get("format") != GENERATOR_FORMAT:
                    raise UserError(f"--init-from {path} is not a dmdctl generator file")
                meta, weights = load_generator_state(path)
                sha = meta.get("teacher_sha256")
                parts = {"generator": weights, "ema": weights}
            else:
                found = path if (path / "state.json").is_file() else None
                if found is None and list_checkpoints(path / "checkpoints"):
                    found = find_checkpoint(path, "latest")
                if found is None and (path / "generator.safetensors").is_file():
                    return self.init_from(str(path / "generator.safetensors"))
                if found is None:
                    raise UserError(
                        f"--init-from {path} holds no checkpoint and no generator.safetensors"
                    )
                path = found
                state, load = load_checkpoint(path)
                sha = state.get("teacher_sha256")
                names = ["generator", "ema"]
                if self.use_fake and "fake" in state.get("optimizers", {}):
                    names.append("fake")
                if self.use_gan and state.get("gan"):
                    names.append("gan_head")
                parts = {n: load(n) for n in names}
            if sha != self.teacher.sha256:
                raise UserError(
                    f"--init-from {path} was trained from a different teacher; use the same "
                    "--teacher-path"
                )
            self._load_net(g, parts["generator"])
            self.ema.load_state_dict(self._ema_shards(parts["ema"]), 0)
            if "fake" in parts:
                self._load_net(self.acc.unwrap_model(self.fake), parts["fake"])
            if "gan_head" in parts:
                self._load_net(self.acc.unwrap_model(self.head), parts["gan_head"])
        except SafetensorError as e:
            raise UserError(f"--init-from {path} is damaged ({e})") from None
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(
                f"--init-from {path} does not fit this run's networks ({str(e).splitlines()[0]})"
            ) from None
        return path


def generator_sigmas(cfg: DistillConfig, teacher) -> list[float]:
    """The generator's steps as sigmas: --denoising-steps / --conditioning-timestep read in the
    teacher's unit (SD: timesteps), or one step at the top of its range."""
    d = teacher.denoiser
    values = cfg.step_values()
    if values is None:
        return [float(teacher.sigma_max)]
    if cfg.conditioning_timestep is not None and d.step_unit != "timestep":
        raise UserError(
            "--conditioning-timestep is for SD teachers; for this teacher give the one step's "
            "sigma with --denoising-steps"
        )
    try:
        return d.step_sigmas(values)
    except ValueError as e:
        given = (
            f"--conditioning-timestep {cfg.conditioning_timestep}"
            if cfg.conditioning_timestep is not None
            else f"--denoising-steps {cfg.denoising_steps}"
        )
        raise UserError(f"{given}: {e}") from None


def training_copy(denoiser: torch.nn.Module) -> torch.nn.Module:
    """A trainable copy of the teacher's denoiser (the generator, the fake score), prepared as
    its kind trains it (EDM2: the log-variance head frozen, the weights force-normalised)."""
    net = copy.deepcopy(denoiser).requires_grad_(True).train()
    fn = getattr(net, "prepare_training", None)
    if callable(fn):
        fn()
    return net


def after_optimizer_step(denoiser: torch.nn.Module) -> None:
    """What a network's kind does after each optimiser step (EDM2: forced weight
    normalisation); nothing for the others."""
    fn = getattr(denoiser, "after_optimizer_step", None)
    if callable(fn):
        fn()


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters an optimiser takes: all of them, or a LoRA network's adapters."""
    return [p for p in module.parameters() if p.requires_grad]


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
