"""Shared bits of the benchmark scripts: machine description and BENCHMARKS.md appends."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


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


def append_markdown(title: str, body: str, module: str) -> Path:
    path = ROOT / "BENCHMARKS.md"
    if not path.exists():
        path.write_text("# Benchmarks\n\nAppended by the scripts under benchmarks/; newest last.\n")
    cmd = " ".join(["OMP_WAIT_POLICY=PASSIVE python -m", module, *sys.argv[1:]])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(path, "a") as f:
        f.write(
            f"\n## {title}\n\n- command: `{cmd}`\n- machine: {machine()}\n- date: {stamp}\n\n{body}\n"
        )
    return path
