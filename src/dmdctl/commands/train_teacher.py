"""``dmdctl train-teacher``: train a built-in teacher (EDM denoising score matching, or the
flow-matching velocity loss for flow teachers such as ``toy2d-flow``)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dmdctl.commands import show
from dmdctl.config import resolve, write_config
from dmdctl.core.denoiser import FlowDenoiser
from dmdctl.core.ema import EMA
from dmdctl.core.losses import edm_denoising_loss
from dmdctl.core.schedules import warmup_then
from dmdctl.errors import UserError
from dmdctl.runtime import claim_output, holds_output, release_on_return
from dmdctl.settings.train_teacher import TrainTeacherConfig
from dmdctl.teachers import preset_config, save_teacher
from dmdctl.training.trackers import standalone
from dmdctl.ui import progress


@holds_output
def train_teacher(cfg: TrainTeacherConfig) -> dict:
    kind, tcfg = preset_config(cfg.teacher)
    if not kind.builtin:
        raise UserError(
            f"train-teacher trains built-in teachers only; a '{kind.name}' teacher is "
            "loaded with --teacher-path"
        )
    # a config made in Python may leave the teacher's own values out: resolve fills them in
    cfg = resolve(TrainTeacherConfig, **asdict(cfg))
    out = Path(cfg.out)
    claim_output(out, "train-teacher")
    write_config(cfg, out)
    trackers = release_on_return(standalone(cfg.report_to, "dmdctl-teacher", asdict(cfg), out))
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = kind.build(tcfg)
    net.train()
    flow = isinstance(net, FlowDenoiser)
    weight = net.loss_weight if flow else None
    ema = EMA(net, cfg.ema_decay)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_then(s, cfg.warmup, cfg.steps))
    t0 = time.perf_counter()
    losses = []
    with progress() as bar:
        task = bar.add_task(f"train {cfg.teacher}", total=cfg.steps, info="")
        for step in range(cfg.steps):
            x, cond = kind.sample_data(tcfg, cfg.batch_size, gen)
            log_sigma = torch.randn(cfg.batch_size, generator=gen)
            if flow:  # t logit-normal(0, 1) (SD3's choice) is exactly log sigma ~ N(0, 1)
                sigma = log_sigma.exp()
            else:
                sigma = (log_sigma * cfg.p_std + cfg.p_mean).exp()
            noise = torch.randn(x.shape, generator=gen)
            # flow teachers: weighted so that this is the velocity MSE (FlowDenoiser.loss_weight)
            loss = edm_denoising_loss(net, x, sigma, noise, cond, tcfg["sigma_data"], weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
            opt.step()
            sched.step()
            ema.update(net)
            if step % 100 == 0 or step == cfg.steps - 1:
                losses.append(loss.item())
                trackers.log({"step": step + 1, "loss": losses[-1], "lr": sched.get_last_lr()[0]})
                bar.update(task, completed=step + 1, info=f"loss {losses[-1]:.4f}")
    elapsed = time.perf_counter() - t0
    ema.copy_to(net)
    path = save_teacher(
        net, kind, tcfg, out / "teacher.safetensors", extra={"trained_by": json.dumps(asdict(cfg))}
    )
    return {
        "teacher": str(path),
        "steps": cfg.steps,
        "final_loss": losses[-1],
        "seconds": round(elapsed, 1),
    }


def run(cfg: TrainTeacherConfig) -> int | None:
    """Run the command on resolved settings (its help: :data:`dmdctl.settings.train_teacher.HELP`)."""

    show("train-teacher", train_teacher(cfg))
    return None
