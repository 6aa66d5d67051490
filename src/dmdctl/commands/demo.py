"""``dmdctl demo``: the whole method end to end on a built-in teacher, with figures and a report.

- ``toy2d``: train the teacher → make pairs → distil (full DMD and the paper's ablations) →
  evaluate every row → export → one PNG of point clouds and a markdown report (a few minutes).
- ``digits``: the shipped class-conditional teacher → pairs → DMD and DMD2 (one step; with
  ``--all-runs`` also DMD2 with 4 steps) → KID, precision and recall in the shipped classifier's
  features → export → PNG grids and a report (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.table import Table

from dmdctl.commands.export import export
from dmdctl.commands.make_pairs import make_pairs
from dmdctl.commands.train_teacher import train_teacher
from dmdctl.config import resolve, write_config
from dmdctl.generators import Source, generate, load_generator, teacher_source
from dmdctl.metrics.evaluate import evaluate
from dmdctl.metrics.quality import score_floor
from dmdctl.settings.demo import (
    DMD2_4STEP_SIGMAS,
    DMD2_FAKE_UPDATES,
    DMD2_RUN,
    DemoConfig,
    distill_settings,
    run_settings,
)
from dmdctl.settings.distill import DistillConfig
from dmdctl.settings.eval_fid import EvalFidConfig
from dmdctl.settings.export import ExportConfig
from dmdctl.settings.make_pairs import MakePairsConfig
from dmdctl.settings.train_teacher import TrainTeacherConfig
from dmdctl.teachers import load_teacher, preset_config
from dmdctl.training.loop import distill
from dmdctl.ui import console, info, print_table

ROW_TITLES = {
    "teacher_35nfe": "Teacher, Heun 18 steps (35 NFE)",
    "teacher_1step": "Teacher, 1 step",
    "dmd": "DMD one-step (DM + regression)",
    "dmd_real_only": "Ablation: real score only",
    "dmd_no_reg": "Ablation: no regression",
    "dmd_reg_only": "Ablation: regression only (no DM loss)",
    "dmd2": "DMD2 one-step (DM + GAN, no regression)",
    "dmd2_4step": "DMD2 4 steps (DM + GAN, backward simulation)",
    "noise_floor": "Floor: real data outside the reference",
}
DEMO_BOOTSTRAP = 100  # bootstrap rounds of the KID / precision / recall intervals in metrics.json

# The distillation runs of each demo (its settings: dmdctl.settings.demo.DEMO_DEFAULTS).
DEMO_RUNS: dict[str, dict[str, dict]] = {
    "toy2d": {
        "dmd": {},
        "dmd_real_only": dict(real_only=True, reg_weight=0.0),
        "dmd_no_reg": dict(reg_weight=0.0),
        "dmd_reg_only": dict(dm_weight=0.0),
    },
    # DMD (v1) against DMD2 one-step (the headline rows); --all-runs adds DMD2 with four steps.
    # DMD's ablations on digits are in benchmarks/quality_ablation.py
    "digits": {
        "dmd": {},
        "dmd2": dict(DMD2_RUN, fake_updates=DMD2_FAKE_UPDATES["digits"]),
    },
}
# the runs --all-runs adds
EXTRA_RUNS: dict[str, dict[str, dict]] = {
    "toy2d": {},
    "digits": {
        "dmd2_4step": dict(
            DMD2_RUN, fake_updates=DMD2_FAKE_UPDATES["digits"], denoising_steps=DMD2_4STEP_SIGMAS
        ),
    },
}


def run_demo(cfg: DemoConfig) -> dict:
    # a config made in Python may leave the demo's own values out: resolve fills them in
    cfg = resolve(DemoConfig, **asdict(cfg))
    # small networks (an MLP, an 8x8 UNet): one thread is faster than two on a 2-core machine
    # (benchmarks/digits_step.py times both)
    torch.set_num_threads(1)
    out = Path(cfg.out)
    write_config(cfg, out)
    t0 = time.perf_counter()
    kind, _ = preset_config(cfg.teacher)
    if cfg.teacher_steps:
        info(f"[bold]1/5[/bold] training the {cfg.teacher} teacher")
        train_teacher(
            TrainTeacherConfig(
                teacher=cfg.teacher,
                out=str(out / "teacher"),
                steps=cfg.teacher_steps,
                seed=cfg.seed,
            )
        )
        teacher_path = out / "teacher" / "teacher.safetensors"
    else:
        teacher_path = kind.default_path()
        info(f"[bold]1/5[/bold] using the shipped {cfg.teacher} teacher ({teacher_path.name})")
    teacher = load_teacher(teacher_path)
    info(f"[bold]2/5[/bold] making {cfg.num_pairs} pairs with the teacher's 35-NFE Heun sampler")
    make_pairs(
        MakePairsConfig(
            teacher_path=str(teacher_path),
            out=str(out / "pairs"),
            num_pairs=cfg.num_pairs,
            seed=cfg.seed,
            batch_size=500,
        )
    )
    base = DistillConfig(
        teacher_path=str(teacher_path),
        pairs=str(out / "pairs"),
        steps=cfg.distill_steps,
        seed=cfg.seed,
        checkpoint_every=cfg.distill_steps,
        **distill_settings(asdict(cfg)),
    )
    runs = dict(DEMO_RUNS[cfg.teacher], **(EXTRA_RUNS[cfg.teacher] if cfg.all_runs else {}))
    for i, (name, overrides) in enumerate(runs.items()):
        info(f"[bold]3/5[/bold] distilling: {name} ({i + 1}/{len(runs)})")
        distill(run_settings(base, name, overrides, out))
    info("[bold]4/5[/bold] evaluating")
    # against the teacher's own training data (dmdctl.metrics.quality): KID, FID, precision and recall
    ecfg = EvalFidConfig(
        num_samples=cfg.eval_samples, precision_recall=True, bootstrap=DEMO_BOOTSTRAP
    )
    sources: dict[str, Source] = {
        "teacher_35nfe": teacher_source(teacher, 18),
        "teacher_1step": teacher_source(teacher, 1),
        **{name: load_generator(out / name / "generator.safetensors") for name in runs},
    }
    metrics = {name: evaluate(ecfg, src, show_progress=False) for name, src in sources.items()}
    # the same-distribution floor: real data the reference does not hold, scored the same way
    floor = score_floor(kind, teacher.config, cfg.eval_samples, bootstrap=DEMO_BOOTSTRAP)
    if floor is not None:
        metrics["noise_floor"] = floor
    speed = measure_speedup(sources["teacher_35nfe"], sources["dmd"], teacher.sample_shape)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    info("[bold]5/5[/bold] exporting and plotting")
    export(ExportConfig(source=str(out / "dmd"), out=str(out / "generator.safetensors")))
    figure = make_figure(cfg, kind, teacher, sources, out)
    elapsed = time.perf_counter() - t0
    print_table(results_table(cfg.teacher, metrics))
    write_report(out, cfg, metrics, figure, elapsed, speed)
    console.print(f"report: {out / 'report.md'}  figure: {figure}  ({elapsed:.0f} s)")
    return metrics


def measure_speedup(slow: Source, fast: Source, shape, n: int = 200) -> dict:
    """Wall time per sample of the teacher's sampler and of the one-step generator, same batch."""
    seeds = list(range(3_000_000, 3_000_000 + n))
    times = {}
    for name, src in (("teacher_35nfe", slow), ("dmd", fast)):
        generate(src, seeds[:8], n)  # warm-up
        t = time.perf_counter()
        generate(src, seeds, n)
        times[name] = (time.perf_counter() - t) / n
    return {"batch": n, "s_per_sample": times, "speedup": times["teacher_35nfe"] / times["dmd"]}


