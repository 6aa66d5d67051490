"""The ablation tables of toy2d and digits, measured with an instrument that can tell rows apart.

For each teacher and each seed (the seed is the seed of the pairs and of every distillation
run, and it moves the sampling noise of the evaluation; the teacher is one: the shipped digits
teacher, and one toy2d teacher trained once with seed 0), the rows

    teacher 35 NFE, teacher 1 step, full DMD, no regression, regression only, real score only,
    and with --runs: DMD2 without GAN, DMD2 one step, DMD2 4 steps

are scored against the teacher's own training data (``dmdctl.metrics.quality``): KID on standardised
features (± std over 100 subsets), FID (sample count and reference size stated), precision,
recall, density, coverage (k = 3), and the kind's own metrics (class accuracy; modes covered);
with a percentile bootstrap interval over samples for KID and precision/recall. A row's
interval is the hull of its per-seed bootstrap intervals (seed-to-seed spread plus sampling
noise); two rows are called different only when their intervals do not overlap.

Targets checked (issue 12): two disjoint halves of the digits training set score a KID whose
interval contains 0; the KID gap between the teacher at 35 NFE and at 1 step is at least 20
times the seed-to-seed standard deviation of either.

The distillation settings are the demo's (``dmdctl.settings.demo.DEMO_DEFAULTS``; DMD2's:
``DMD2_RUN``). The teacher rows vary by sampling seed only.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.quality_ablation --teachers toy2d digits --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("DMDCTL_QUIET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dmdctl.commands.make_pairs import make_pairs  # noqa: E402
from dmdctl.commands.train_teacher import train_teacher  # noqa: E402
from dmdctl.generators import load_generator, teacher_source  # noqa: E402
from dmdctl.metrics.evaluate import evaluate  # noqa: E402
from dmdctl.metrics.intervals import compare_intervals, hull  # noqa: E402
from dmdctl.metrics.quality import score_features, score_floor, training_reference  # noqa: E402
from dmdctl.settings.demo import (  # noqa: E402
    DEMO_DEFAULTS,
    DMD2_4STEP_SIGMAS,
    DMD2_FAKE_UPDATES,
    DMD2_FROM_REGRESSION,
    DMD2_RUN,
    distill_settings,
    run_settings,
)
from dmdctl.settings.distill import DistillConfig  # noqa: E402
from dmdctl.settings.eval_fid import EVAL_SEED_START, EvalFidConfig  # noqa: E402
from dmdctl.settings.make_pairs import MakePairsConfig  # noqa: E402
from dmdctl.settings.train_teacher import TrainTeacherConfig  # noqa: E402
from dmdctl.teachers import get_kind, load_teacher  # noqa: E402
from dmdctl.training.loop import distill  # noqa: E402

from .common import finish, say  # noqa: E402

ROWS = {
    "teacher_35nfe": "teacher 35 NFE",
    "teacher_1step": "teacher 1 step",
    "dmd": "DMD (DM + regression)",
    "dmd_no_reg": "no regression",
    "dmd_reg_only": "regression only",
    "dmd_real_only": "real score only",
    "dmd2_no_gan": "DMD2 without GAN (no regression, TTUR)",
    "dmd2": "DMD2 1 step (GAN, no regression)",
    "dmd2_4step": "DMD2 4 steps (GAN, backward simulation)",
    "dmd2_reg_init": "DMD2 1 step from the regression-only generator",
}
RUNS = {
    "dmd": {},
    "dmd_no_reg": {"reg_weight": 0.0},
    "dmd_reg_only": {"dm_weight": 0.0},
    "dmd_real_only": {"real_only": True, "reg_weight": 0.0},
    # DMD2 (dmdctl.settings.demo.DMD2_RUN; docs/RECIPES.md, "Built-in teachers: DMD2")
    "dmd2_no_gan": dict(DMD2_RUN, gan_weight=0.0),  # on digits the same run as dmd_no_reg
    "dmd2": DMD2_RUN,
    "dmd2_4step": dict(DMD2_RUN, denoising_steps=DMD2_4STEP_SIGMAS),
    # two stages: needs the dmd_reg_only run first (listed before it in --runs)
    "dmd2_reg_init": DMD2_FROM_REGRESSION,
}
DEFAULT_RUNS = ["dmd", "dmd_no_reg", "dmd_reg_only", "dmd_real_only"]
SEED_STRIDE = 100_000  # pairs and evaluation noise of seed s start at s * stride (+ eval offset)


def run_seed(teacher_name: str, seed: int, args, root: Path, done: dict | None = None) -> dict:
    """Train (toy2d teacher), make pairs, distil every run, score every row: one seed. Rows in
    ``done`` (this seed's earlier results, same sample count) are kept, not run again."""
    done = done or {}
    d = args.settings[teacher_name]
    out = root / teacher_name / f"seed{seed}"
    teacher_path = teacher_file(teacher_name, root, d)
    teacher = load_teacher(teacher_path)
    runs = {name: RUNS[name] for name in args.runs if name not in done}
    sources = {
        name: teacher_source(teacher, steps)
        for name, steps in (("teacher_35nfe", 18), ("teacher_1step", 1))
        if name not in done
    }
    if runs:
        distill_runs(teacher_name, teacher_path, seed, runs, d, out)
        sources.update({n: load_generator(out / n / "generator.safetensors") for n in runs})
    n = args.samples[teacher_name]
    return {**done, **evaluate_rows(teacher_name, seed, sources, n, args)}


def kind_of(teacher_name: str) -> str:
    """toy2d-flow (the flow-matching toy) is measured as toy2d is, with toy2d's settings."""
    return get_kind(teacher_name).name


def teacher_file(teacher_name: str, root: Path, d: dict) -> Path:
    """The shipped digits teacher; one toy2d (or toy2d-flow) teacher, trained once (seed 0) for
    every seed."""
    if kind_of(teacher_name) != "toy2d":
        return get_kind(teacher_name).default_path()
    path = root / teacher_name / "teacher" / "teacher.safetensors"
    if not path.is_file():
        say(f"{teacher_name}: training the teacher ({d['teacher_steps']} steps, seed 0)")
        train_teacher(TrainTeacherConfig(teacher=teacher_name, out=str(path.parent),
                                         steps=d["teacher_steps"], seed=0))  # fmt: skip
    return path


def distill_runs(teacher_name, teacher_path, seed, runs, d, out) -> None:
    say(f"{teacher_name} seed {seed}: {d['num_pairs']} pairs")
    # a finished pairs folder is kept as it is (make-pairs continues after its last shard)
    make_pairs(MakePairsConfig(teacher_path=str(teacher_path), out=str(out / "pairs"),
                               num_pairs=d["num_pairs"], seed=seed * SEED_STRIDE, batch_size=500))  # fmt: skip
    base = DistillConfig(
        teacher_path=str(teacher_path),
        pairs=str(out / "pairs"),
        steps=d["distill_steps"],
        seed=seed,
        checkpoint_every=d["distill_steps"],
        plot_samples=0,
        **distill_settings(d),
    )
    for name, overrides in runs.items():
        if name.startswith("dmd2"):  # DMD2's two time-scale rule, per teacher
            overrides = dict(overrides, fake_updates=DMD2_FAKE_UPDATES[kind_of(teacher_name)])
        if not (out / name / "generator.safetensors").is_file():
            say(f"{teacher_name} seed {seed}: distilling {name} ({d['distill_steps']} steps)")
            distill(run_settings(base, name, overrides, out))


def evaluate_rows(teacher_name, seed, sources, n, args) -> dict:
    ecfg = EvalFidConfig(num_samples=n, seed=EVAL_SEED_START + seed * SEED_STRIDE,
                         precision_recall=True, bootstrap=args.bootstrap, batch_size=500,
                         kid_max_features=max(n, 10_000))  # fmt: skip
    res = {}
    for name, src in sources.items():
        t0 = time.perf_counter()
        r = evaluate(ecfg, src, show_progress=False)
        r.pop("versions", None)
        res[name] = r
        say(f"{teacher_name} seed {seed}: {name} KID {r['kid']:.4g} ± {r['kid_std']:.2g}, "
            f"P {r['precision']:.3f} R {r['recall']:.3f} ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    return res


def halves_check(teacher_name: str, bootstrap: int) -> dict | None:
    """KID of two disjoint halves of the training data (same distribution: interval holds 0)."""
    if teacher_name != "digits":
        return None
    kind = get_kind("digits")
    ref = training_reference(kind, load_teacher(kind.default_path()).config)
    perm = np.random.default_rng(0).permutation(len(ref.features))
    a, b = ref.features[perm[: len(perm) // 2]], ref.features[perm[len(perm) // 2 :]]
    r = score_features(b, a, standardise=True, precision_recall=True, bootstrap=bootstrap)
    r["sizes"] = [len(a), len(b)]
    return r


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(teacher_name: str, per_seed: dict[int, dict], floor: dict, halves, args) -> str:
    seeds = sorted(per_seed)
    # a row's seeds: those that ran it (the teacher rows run on every seed)
    row_seeds = {r: [s for s in seeds if r in per_seed[s]] for r in ROWS}
    rows = [r for r in ROWS if row_seeds[r]]
    any_row = per_seed[seeds[0]]["teacher_35nfe"]
    ref = any_row["reference"]
    n = any_row["num_samples"]
    fmt = "{:.4f}" if kind_of(teacher_name) == "toy2d" else "{:.2f}"

    def agg(row, key):
        return mean_std([per_seed[s][row][key] for s in row_seeds[row]])

    def interval(row, key):
        return hull([per_seed[s][row][f"{key}_interval"] for s in row_seeds[row]])

    extra_cols = (
        ["class accuracy"] if teacher_name == "digits" else ["modes covered", "within 3 std"]
    )
    head = ["row", "seeds", "KID (mean ± seed std)", "KID interval", "FID", "precision [interval]",
            "recall [interval]", "density", "coverage", *extra_cols]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        km, ks = agg(row, "kid")
        ki = interval(row, "kid")
        fm, fs = agg(row, "fid")
        cells = [ROWS[row], ",".join(map(str, row_seeds[row])), f"{km:.4f} ± {ks:.4f}", f"[{ki[0]:.4f}, {ki[1]:.4f}]",
                 f"{fmt.format(fm)} ± {fmt.format(fs)}"]  # fmt: skip
        for key in ("precision", "recall"):
            m, s = agg(row, key)
            iv = interval(row, key)
            cells.append(f"{m:.3f} ± {s:.3f} [{iv[0]:.3f}, {iv[1]:.3f}]")
        for key in ("density", "coverage"):
            m, s = agg(row, key)
            cells.append(f"{m:.3f} ± {s:.3f}")
        if teacher_name == "digits":
            m, s = agg(row, "class_accuracy")
            cells.append(f"{m:.3f} ± {s:.3f}")
        else:
            cells.append(" / ".join(str(per_seed[s][row]["modes_covered"]) for s in row_seeds[row]))
            m, s = agg(row, "frac_within_3std")
            cells.append(f"{m:.3f} ± {s:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    fl = floor
    fl_cells = [f"floor: {fl['source']}", "-", f"{fl['kid']:.4f} ± {fl['kid_std']:.4f} (subsets)",
                f"[{fl['kid_interval'][0]:.4f}, {fl['kid_interval'][1]:.4f}]", fmt.format(fl["fid"]),
                f"{fl['precision']:.3f} [{fl['precision_interval'][0]:.3f}, {fl['precision_interval'][1]:.3f}]",
                f"{fl['recall']:.3f} [{fl['recall_interval'][0]:.3f}, {fl['recall_interval'][1]:.3f}]",
                f"{fl['density']:.3f}", f"{fl['coverage']:.3f}"]  # fmt: skip
    if teacher_name == "digits":
        fl_cells.append(f"{fl['class_accuracy']:.3f}")
    else:
        fl_cells += [str(fl["modes_covered"]), f"{fl['frac_within_3std']:.3f}"]
    lines.append("| " + " | ".join(fl_cells) + " |")

    # separation matrices: cell (A, B) says how A's interval lies against B's
    sym = {"lower": "lower", "higher": "higher", "not separated": "n.s."}
    blocks = []
    for key, better in (("kid", "lower"), ("precision", "higher"), ("recall", "higher")):
        m = [
            "| " + key + " | " + " | ".join(ROWS[r] for r in rows) + " |",
            "|---" * (len(rows) + 1) + "|",
        ]
        for a in rows:
            cells = [
                "-" if a == b else sym[compare_intervals(interval(a, key), interval(b, key))]
                for b in rows
            ]
            m.append(f"| {ROWS[a]} | " + " | ".join(cells) + " |")
        blocks.append(f"{key} ({better} is better): row against column\n\n" + "\n".join(m))
    not_sep = [
        f"{ROWS[a]} / {ROWS[b]}"
        for i, a in enumerate(rows) for b in rows[i + 1 :]
        if compare_intervals(interval(a, "kid"), interval(b, "kid")) == "not separated"
    ]  # fmt: skip

    # targets
    k35, s35 = agg("teacher_35nfe", "kid")
    k1, s1 = agg("teacher_1step", "kid")
    gap = abs(k1 - k35)
    worst = max(s35, s1)
    ratio = gap / worst if worst > 0 else float("inf")
    targets = [
        f"- resolution: KID gap teacher 1 step - teacher 35 NFE = {gap:.4f}; seed std {s35:.4f} / "
        f"{s1:.4f}: gap = {ratio:.0f}x the larger std (target >= 20x): "
        f"**{'met' if ratio >= 20 else 'NOT met'}**"
    ]
    if halves is not None:
        lo, hi = halves["kid_interval"]
        ok = lo <= 0 <= hi
        targets.append(
            f"- same distribution: two disjoint halves of the digits training set ({halves['sizes'][0]} "
            f"and {halves['sizes'][1]} images): KID {halves['kid']:.4f} ± {halves['kid_std']:.4f} "
            f"(subsets of {halves['kid_subset_size']}{': each holds every feature, so no spread' if halves['kid_subset_size'] == min(halves['sizes']) else ''}), on all features {halves['kid_all']:.4f}, "
            f"95% interval [{lo:.4f}, {hi:.4f}]: contains 0: **{'met' if ok else 'NOT met'}**; "
            f"precision {halves['precision']:.3f}, recall {halves['recall']:.3f}"
        )
    targets.append(f"- rows not separated by KID: {', '.join(not_sep) if not_sep else 'none'}")
    d = args.settings[teacher_name]
    return (
        f"{teacher_name}: seeds {seeds}; {n} samples per row and seed against {ref['builtin']} "
        f"(KID/precision/recall features: {ref.get('features_of')}, {ref.get('num_samples')} points); "
        f"KID on standardised features, 100 subsets of {any_row['kid_subset_size']}; precision/recall "
        f"k = {any_row['pr_k']}; intervals: 95% percentile bootstrap over samples "
        f"({args.bootstrap} rounds), a row's interval the hull over its seeds. Distillation as the "
        f"demo: {d['num_pairs']} pairs, {d['distill_steps']} steps, lr {d['lr']}, batch "
        f"{d['batch_size']}, {d['fake_updates']} fake update(s), {d['reg_loss']} regression (weight {d['reg_weight']:g}).\n\n"
        + "\n".join(lines) + "\n\n" + "\n".join(targets) + "\n\n" + "\n\n".join(blocks) + "\n"
    )  # fmt: skip


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--teachers",
        nargs="+",
        default=["toy2d", "digits"],
        choices=["toy2d", "toy2d-flow", "digits"],
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--samples", nargs="+",
                    default=["toy2d=10000", "toy2d-flow=10000", "digits=5000"],
                    help="samples per row and seed, per teacher (name=N)")  # fmt: skip
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap rounds")
    ap.add_argument("--runs", nargs="*", default=DEFAULT_RUNS, choices=list(RUNS),
                    help="distillation rows to run (default: DMD's ablations; none: the teacher "
                         "rows only; dmd2 dmd2_4step dmd2_no_gan: DMD2's)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/quality_ablation"),
                    help="runs and per-seed results (a finished seed is not run again)")  # fmt: skip
    ap.add_argument("--record", action="store_true", help="append the tables to BENCHMARKS.md")
    ap.add_argument("--distill-steps", type=int, default=None,
                    help="steps of every distillation run (default: the demo's)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # tests: tiny sizes
    args = ap.parse_args(argv)
    for i, name in enumerate(args.runs):  # a two-stage row starts from a run listed before it
        first = RUNS[name].get("init_from_run")
        if first is not None and first not in args.runs[:i]:
            ap.error(f"--runs: {name} starts from {first}'s generator: list {first} before it")
    args.samples = {k: int(v) for k, v in (s.split("=") for s in args.samples)}
    torch.set_num_threads(max(1, args.threads))
    quick = dict(teacher_steps=30, num_pairs=16, distill_steps=2, batch_size=16, warmup=1)
    longer = {"distill_steps": args.distill_steps} if args.distill_steps else {}
    args.settings = {
        name: dict(DEMO_DEFAULTS[kind_of(name)], **longer, **(quick if args.quick else {}))
        for name in args.teachers
    }
    bodies = []
    for teacher_name in args.teachers:
        t0 = time.time()
        per_seed = {}
        for seed in args.seeds:
            path = args.out / teacher_name / f"seed{seed}" / "results.json"
            done = json.loads(path.read_text()) if path.is_file() and not args.quick else {}
            if any(r.get("num_samples") != args.samples[teacher_name] for r in done.values()):
                done = {}  # scored at another sample count: every row again
            wanted = {"teacher_35nfe", "teacher_1step", *args.runs}
            if wanted <= set(done):
                per_seed[seed] = done
                continue
            per_seed[seed] = run_seed(teacher_name, seed, args, args.out, done)
            path.write_text(json.dumps(per_seed[seed], indent=1) + "\n")
        teacher = load_teacher(teacher_file(teacher_name, args.out, args.settings[teacher_name]))
        # the floor and the halves depend on the sample count and the rounds only: kept if made
        saved = args.out / teacher_name / "floor.json"
        key = {"samples": args.samples[teacher_name], "bootstrap": args.bootstrap}
        old = json.loads(saved.read_text()) if saved.is_file() and not args.quick else {}
        if old.get("key") == key:
            floor, halves = old["floor"], old["halves"]
        else:
            floor = score_floor(teacher.kind, teacher.config, args.samples[teacher_name],
                                bootstrap=args.bootstrap)  # fmt: skip
            floor.pop("versions", None)
            halves = halves_check(teacher_name, args.bootstrap)
            saved.write_text(
                json.dumps({"key": key, "floor": floor, "halves": halves}, indent=1, default=str)
                + "\n"
            )
        body = summarise(teacher_name, per_seed, floor, halves, args)
        body += f"\nTotal {(time.time() - t0) / 60:.1f} min ({args.threads} torch thread(s)).\n"
        bodies.append(finish(args, f"quality with intervals: {teacher_name} ablations", body,
                             "benchmarks.quality_ablation"))  # fmt: skip
    return "\n".join(bodies)


if __name__ == "__main__":
    main()
