"""Run every 2-process command many times in a row and count the launches that fail.

A clean run must exit 0 every time: a process that aborts at exit (SIGABRT, "terminate called
without an active exception") makes torchrun report a failed job although the work was done.
This is a stress script, not a test: it takes minutes. Usage:

    python scripts/stress_multiprocess.py --repeat 30 --load 1
    python scripts/stress_multiprocess.py --repeat 5 --commands eval-fid distill

Each launch is ``python -m torch.distributed.run --nproc_per_node 2 -m dmdctl <command> ...``
with OMP_WAIT_POLICY=PASSIVE and one thread per process; ``--load K`` keeps K extra busy
processes running meanwhile (the "under load" of the check). Small settings (a toy2d teacher
trained for a few seconds) keep one launch to a few seconds. The log of every failed launch is
kept under ``--work``; the summary is one row per command.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = ("make-pairs", "distill", "eval-fid", "sample")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return dict(
        os.environ,
        OMP_WAIT_POLICY="PASSIVE",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        DMDCTL_THREADS="1",
        DMDCTL_QUIET="1",
    )


def busy(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 1_103_515_245 + 12_345) % 2_147_483_648


def dmdctl(*args) -> list[str]:
    return [sys.executable, "-m", "dmdctl", *map(str, args)]


def prepare(work: Path) -> dict:
    teacher = work / "teacher"
    subprocess.run(
        dmdctl("train-teacher", "toy2d", "--out", teacher, "--steps", 300, "--batch-size", 256),
        env=env(),
        check=True,
        capture_output=True,
    )
    pairs = work / "pairs"
    subprocess.run(
        dmdctl(
            "make-pairs",
            "--teacher-path",
            teacher / "teacher.safetensors",
            "--out",
            pairs,
            "--num-pairs",
            256,
            "--shard-size",
            64,
            "--steps",
            8,
        ),  # fmt: skip
        env=env(),
        check=True,
        capture_output=True,
    )
    return {"teacher": str(teacher / "teacher.safetensors"), "pairs": str(pairs)}


def command_args(name: str, assets: dict, out: Path) -> list[str]:
    t = assets["teacher"]
    if name == "make-pairs":
        return ["--teacher-path", t, "--out", str(out), "--num-pairs", "256",
                "--shard-size", "32", "--steps", "8", "--device", "cpu"]  # fmt: skip
    if name == "distill":
        return ["--teacher-path", t, "--pairs", assets["pairs"], "--out", str(out),
                "--steps", "20", "--batch-size", "64", "--pair-batch-size", "32",
                "--checkpoint-every", "10", "--log-every", "5", "--plot-samples", "0",
                "--eval-every", "10", "--eval-samples", "200", "--cpu"]  # fmt: skip
    if name == "eval-fid":
        return ["--teacher-path", t, "--steps", "2", "--num-samples", "700",
                "--batch-size", "100", "--device", "cpu", "-o", str(out / "stats.npz"),
                "--json", str(out / "fid.json")]  # fmt: skip
    if name == "sample":
        # torchrun's own parser takes a bare "--num" for its "--numa-binding": use a config file
        out.mkdir(parents=True, exist_ok=True)
        (out / "sample.toml").write_text("num = 500\n")
        return ["--teacher-path", t, "--steps", "4", "--config", str(out / "sample.toml"),
                "--out", str(out), "--no-plot", "--device", "cpu"]  # fmt: skip
    raise ValueError(name)


def launch(name: str, assets: dict, out: Path) -> tuple[int, str, float]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "dmdctl", name, *command_args(name, assets, out),
    ]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    return r.returncode, r.stdout + r.stderr, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30, help="launches per command")
    ap.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=COMMANDS)
    ap.add_argument("--load", type=int, default=1, help="extra busy processes meanwhile")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the counts here")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="dmdctl-stress-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", flush=True)
    assets = prepare(work)
    stop = mp.Event()
    hogs = [mp.Process(target=busy, args=(stop,), daemon=True) for _ in range(args.load)]
    for h in hogs:
        h.start()
    rows = []
    try:
        for name in args.commands:
            failed, aborts, times = [], 0, []
            for i in range(args.repeat):
                out = work / "runs" / f"{name}-{i:03d}"
                code, log, seconds = launch(name, assets, out)
                times.append(seconds)
                if "terminate called" in log or "SIGABRT" in log:
                    aborts += 1
                if code != 0:
                    failed.append(i)
                    (work / f"failed-{name}-{i:03d}.log").write_text(log)
                shutil.rmtree(out, ignore_errors=True)
                print(f"{name} {i + 1}/{args.repeat}: exit {code} ({seconds:.1f} s)", flush=True)
            rows.append(
                {
                    "command": name,
                    "launches": args.repeat,
                    "nonzero_exits": len(failed),
                    "aborts": aborts,
                    "failed_launches": failed,
                    "mean_s": round(sum(times) / len(times), 1),
                }
            )
    finally:
        stop.set()
        for h in hogs:
            h.join(timeout=5)
    print(f"\n2 processes (torchrun, gloo), {args.load} busy process(es) beside them")
    print(f"{'command':<12}{'launches':>9}{'non-zero':>10}{'aborts':>8}{'mean s':>8}")
    for r in rows:
        print(
            f"{r['command']:<12}{r['launches']:>9}{r['nonzero_exits']:>10}{r['aborts']:>8}"
            f"{r['mean_s']:>8}"
        )
    if args.json:
        args.json.write_text(json.dumps({"load": args.load, "rows": rows}, indent=1))
    return 1 if any(r["nonzero_exits"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
