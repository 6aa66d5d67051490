"""How much memory does a DMD training step take, per built-in teacher and batch size?

Each measurement runs in a fresh process (so one teacher's allocations cannot hide another's):
it builds the trainer exactly as ``dmdctl distill`` does, then runs ``--steps`` training steps.

- On CUDA: ``torch.cuda.max_memory_allocated`` over the steps, minus what was allocated before
  the first step (weights, EMA, pairs), and the absolute peak.
- On CPU: peak RSS growth: the kernel's high-water mark of the resident set (``VmHWM`` in
  ``/proc/self/status``, reset to the current RSS just before the first step by writing 5 to
  ``/proc/self/clear_refs``; where that reset is refused, ``resource.getrusage`` ``ru_maxrss``,
  which also counts the build) minus the RSS before the first step. tracemalloc does not see
  torch's allocations. The allocator keeps freed memory, so this bounds the step's peak above.

The SD1.5-shaped and ImageNet-64-shaped rows come from ``benchmarks/sd_step.py`` and
``benchmarks/edm_step.py`` (real-size networks): called when those files exist and the device is
CUDA, skipped with a note otherwise.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.memory
    python -m benchmarks.memory --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import add_common_args, finish, md_table, missing_packages, say, setup, skip_note

# (teacher, batch, pair batch, fake updates) rows
CPU_ROWS = [("toy2d", 512, 512, 1), ("toy2d", 4096, 4096, 1), ("digits", 64, 64, 3),
            ("digits", 256, 256, 3)]  # fmt: skip
CUDA_ROWS = [("toy2d", 8192, 8192, 1), ("toy2d", 65536, 65536, 1), ("digits", 512, 512, 3),
             ("digits", 2048, 2048, 3)]  # fmt: skip
# scripts written beside this one for the real-size teachers: (file, label, packages they need)
# (module, label, packages they need, longest time they may take); the SD one runs last and
# may use whatever is left before DEADLINE (time.perf_counter() value; set by benchmarks.all)
EXTERNAL = [
    ("edm_step", "ImageNet-64-shaped EDM (benchmarks/edm_step.py)", (), 90),
    ("sd_step", "SD1.5-shaped (benchmarks/sd_step.py)", ("diffusers",), 300),
]
DEADLINE: float | None = None
REPO = Path(__file__).resolve().parent.parent


def run_module(args: list[str], **kw) -> subprocess.CompletedProcess:
    """``python -m benchmarks....`` in a fresh process, from the repository root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, **kw
    )


def _hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _hwm_bytes()
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(name: str, B: int, P: int, fu: int, steps: int, device) -> dict:
    import torch

    from .train_step import make_trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(name, B, P, fu, device, Path(tmp))
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            hwm = reset_peak_rss()
            before = rss_bytes()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            method = "torch.cuda.max_memory_allocated"
        elif hwm:
            peak = _hwm_bytes()
            method = "peak RSS growth (VmHWM after a clear_refs reset)"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            method = "peak RSS growth (getrusage ru_maxrss, includes the build)"
        return {
            "before": before,
            "peak": peak,
            "growth": max(0, peak - before),
            "method": method,
            "seconds_per_step": (time.perf_counter() - t0) / steps,
        }


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def external(device) -> list[str]:
    """The real-size rows from the other benchmark scripts (their tables, verbatim)."""
    out = []
    for module, label, pkgs, longest in EXTERNAL:
        path = REPO / "benchmarks" / f"{module}.py"
        if not path.is_file():
            out.append(f"- {label}: skipped, {path.name} is not in this checkout.")
            continue
        if device.type != "cuda":
            out.append(f"- {label}: skipped on CPU (needs a real-size network on a GPU).")
            continue
        miss = missing_packages(pkgs)
        if miss:
            out.append(f"- {label}: skipped, needs {', '.join(miss)} (not installed).")
            continue
        timeout = longest
        if DEADLINE is not None:
            timeout = int(min(longest, DEADLINE - time.perf_counter()))
            if timeout < 20:
                out.append(f"- {label}: skipped, the suite's --budget is spent.")
                continue
        say(f"memory: running benchmarks.{module} --device cuda (timeout {timeout} s)")
        try:
            res = run_module([f"benchmarks.{module}", "--device", "cuda"], timeout=timeout)
        except subprocess.TimeoutExpired:
            out.append(
                f"- {label}: did not finish within {timeout} s (run `python -m "
                f"benchmarks.{module} --device cuda` alone, or give the suite a larger --budget)."
            )
            continue
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            out.append(f"- {label}: failed (exit {res.returncode}): `{' / '.join(tail)}`")
            continue
        table = [ln for ln in res.stdout.splitlines() if ln.startswith("|")]
        out.append(f"{label}:\n\n" + ("\n".join(table) if table else res.stdout.strip()[-2000:]))
    return out


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, repeats=1)
    ap.add_argument("--steps", type=int, default=3, help="training steps per measurement")
    ap.add_argument("--rows", nargs="*", help="TEACHER,B,P,FAKE_UPDATES rows, e.g. digits,64,64,3")
    ap.add_argument("--no-external", action="store_true", help="skip sd_step.py / edm_step.py")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = setup(args)
    if args.child:
        name, B, P, fu = args.child.split(",")
        print(json.dumps(child(name, int(B), int(P), int(fu), args.steps, device)))
        return ""
    rows_in = CUDA_ROWS if device.type == "cuda" else CPU_ROWS
    if args.rows:
        rows_in = [(r.split(",")[0], *map(int, r.split(",")[1:])) for r in args.rows]
    rows, method = [], ""
    for name, B, P, fu in rows_in:
        note = skip_note(name)
        if note:
            rows.append([name, f"{B} / {P} / {fu}", note, "", ""])
            continue
        say(f"memory: {name} B={B} P={P} fake_updates={fu} (fresh process)")
        res = run_module(["benchmarks.memory", "--child", f"{name},{B},{P},{fu}", "--device",
                          str(device), "--threads", str(args.threads), "--steps", str(args.steps)])  # fmt: skip
        if res.returncode != 0:
            tail = res.stderr.strip().splitlines()[-1:] or ["?"]
            rows.append([name, f"{B} / {P} / {fu}", f"failed: {tail[0]}", "", ""])
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        method = r["method"]
        rows.append([name, f"{B} / {P} / {fu}", f"**{mib(r['growth'])}**", mib(r["peak"]),
                     f"{r['seconds_per_step'] * 1e3:.0f} ms"])  # fmt: skip
    body = (
        f"Device {device}; each row in a fresh process, {args.steps} training steps after the "
        f"trainer is built; measured with {method or 'n/a'}"
        + (
            " (minus the RSS before the first step)"
            if device.type == "cpu"
            else " (minus the memory allocated before the first step)"
        )  # fmt: skip
        + ".\n\n"
        + md_table(
            [
                "teacher",
                "batch / pair batch / fake updates",
                "step peak above the built trainer",
                "absolute peak",
                "time per step (incl. first)",
            ],  # fmt: skip
            rows,
        )
    )
    if not args.no_external:
        body += "\n\nReal-size teachers:\n\n" + "\n".join(external(device))
    return finish(args, "Memory: peak of a DMD training step", body, "benchmarks.memory")


if __name__ == "__main__":
    main()
