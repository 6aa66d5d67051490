"""``dmdctl demo``: the whole method end to end on a built-in teacher, with a figure and a report.

toy2d: train the teacher → make pairs → distil (full DMD and the paper's two ablations) →
evaluate every row → export → one PNG (data, teacher, teacher at 1 step, DMD, ablations) and
a markdown report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table

from .config import write_config
from .distill import DistillConfig, distill
from .errors import require
from .eval_fid import EvalFidConfig, evaluate
from .export import ExportConfig, export
from .generator import generate, load_generator, teacher_source
from .make_pairs import MakePairsConfig, make_pairs
from .teachers import load_teacher, preset_config
from .train_teacher import TrainTeacherConfig, train_teacher
from .ui import console, info, print_table

DEMOS = ("toy2d",)


@dataclass
class DemoConfig:
    teacher: str = "toy2d"
    out: str = "dmdctl-demo"
    teacher_steps: int = 8000
    num_pairs: int = 128
    distill_steps: int = 2000
    lr: float = 1e-3
    eval_samples: int = 10000
    seed: int = 0

    def validate(self) -> None:
        require(
            self.teacher in DEMOS, f"unknown demo {self.teacher!r} (available: {', '.join(DEMOS)})"
        )
        for name in ("teacher_steps", "num_pairs", "distill_steps", "eval_samples"):
            v = getattr(self, name)
            require(v > 0, f"--{name.replace('_', '-')} must be positive, got {v}")


ROWS = [
    ("teacher_35nfe", "Teacher, Heun 18 steps (35 NFE)"),
    ("teacher_1step", "Teacher, 1 step"),
    ("dmd", "DMD one-step (DM + regression)"),
    ("dmd_real_only", "Ablation: real score only"),
    ("dmd_no_reg", "Ablation: no regression"),
    ("dmd_reg_only", "Ablation: regression only (no DM loss)"),
]


def run_demo(cfg: DemoConfig) -> dict:
    torch.set_num_threads(1)  # a small MLP: one thread is faster than two on a 2-core machine
    out = Path(cfg.out)
    write_config(cfg, out)
    t0 = time.perf_counter()
    info("[bold]1/5[/bold] training the toy2d teacher")
    train_teacher(
        TrainTeacherConfig(
            teacher=cfg.teacher, out=str(out / "teacher"), steps=cfg.teacher_steps, seed=cfg.seed
        )
    )
    teacher_path = out / "teacher" / "teacher.safetensors"
    info(f"[bold]2/5[/bold] making {cfg.num_pairs} pairs with the teacher's 35-NFE Heun sampler")
    make_pairs(
        MakePairsConfig(
            teacher_path=str(teacher_path),
            out=str(out / "pairs"),
            num_pairs=cfg.num_pairs,
            seed=cfg.seed,
        )
    )
    base = dict(
        teacher_path=str(teacher_path),
        pairs=str(out / "pairs"),
        steps=cfg.distill_steps,
        seed=cfg.seed,
        checkpoint_every=cfg.distill_steps,
        lr=cfg.lr,
        fake_lr=cfg.lr,
    )
    runs = {
        "dmd": DistillConfig(out=str(out / "dmd"), **base),
        "dmd_real_only": DistillConfig(
            out=str(out / "dmd_real_only"), real_only=True, reg_weight=0.0, **base
        ),
        "dmd_no_reg": DistillConfig(out=str(out / "dmd_no_reg"), reg_weight=0.0, **base),
        "dmd_reg_only": DistillConfig(out=str(out / "dmd_reg_only"), dm_weight=0.0, **base),
    }
    for i, (name, dcfg) in enumerate(runs.items()):
        info(f"[bold]3/5[/bold] distilling: {name} ({i + 1}/{len(runs)})")
        distill(dcfg)
    info("[bold]4/5[/bold] evaluating")
    teacher = load_teacher(teacher_path)
    ecfg = EvalFidConfig(num_samples=cfg.eval_samples, json=None)
    sources = {
        "teacher_35nfe": teacher_source(teacher, 18),
        "teacher_1step": teacher_source(teacher, 1),
        **{name: load_generator(out / name / "generator.safetensors") for name in runs},
    }
    metrics = {name: evaluate(ecfg, src, show_progress=False) for name, src in sources.items()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    info("[bold]5/5[/bold] exporting and plotting")
    export(ExportConfig(source=str(out / "dmd"), out=str(out / "generator.safetensors")))
    kind, tconfig = preset_config(cfg.teacher)
    data, _ = kind.sample_data(teacher.config, 3000, torch.Generator().manual_seed(cfg.seed))
    seeds = list(range(2_000_000, 2_003_000))
    panels = [("data", data)] + [
        (title.split(" (")[0].replace("Ablation: ", ""), generate(sources[key], seeds)[0])
        for key, title in ROWS
    ]
    figure = kind.save_plot(panels, out / f"{cfg.teacher}.png", teacher.config)
    elapsed = time.perf_counter() - t0
    table = results_table(metrics)
    print_table(table)
    write_report(out, cfg, metrics, figure, elapsed)
    console.print(f"report: {out / 'report.md'}  figure: {figure}  ({elapsed:.0f} s)")
    return metrics


def results_table(metrics: dict) -> Table:
    any_row = next(iter(metrics.values()))
    table = Table(
        title=f"toy2d: {any_row['num_samples']} samples each, reference "
        f"{any_row['reference'].get('builtin', any_row['reference'].get('path'))}"
    )
    for col in ("row", "NFE", "Fréchet distance", "modes covered", "within 3 std"):
        table.add_column(col)
    for key, title in ROWS:
        m = metrics[key]
        table.add_row(
            title,
            str(m["nfe"]),
            f"{m['fid']:.4f}",
            f"{m['modes_covered']}/{m['num_modes']}",
            f"{m['frac_within_3std']:.3f}",
        )
    return table


def write_report(out: Path, cfg: DemoConfig, metrics: dict, figure: Path, elapsed: float) -> Path:
    any_row = next(iter(metrics.values()))
    lines = [
        f"# dmdctl demo: {cfg.teacher}",
        "",
        f"![samples]({figure.name})",
        "",
        f"Every row is scored on {any_row['num_samples']} samples (seeds from {any_row['seed_start']}) "
        f"against {any_row['reference'].get('builtin')}. The 2-D Fréchet distance sees only the mean "
        "and covariance; mode coverage (a mode counts when a quarter of its share lands within 3 std "
        "of it) and the fraction of samples within 3 std of a mode show sharpness and collapse.",
        "",
        "| row | NFE | Fréchet distance | modes covered | within 3 std |",
        "|---|---|---|---|---|",
    ]
    for key, title in ROWS:
        m = metrics[key]
        lines.append(
            f"| {title} | {m['nfe']} | {m['fid']:.4f} | {m['modes_covered']}/{m['num_modes']} "
            f"| {m['frac_within_3std']:.3f} |"
        )
    lines += [
        "",
        f"Settings: teacher {cfg.teacher_steps} steps; {cfg.num_pairs} regression pairs; "
        f"{cfg.distill_steps} distillation steps per run at lr {cfg.lr}; seed {cfg.seed}. "
        f"Total time {elapsed:.0f} s.",
        "Reproduce: `dmdctl demo --config " + str(out / "config.toml") + "`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
