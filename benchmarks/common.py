"""Shared bits of the benchmark scripts: machine description, BENCHMARKS.md appends, and the
interleaved timing every speed benchmark uses.

Timing rule: the runs a ratio compares are measured in the same process, interleaved (A, B, B, A,
A, B, ...) after a warm-up, and summarised by their medians, so a ratio holds on a noisy shared
machine even when the absolute times drift.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# which teachers need which optional packages (a row is skipped with a note when one is missing)
TEACHER_PACKAGES = {"toy2d": (), "digits": ("diffusers",)}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def append_markdown(
    title: str, body: str, module: str, command: str | None = None, part: str | None = None
) -> Path:
    path = ROOT / "BENCHMARKS.md"
    if not path.exists():
        path.write_text("# Benchmarks\n\nAppended by the scripts under benchmarks/; newest last.\n")
    cmd = command or " ".join(["OMP_WAIT_POLICY=PASSIVE python -m", module, *sys.argv[1:]])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(path, "a") as f:
        f.write(
            f"\n## {title}\n\n- command: `{cmd}`"
            + (f" (this part: `{part}`)" if part else "")
            + f"\n- machine: {machine()}\n- date: {stamp}\n\n{body}\n"
        )
    return path


# ------------------------------------------------------------------ arguments and devices


def add_common_args(ap: argparse.ArgumentParser, repeats: int) -> None:
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the machine is shared)",
    )
    ap.add_argument("--repeats", type=int, default=repeats, help="timed repetitions of each run")
    ap.add_argument(
        "--record", action="store_true", help="append the table to BENCHMARKS.md (off by default)"
    )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here")
    return dev


def setup(args) -> torch.device:
    """Thread count, seed and device of a benchmark run (``args`` from :func:`add_common_args`)."""
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(0)
    return pick_device(args.device)


def missing_packages(names) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


def skip_note(teacher: str) -> str | None:
    """Why a teacher's rows cannot run here (a package it needs is not installed), or None."""
    miss = missing_packages(TEACHER_PACKAGES.get(teacher, ()))
    return f"skipped: needs {', '.join(miss)} (not installed)" if miss else None


def say(msg: str) -> None:
    """Progress on stderr, flushed at once (a GPU run with a hard time limit must show where it is)."""
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# ------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    runs: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of each run, ``repeats`` times, interleaved (the order flips every round).
    ``clock``: wall time, or ``time.process_time`` (CPU seconds: on a machine shared with other
    work, the time a one-thread run computed, not the time it waited for a core)."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            sync(device)
            t0 = clock()
            runs[name]()
            sync(device)
            times[name].append(clock() - t0)
    return times


def median(ts: list[float]) -> float:
    return statistics.median(ts)


def spread(ts: list[float]) -> str:
    """Median and the range of the repetitions, for the tables."""
    return f"{fmt_s(median(ts))} ({fmt_s(min(ts))}-{fmt_s(max(ts))})"


def fmt_s(t: float) -> str:
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.1f} ms"
    return f"{t * 1e6:.0f} us"


def md_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# set by benchmarks.all while it runs a part: the command recorded is the suite's, naming the part
SUITE: dict[str, str] = {}


def finish(args, title: str, body: str, module: str, command: str | None = None) -> str:
    """Print the table (and append it to BENCHMARKS.md with ``--record``); returns the body."""
    print(f"\n## {title}\n\nmachine: {machine()}\n\n{body}\n", flush=True)
    if getattr(args, "record", False):
        part = None
        if command is None and SUITE:
            command, part = SUITE["command"], SUITE["part"]
        path = append_markdown(title, body, module, command, part)
        print(f"appended to {path}", flush=True)
    return body


# ------------------------------------------------------------------ teachers for the benchmarks


def teacher_file(name: str, folder: Path) -> Path:
    """A teacher file of the built-in kind ``name``: the shipped digits teacher, or a toy2d
    network with its initial (random) weights: the speed of a pass does not depend on them."""
    from dmdctl.teachers import get_kind, preset_config, save_teacher

    kind = get_kind(name)
    default = kind.default_path()
    if default is not None and default.is_file():
        return default
    kind, config = preset_config(name)
    torch.manual_seed(0)
    return save_teacher(kind.build(config), kind, config, Path(folder) / f"{name}.safetensors")
