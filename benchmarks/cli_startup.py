"""How fast the CLI answers: ``dmdctl --help``, ``dmdctl distill --help`` and a mistyped flag,
each against ``python -c "import typer"`` (the floor of any Typer CLI), measured side by side.

Target (issue: a CLI that answers at once): each of the three under 0.5 s wall on 2 cores.
Each command is a fresh process (as a user runs it); the runs are interleaved, the order flipping
every round, and summarised by their medians.

    python -m benchmarks.cli_startup --repeats 15
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

TARGET_S = 0.5


def commands() -> dict[str, list[str]]:
    exe = shutil.which("dmdctl")
    dmdctl = [exe] if exe else [sys.executable, "-m", "dmdctl"]
    return {
        'python -c "import typer"': [sys.executable, "-c", "import typer"],
        "dmdctl --help": [*dmdctl, "--help"],
        "dmdctl distill --help": [*dmdctl, "distill", "--help"],
        "dmdctl distill --no-such-flag": [*dmdctl, "distill", "--no-such-flag"],
    }


def wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="timed runs of each command")
    args = ap.parse_args(argv)
    runs = commands()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for argv_ in runs.values():  # warm-up: the file cache, not measured
        wall(argv_)
    order = list(runs)
    for r in range(args.repeats):
        for name in order if r % 2 == 0 else reversed(order):
            times[name].append(wall(runs[name]))
    base = statistics.median(times[order[0]])
    print(f"| command | median wall (s) | vs import typer | under {TARGET_S} s |")
    print("|---|---|---|---|")
    ok = True
    for name in order:
        med = statistics.median(times[name])
        meets = med < TARGET_S
        ok &= meets or name == order[0]
        print(f"| `{name}` | {med:.3f} | {med / base:.2f}x | {'yes' if meets else 'NO'} |")
    print(f"\n{args.repeats} runs each, interleaved; medians.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
