"""The speed suite: every speed benchmark in one run, each printing its table of ratios.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.all            # CPU, small sizes (~3 min on 2 cores)
    python -m benchmarks.all --device cuda --record             # GPU sizes (~5 min), appends to BENCHMARKS.md

Parts (each also runs alone, see its docstring): one_step (one-step generation vs the teacher's
sampler), train_step (DMD step vs its network passes, and the measured options), make_pairs_speed
(make-pairs vs the bare sampler), fid_speed (Fréchet distance, Inception feature throughput),
memory (peak memory of a training step per teacher; on CUDA also benchmarks/sd_step.py and
benchmarks/edm_step.py, run last: edm_step with at most 90 s, sd_step with what is left of
``--budget``, the suite's whole time). A part that fails is reported
and the suite goes on; a row whose package is missing (diffusers for digits, torch-fidelity for
Inception) is skipped with a note.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from . import common
from .common import pick_device, say


def plan(device: str, threads: int, quick: bool) -> list[tuple[str, list[str]]]:
    t = ["--threads", str(threads)]
    if device == "cuda":
        return [
            ("one_step", ["--device", "cuda", "--repeats", "5", *t]),
            ("train_step", ["--device", "cuda", "--repeats", "10", "--fused-adamw",
                            "--channels-last", "--batched-scores", "--bf16", "--inference-mode",
                            *t]),
            ("make_pairs_speed", ["--device", "cuda", "--repeats", "3", *t]),
            ("fid_speed", ["--device", "cuda", "--repeats", "1", "--batch", "128", *t]),
            ("memory", ["--device", "cuda", "--rows", "toy2d,65536,65536,1", "digits,512,512,3",
                        "digits,2048,2048,3", *t]),
        ]  # fmt: skip
    if quick:  # the smoke-test sizes (seconds per part)
        return [
            ("one_step", ["--device", "cpu", "--repeats", "1", "--steps", "2",
                          "--batch", "toy2d=256", "digits=8", *t]),
            ("train_step", ["--device", "cpu", "--repeats", "1", "--settings",
                            "toy2d=64,64,1", "digits=8,8,1", "--fused-adamw", "--channels-last",
                            "--batched-scores", "--bf16", "--inference-mode", *t]),
            ("make_pairs_speed", ["--device", "cpu", "--repeats", "1", "--steps", "2",
                                  "--settings", "toy2d=256,128,128", "digits=16,16,8", *t]),
            ("fid_speed", ["--device", "cpu", "--repeats", "1", "--dim", "64", "--samples",
                           "256", "--batch", "2", *t]),
            ("memory", ["--device", "cpu", "--steps", "1", "--rows", "toy2d,64,64,1", *t]),
        ]  # fmt: skip
    return [
        ("one_step", ["--device", "cpu", "--repeats", "5", *t]),
        ("train_step", ["--device", "cpu", "--repeats", "7", "--fused-adamw", "--channels-last",
                        "--batched-scores", "--bf16", "--inference-mode", *t]),
        ("make_pairs_speed", ["--device", "cpu", "--repeats", "3", *t]),
        ("fid_speed", ["--device", "cpu", "--repeats", "1", "--batch", "8", *t]),
        ("memory", ["--device", "cpu", *t]),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 on CPU, 4 on CUDA)"
    )
    ap.add_argument("--record", action="store_true", help="append every table to BENCHMARKS.md")
    ap.add_argument("--only", nargs="*", help="run only these parts")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the suite)")
    ap.add_argument(
        "--budget", type=float, default=None,
        help="seconds the suite aims to finish in; the external sd/edm scripts get what is left "
        "(default 300 on CUDA)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    device = pick_device(args.device).type
    threads = args.threads or (4 if device == "cuda" else 1)
    budget = args.budget or (300.0 if device == "cuda" else 900.0)
    t0 = time.perf_counter()
    suite_cmd = " ".join(
        [
            "OMP_WAIT_POLICY=PASSIVE python -m benchmarks.all",
            *(argv if argv is not None else sys.argv[1:]),
        ]
    )
    failed = []
    parts = [p for p in plan(device, threads, args.quick) if not args.only or p[0] in args.only]
    for i, (name, sub) in enumerate(parts, 1):
        if args.record:
            sub = [*sub, "--record"]
        if name == "memory" and device == "cuda":
            from . import memory

            # the external scripts get what the budget leaves after the memory rows (~45 s)
            memory.DEADLINE = t0 + budget - 5
        say(f"suite part {i}/{len(parts)}: {name} ({time.perf_counter() - t0:.0f} s so far)")
        common.SUITE.update(command=suite_cmd, part=f"python -m benchmarks.{name} {' '.join(sub)}")
        try:
            module = __import__(f"benchmarks.{name}", fromlist=["main"])
            module.main(sub)
        except Exception:  # a failing part is reported; the others still run
            failed.append(name)
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            common.SUITE.clear()
    took = time.perf_counter() - t0
    say(f"suite done in {took:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