def make_figure(cfg: DemoConfig, kind, teacher, sources: dict[str, Source], out: Path) -> Path:
    seeds = list(range(2_000_000, 2_003_000))
    panels = []
    if cfg.teacher == "toy2d":
        data, _ = kind.sample_data(teacher.config, 3000, torch.Generator().manual_seed(cfg.seed))
        panels.append(("data", data))
    labels = None
    for key, src in sources.items():
        x, labels = generate(src, seeds[:100] if cfg.teacher != "toy2d" else seeds)
        panels.append((ROW_TITLES[key].split(" (")[0].replace("Ablation: ", ""), x))
    return kind.save_plot(panels, out / f"{cfg.teacher}.png", teacher.config, labels=labels)


def _row_cells(m: dict) -> list[str]:
    cells = [str(m.get("nfe", "-"))]
    if m.get("kid") is not None:
        cells.append(f"{m['kid']:.4g} ± {m['kid_std']:.2g}")
    cells.append(f"{m['fid']:.4f}")
    for key in ("precision", "recall"):
        if key in m:
            cells.append(f"{m[key]:.3f}")
    if "modes_covered" in m:
        cells += [f"{m['modes_covered']}/{m['num_modes']}", f"{m['frac_within_3std']:.3f}"]
    if "class_accuracy" in m:
        cells.append(f"{m['class_accuracy']:.3f}")
    return cells


