"""The SIGABRT at exit of a 2-process gloo run, reproduced without dmdctl, with and without the fix.

Each launch is ``torchrun --nproc_per_node 2`` of this file in worker mode: join a gloo process
group through Accelerate, sum a tensor and gather Python objects (as eval-fid does) and exit
at once, either leaving the group to interpreter shutdown or calling ``destroy_process_group()``
first (what ``dmdctl.runtime.process_session`` does). Without it, a gloo worker thread that frees the
finished collective during interpreter shutdown asks for the GIL, CPython ends the thread, and
the C++ runtime aborts: "terminate called without an active exception". Usage:

    python scripts/exit_abort_repro.py --repeat 20
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def worker(destroy: bool) -> None:
    import torch
    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.utils import gather_object, reduce

    PartialState(cpu=True)  # as eval-fid: a sum of statistics, then a gather of Python objects
    reduce(torch.ones(10, dtype=torch.float64), "sum")
    gather_object([{"rank": dist.get_rank()}])
    if destroy:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--worker", choices=["keep", "destroy"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker == "destroy")
        return 0
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    for mode in ("keep", "destroy"):
        failed = aborted = 0
        for _ in range(args.repeat):
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc_per_node",
                    "2",
                    "--master_addr",
                    "127.0.0.1",
                    "--master_port",
                    str(free_port()),
                    __file__,
                    "--worker",
                    mode,
                ],  # fmt: skip
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            failed += r.returncode != 0
            aborted += "terminate called without an active exception" in r.stderr
        label = "exit without destroy_process_group" if mode == "keep" else "destroy, then exit"
        print(
            f"{label:<36} {failed:>3} of {args.repeat} launches failed "
            f"({aborted} with 'terminate called')",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
