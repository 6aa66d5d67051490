"""Does one-step DMD on toy2d keep every mode and stay sharp, and do the ablations fail as in the paper?

Runs the whole demo (teacher training, pairs, DMD and its ablations, evaluation) for several seeds
and prints, per seed, mode coverage and the fraction of samples within 3 std of a mode, with
DMD's fraction as a ratio of the teacher's (target: 8/8 modes and >= 0.70 of the teacher's).

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.toy2d_quality --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("DMDCTL_QUIET", "1")

from dmdctl.commands.demo import run_demo  # noqa: E402
from dmdctl.settings.demo import DemoConfig  # noqa: E402

from .common import append_markdown  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--num-pairs", type=int, default=128)
    ap.add_argument("--distill-steps", type=int, default=2000)
    ap.add_argument(
        "--out", type=Path, default=None, help="keep the runs here (default: a temp folder)"
    )
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        for seed in args.seeds:
            m = run_demo(
                DemoConfig(
                    teacher="toy2d",
                    out=str(root / f"seed{seed}"),
                    seed=seed,
                    num_pairs=args.num_pairs,
                    distill_steps=args.distill_steps,
                )
            )
            t, d = m["teacher_35nfe"], m["dmd"]
            rows.append(
                (
                    seed,
                    t,
                    d,
                    m["teacher_1step"],
                    m["dmd_real_only"],
                    m["dmd_no_reg"],
                    m["dmd_reg_only"],
                )
            )
    header = (
        "| seed | teacher 35 NFE (modes, within 3 std) | teacher 1 step | DMD 1 step | DMD / teacher "
        "within-3std | real score only | no regression | regression only |"
    )
    lines = [header, "|---" * 8 + "|"]

    def cell(m):
        return f"{m['modes_covered']}/8, {m['frac_within_3std']:.3f}"

    for seed, t, d, one, ro, nr, rg in rows:
        ratio = d["frac_within_3std"] / t["frac_within_3std"]
        lines.append(
            f"| {seed} | {cell(t)} | {cell(one)} | {cell(d)} | {ratio:.2f} | {cell(ro)} | {cell(nr)} | {cell(rg)} |"
        )
    n = rows[0][1]["num_samples"]
    body = (
        f"toy2d, {args.num_pairs} pairs, {args.distill_steps} distillation steps per run, {n} samples per "
        "row against the exact mixture moments.\n\n" + "\n".join(lines) + "\n"
    )
    print(body)
    print(
        "appended to",
        append_markdown(
            "toy2d quality: DMD against its ablations", body, "benchmarks.toy2d_quality"
        ),
    )


if __name__ == "__main__":
    main()