def _columns(metrics: dict) -> list[str]:
    any_row = next(iter(metrics.values()))
    cols = ["row", "NFE"]
    if any_row.get("kid") is not None:
        cols.append("KID ± std")
    cols.append("FID" if "class_accuracy" in any_row else "Fréchet distance")
    cols += [key for key in ("precision", "recall") if key in any_row]
    if "modes_covered" in any_row:
        cols += ["modes covered", "within 3 std"]
    if "class_accuracy" in any_row:
        cols.append("class accuracy")
    return cols


def results_table(teacher: str, metrics: dict) -> Table:
    any_row = next(iter(metrics.values()))
    ref = any_row["reference"].get("builtin", any_row["reference"].get("path"))
    table = Table(
        title=f"{teacher}: {any_row['num_samples']} samples per model row, reference {ref}"
    )
    for col in _columns(metrics):
        table.add_column(col)
    for key, m in metrics.items():
        table.add_row(ROW_TITLES[key], *_row_cells(m))
    return table


def write_report(
    out: Path, cfg: DemoConfig, metrics: dict, figure: Path, elapsed: float, speed: dict
) -> Path:
    any_row = next(iter(metrics.values()))
    ref = any_row["reference"].get("builtin", any_row["reference"].get("path"))
    lines = [f"# dmdctl demo: {cfg.teacher}", "", f"![samples]({figure.name})", ""]
    if cfg.teacher == "toy2d":
        lines.append(
            "The 2-D Fréchet distance sees only the mean and covariance; mode coverage (a mode counts when a "
            "quarter of its share lands within 3 std of it) and the fraction of samples within 3 std of a "
            "mode show sharpness and collapse."
        )
    else:
        lines.append(
            f"Features: {any_row['features']}. Class accuracy is how often that classifier "
            "reads a sample as the class it was generated for. FIDs on a few hundred or thousand samples are "
            "only comparable with each other, not with 50k-sample FIDs of papers."
        )
    lines += [
        "",
        "KID (the headline number: unbiased, so near 0 for samples of the data distribution) is shown "
        "± its standard deviation over 100 subsets, on features standardised with the reference's mean "
        "and scale. Precision is the fraction of samples inside the k = 3 nearest-neighbour manifold of "
        "the reference, recall the fraction of reference points inside the samples' manifold: a sharp but "
        "collapsed generator has high precision and low recall. 95% bootstrap intervals, density and "
        "coverage are in metrics.json.",
    ]
    lines += [
        "",
        f"Each model row: {any_row['num_samples']} samples (seeds from {any_row['seed_start']}) against {ref}"
        + (
            f" ({any_row['reference']['num_samples']} points)"
            if "num_samples" in any_row["reference"]
            else ""
        )
        + ".",
        "",
        "| " + " | ".join(_columns(metrics)) + " |",
        "|" + "---|" * len(_columns(metrics)),
    ]
    for key, m in metrics.items():
        lines.append(f"| {ROW_TITLES[key]} | " + " | ".join(_row_cells(m)) + " |")
    if "noise_floor" in metrics:
        fl = metrics["noise_floor"]
        lines += [
            "",
            f"Floor: {fl['source']} against the same reference: real data of the same distribution "
            f"that the reference does not hold. Its KID ({fl['kid']:.4g}, 95% interval "
            f"[{fl['kid_interval'][0]:.3g}, {fl['kid_interval'][1]:.3g}]) is what 'as good as the data' "
            "looks like; its FID is mostly the finite-sample bias of FID at this sample count.",
        ]
    lines += [
        "",
        f"Sampling speed (batch {speed['batch']}, this machine): teacher 35 NFE "
        f"{speed['s_per_sample']['teacher_35nfe'] * 1e3:.2f} ms/sample, DMD one-step "
        f"{speed['s_per_sample']['dmd'] * 1e3:.3f} ms/sample: {speed['speedup']:.1f}x faster "
        "(the NFE ratio is 35).",
        "",
        f"Settings: {cfg.num_pairs} regression pairs ({cfg.reg_loss}, weight {cfg.reg_weight:g} in DMD); {cfg.distill_steps} distillation steps "
        f"per run at batch {cfg.batch_size}, lr {cfg.lr}, {cfg.fake_updates} fake-score update(s) per "
        f"generator update; seed {cfg.seed}. Total time {elapsed:.0f} s.",
        "Reproduce: `dmdctl demo --config " + str(out / "config.toml") + "`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def run(cfg: DemoConfig) -> int | None:
    """Run the command on resolved settings (its help: :data:`dmdctl.settings.demo.HELP`)."""

    run_demo(cfg)
    return None
