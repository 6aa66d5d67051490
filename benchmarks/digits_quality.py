"""The paper's ablation table on the built-in digits teacher, with FID-against-step curves.

Rows, all scored with the shipped classifier features on the same number of samples against the
training split: teacher 35-NFE Heun, teacher 1 step, DMD (DM + regression), DMD without
regression, regression only; plus the floor (the 297 held-out images against the same reference). Each distillation row logs
the FID of its EMA generator every ``--eval-every`` steps, and the table prints those curves.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.digits_quality --steps 1500 --eval-every 250
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("DMDCTL_QUIET", "1")

import torch  # noqa: E402

from dmdctl.commands.make_pairs import make_pairs  # noqa: E402
from dmdctl.generators import teacher_source  # noqa: E402
from dmdctl.metrics.evaluate import evaluate  # noqa: E402
from dmdctl.metrics.quality import score_floor  # noqa: E402
from dmdctl.settings.distill import DistillConfig  # noqa: E402
from dmdctl.settings.eval_fid import EvalFidConfig  # noqa: E402
from dmdctl.settings.make_pairs import MakePairsConfig  # noqa: E402
from dmdctl.teachers import load_teacher  # noqa: E402
from dmdctl.teachers.digits import TEACHER_FILE, Digits  # noqa: E402
from dmdctl.training.loop import distill  # noqa: E402

from .common import append_markdown  # noqa: E402

ROWS = {
    "dmd": {},
    "dmd_no_reg": {"reg_weight": 0.0},
    "dmd_reg_only": {"dm_weight": 0.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--num-pairs", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--fake-lr", type=float, default=None, help="default: --lr")
    ap.add_argument("--fake-updates", type=int, default=1)
    ap.add_argument("--reg-loss", default="l2")
    ap.add_argument("--reg-weight", type=float, default=0.25)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--min-step-frac", type=float, default=0.02)
    ap.add_argument("--max-step-frac", type=float, default=0.98)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--out", type=Path, default=None, help="keep the runs here (default: a temp folder)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher = load_teacher(TEACHER_FILE)
    kind = Digits()
    ecfg = EvalFidConfig(num_samples=args.eval_samples)
    t0 = time.time()
    fixed = {
        "teacher 35 NFE": evaluate(ecfg, teacher_source(teacher, 18), show_progress=False),
        "teacher 1 step": evaluate(ecfg, teacher_source(teacher, 1), show_progress=False),
        "floor (297 held-out images)": score_floor(kind, teacher.config, precision_recall=False),
    }
    curves: dict[str, list[tuple[int, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        make_pairs(
            MakePairsConfig(
                teacher_path=str(TEACHER_FILE),
                out=str(root / "pairs"),
                num_pairs=args.num_pairs,
                batch_size=500,
            )
        )
        base = DistillConfig(
            teacher_path=str(TEACHER_FILE),
            pairs=str(root / "pairs"),
            steps=args.steps,
            batch_size=args.batch_size,
            pair_batch_size=args.batch_size,
            lr=args.lr,
            fake_lr=args.fake_lr or args.lr,
            fake_updates=args.fake_updates,
            reg_loss=args.reg_loss,
            reg_weight=args.reg_weight,
            ema_decay=args.ema_decay,
            min_step_frac=args.min_step_frac,
            max_step_frac=args.max_step_frac,
            eval_every=args.eval_every,
            eval_samples=args.eval_samples,
            checkpoint_every=args.steps,
            plot_samples=100,
        )
        for name in args.rows:
            out = root / name
            distill(replace(base, out=str(out), **ROWS[name]))
            rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
            curves[name] = [
                (r["step"], r["eval_fid"], r["eval_class_accuracy"])
                for r in rows
                if "eval_fid" in r
            ]
            print(name, curves[name], flush=True)
    elapsed = time.time() - t0
    lines = ["| row | NFE | KID ± std | FID | class accuracy |", "|---|---|---|---|---|"]
    for name, m in fixed.items():
        kid = f"{m['kid']:.4f} ± {m['kid_std']:.4f}" if m.get("kid") is not None else "-"
        lines.append(
            f"| {name} | {m['nfe']} | {kid} | {m['fid']:.2f} | {m['class_accuracy']:.3f} |"
        )
    for name, curve in curves.items():
        step, fid, acc = curve[-1]
        best = min(curve, key=lambda r: r[1])
        lines.append(
            f"| {name} (step {step}; best {best[1]:.2f} at step {best[0]}) | 1 | - | {fid:.2f} | {acc:.3f} |"
        )
    steps = sorted({s for c in curves.values() for s, _, _ in c})
    curve_lines = ["| step | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|"]
    for s in steps:
        cells = [next((f"{f:.2f}" for st, f, _ in c if st == s), "-") for c in curves.values()]
        curve_lines.append(f"| {s} | " + " | ".join(cells) + " |")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "rows")}
    body = (
        f"digits (shipped teacher), FID with the shipped classifier's 64-d features on {args.eval_samples} samples "
        f"per row against {fixed['teacher 35 NFE']['reference']['builtin']}; KID on standardised "
        "features; the floor is the 297 held-out images against the same reference (see "
        "benchmarks.quality_ablation for seeds and intervals).\n"
        f"Settings: {json.dumps(settings)}. Total {elapsed / 60:.1f} min.\n\n"
        + "\n".join(lines)
        + "\n\nFID of the EMA generator against step:\n\n"
        + "\n".join(curve_lines)
        + "\n"
    )
    print(body)
    print(
        "appended to",
        append_markdown(
            "digits quality: DMD against its ablations", body, "benchmarks.digits_quality"
        ),
    )


if __name__ == "__main__":
    main()
