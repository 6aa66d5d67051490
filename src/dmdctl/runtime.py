"""How a dmdctl process ends, and who may write an output folder.

:func:`process_session` wraps a whole command-line invocation (``cli.main``). When it ends, by
success, a user error, a crash or SIGTERM, it destroys the ``torch.distributed`` process group
the command created, while the Python interpreter is still fully alive.

Why that matters (found with gdb on a 2-process gloo launch): when a process exits without
``destroy_process_group()``, gloo's worker threads (``pt_gloo_runloop``) are still running.
A worker drops its reference to a finished collective a moment after the main thread has been
woken by it; if that reference is the last one, freeing the collective frees tensors that
Python created, which needs the GIL. When the main thread has meanwhile reached interpreter
shutdown (``Py_FinalizeEx``), CPython ends any thread that asks for the GIL with
``pthread_exit``; its forced unwind runs into the collective's ``noexcept`` destructor and the
C++ runtime calls ``std::terminate``: "terminate called without an active exception", SIGABRT,
and the launcher reports a failed job for a run that had finished. How often depends on
scheduling: rare after a real command; 9 of 20 launches of a script that exits right after its
last collective on a quiet machine, none of 30 on a busy one (scripts/exit_abort_repro.py).
``destroy_process_group()`` joins those threads, so nothing is left to run during shutdown.

Except after DDP: in torch 2.14.1 a ``DistributedDataParallel`` wrapper keeps references to
its gloo group that outlive the wrapper, ``gc.collect()`` and ``destroy_process_group()`` (10
more references to the group after one wrapper is built and deleted, held outside Python's
objects), so the group's worker threads keep running, and a 2-process ``distill`` still died by
SIGABRT at exit now and then (2 of 15 launches of tests/test_multiprocess.py's script beside a
CPU-bound process). :func:`exit_process` ends such a process with ``os._exit`` after flushing
its output, skipping the interpreter shutdown those threads cannot survive.

:func:`claim_output` keeps a second run from writing the same ``--out`` folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import gc
import json
import os
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

from dmdctl.errors import UserError, require

LOCK_NAME = ".dmdctl.lock"


class QuietUserError(UserError):
    """A user error another process of the launch reports; this one exits 2 without a word."""

    quiet = True


class Terminated(BaseException):
    """SIGTERM arrived outside a loop that handles it (those stop at a clean point instead)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def process_group_threads() -> list[str]:
    """Names of this process's live gloo worker threads (Linux; empty elsewhere)."""
    names = []
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                name = Path(f"/proc/self/task/{task}/comm").read_text().strip()
                if name.startswith(("pt_gloo", "gloo_")):
                    names.append(name)
    return names


def shutdown_process_group() -> bool:
    """Destroy the default process group (and Accelerate's record of it) if one exists.

    Returns whether there was one. Safe to call twice; never raises (this runs on the way out,
    often because something else failed)."""
    if "torch" not in sys.modules:  # nothing imported torch (--help, --version): no group
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    gc.collect()  # wrappers (DDP) caught in reference cycles let go of the group first
    try:
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - report, keep exiting
        sys.stderr.write(f"warning: could not destroy the process group: {e}\n")
    with contextlib.suppress(Exception):
        from accelerate.state import AcceleratorState

        # Accelerate's singleton would otherwise still describe the destroyed group
        AcceleratorState._reset_state(reset_partial_state=True)
    return True


def exit_code(code: object) -> int:
    """The status ``sys.exit(code)`` gives: None 0, an int itself, anything else 1 (Python
    prints it to stderr first, as :func:`exit_process` does)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")
    return 1


def exit_process(code: object = 0) -> None:
    """End the process with ``code`` (as ``sys.exit``). Where gloo worker threads outlived the
    process group (after DDP, module docstring), leave with ``os._exit`` once stdout, stderr and
    the logging handlers are flushed: interpreter shutdown would race those threads."""
    if not process_group_threads():
        raise SystemExit(code)
    status = exit_code(code)
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


@contextlib.contextmanager
def process_session():
    """Run one command-line invocation; on the way out destroy its process group.

    SIGTERM (what torchrun, Slurm and Kubernetes send) becomes :class:`Terminated` unless a
    loop has its own handler (``StopRequested``: distill and make-pairs stop at a clean point and
    exit 143 themselves); a Terminated run exits 143 after the cleanup, with one ``error:``
    line. The process group is not destroyed between commands run in one Python process
    (tests, the API): re-creating it under the same launcher is not reliable, so the caller that
    runs several commands owns it (and can call :func:`shutdown_process_group`)."""
    old = None
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except Terminated as t:
        from dmdctl.ui import error_line

        error_line(f"stopped by {signal.Signals(t.signum).name}")
        raise SystemExit(128 + t.signum) from None
    finally:
        if old is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, old)
        shutdown_process_group()


def refuse_sharding(accelerator=None) -> None:
    """Refuse an Accelerate FSDP/DeepSpeed launch instead of running it as something else
    (``accelerator``: one the caller built, or None: the environment ``accelerate launch`` sets
    is checked before one is built).

    dmdctl shards with its own ``--fsdp`` (torch FSDP2, training/sharding.py), the same code on
    the CPU and on GPUs: Accelerate 1.15 turns ``distributed_type: FSDP`` into plain DDP when
    the processes run on the CPU, silently, and on GPUs would shard in its own way (never run
    here). DeepSpeed is not installed here and is not supported."""
    from accelerate.utils import DistributedType

    asked = [
        name
        for name, var in (
            ("FSDP", "ACCELERATE_USE_FSDP"),
            ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"),
        )
        if os.environ.get(var, "false").lower() in ("1", "true", "yes")
    ]
    if accelerator is not None:
        got = accelerator.distributed_type
        if got in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            asked = asked or [got.value]
    if asked and asked[0].upper() == "FSDP":
        raise UserError(
            "the accelerate config asks for FSDP; dmdctl distill shards with its own --fsdp "
            "instead (torch FSDP2; Accelerate would run this config as DDP on the CPU): launch "
            "with a multi-GPU/multi-CPU config without fsdp_config and pass --fsdp"
        )
    if asked:
        raise UserError(
            f"the accelerate config asks for {asked[0]}, which dmdctl distill does not support "
            "(DeepSpeed is not installed or run here): use a multi-GPU/multi-CPU config "
            "without deepspeed_config (with --fsdp to shard the trained networks)"
        )


# ---------------------------------------------------------------- one writer per folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 4096):
        raw += chunk
    try:
        holder = json.loads(raw.decode() or "{}")
    except (UnicodeDecodeError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    host, pid = holder.get("host", "?"), holder.get("pid", "?")
    what = f"host {host}, pid {pid}"
    if holder.get("command"):
        what += f", dmdctl {holder['command']}"
    if holder.get("started"):
        what += f", started {holder['started']}"
    return what


class OutputLock:
    """An exclusive claim on an output folder, held until :meth:`release`.

    The file ``.dmdctl.lock`` in the folder names the holder (host, pid, command, start time)
    and is ``flock``-ed while the run lasts, so the kernel frees the claim when the holder dies
    however it dies. A file whose lock nobody holds is left over from a run that is gone: it is
    taken over with a warning when it names this host and a process that no longer exists. One
    from another host is refused (that host's processes cannot be checked from here)."""

    def __init__(self, folder: Path, command: str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.fd: int | None = None
        self.took_over: dict | None = None
        self.created = False

    def acquire(self) -> OutputLock:
        self.created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {self.folder}: {e.strerror or e}") from None
        host = socket.gethostname()
        for _ in range(20):  # the holder may remove the file between our open and flock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(
                    f"cannot write {self.folder}: {e.strerror or e} (a run needs a writable --out)"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                    raise UserError(
                        f"{self.folder} is in use by another run ({_describe(holder)}): two runs "
                        "on one --out would overwrite each other's files; wait for it to end, "
                        "stop it, or choose another --out"
                    ) from None
                raise UserError(f"cannot lock {self.path}: {e.strerror or e}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # we locked a file its holder had just removed: try again
                os.close(fd)
                continue
            holder = _read_holder(fd)
            if holder:
                if holder.get("host") != host:
                    os.close(fd)
                    raise UserError(
                        f"{self.folder} is locked by a run on another machine "
                        f"({_describe(holder)}); if no such run is active, delete {self.path}"
                    )
                pid = holder.get("pid")
                if isinstance(pid, int) and pid != os.getpid() and _alive(pid):
                    os.close(fd)
                    raise UserError(
                        f"{self.folder} is in use by another run ({_describe(holder)}): wait "
                        f"for it to end, or delete {self.path} if that process is not dmdctl"
                    )
                self.took_over = holder
            body = {
                "host": host,
                "pid": os.getpid(),
                "command": self.command,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            }
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(body) + "\n").encode())
            with contextlib.suppress(OSError):
                os.fsync(fd)
            self.fd = fd
            if self.took_over is not None:
                sys.stderr.write(
                    f"warning: took over the lock of {self.folder} left by a run that no longer "
                    f"exists ({_describe(self.took_over)})\n"
                )
                sys.stderr.flush()
            return self
        raise UserError(f"could not lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still locked: a waiting run then retries on a new file
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None
        if self.created:  # a run refused before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only if empty


def is_main_launch_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch, or a process launched alone."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


# what the running @holds_output function must give back when it ends (locks, trackers)
_held: list = []


def release_on_return(thing):
    """Have ``thing.release()`` called when the running :func:`holds_output` function ends."""
    _held.append(thing)
    return thing


def claim_output(folder: Path, command: str, state=None) -> None:
    """Claim ``folder`` for this run, until the function decorated by :func:`holds_output`
    returns: the main process locks it, the other processes of a launch learn the outcome.

    ``state`` (Accelerate's PartialState/Accelerator, or None when alone) lets every process
    raise the same error when the main process is refused, instead of each waiting for it at
    the next collective. Call it after the process group exists and before writing anything."""
    main = state.is_main_process if state is not None else is_main_launch_process()
    world = state.num_processes if state is not None else 1
    refused = None
    if main:
        try:
            _held.append(OutputLock(folder, command).acquire())
        except UserError as e:
            refused = str(e)
    if world > 1:
        from accelerate.utils import broadcast_object_list

        refused = broadcast_object_list([refused], from_process=0)[0]
    if refused is not None:
        if main:
            raise UserError(refused)
        raise QuietUserError(refused)  # the main process says it: one line per launch


def holds_output(fn):
    """Release the folders ``fn`` claimed with :func:`claim_output` (and what it passed to
    :func:`release_on_return`) when it returns or raises, newest first (a process that dies
    loses its claim anyway: the kernel drops the lock)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = len(_held)
        try:
            return fn(*args, **kwargs)
        finally:
            while len(_held) > before:
                _held.pop().release()

    return wrapper


# ---------------------------------------------------------------- processes, devices, signals

# Collectives (barriers, DDP's all-reduce) wait at most this long for the slowest process.
# Generous because the main process alone writes checkpoints, plots and evaluations while the
# others wait at a barrier; the defaults (10 min NCCL, 30 min gloo) can be too short for that.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started, from its env."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def use_cpu(requested: bool) -> bool:
    """Run on the CPU: when asked, or when several processes were launched on a machine without
    an accelerator (Accelerate only sets up multi-CPU/gloo training when told ``cpu=True``;
    otherwise each process would believe it is alone and all would write the same files)."""
    if requested:
        return True
    if launched_processes() <= 1:
        return False
    import torch

    has = getattr(torch, "accelerator", None)
    return not (has.is_available() if has is not None else torch.cuda.is_available())


def check_launch(num_processes: int) -> None:
    """Refuse a launch where the processes did not join one group (each would act as main)."""
    world = launched_processes()
    if world > 1 and num_processes != world:
        raise UserError(
            f"the launcher started {world} processes but they did not form one process group "
            f"(this one sees {num_processes}); check the accelerate/torchrun settings"
        )


def check_device(name: str) -> None:
    """--device names a device this machine has (``auto`` always does)."""
    if name == "auto":
        return
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(
            f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        require(
            torch.cuda.is_available(),
            f"--device {name}: no CUDA GPU is available here; use --device cpu or auto",
        )
        require(
            dev.index is None or dev.index < torch.cuda.device_count(),
            f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)",
        )


def pick_device(name: str, state=None):
    """``auto``: this process's accelerator (one GPU per process when launched several times)."""
    import torch

    world = state.num_processes if state is not None else 1
    if name == "auto" or (name == "cuda" and world > 1):
        if state is not None:
            return state.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if world > 1 and dev.type != "cpu":
        raise UserError(
            f"--device {name} with {world} processes would put them all on one device; "
            "use --device auto (one GPU per process)"
        )
    return dev


def process_state(cpu: bool = False):
    """Accelerate's view of the launch (1 process unless started by accelerate launch/torchrun)."""
    from accelerate import PartialState

    state = PartialState(cpu=use_cpu(cpu), timeout=PROCESS_GROUP_TIMEOUT)
    check_launch(state.num_processes)
    return state


class StopRequested:
    """Turns SIGTERM/SIGINT into a flag the loop checks, so the run can stop at a clean point.

    A second signal raises KeyboardInterrupt at once (the user insists).
    """

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signal).name if self.signal is not None else None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Processes:
    """This process's place among the processes of a torchrun / accelerate launch (or alone)."""

    def __init__(self, cpu: bool = False, join: bool = True):
        self.state = None
        self.rank, self.world = 0, 1
        if join and launched_processes() > 1:
            from accelerate import PartialState

            # without cpu=True accelerate only goes multi-process with an accelerator present
            self.state = PartialState(cpu=use_cpu(cpu))
            self.rank, self.world = self.state.process_index, self.state.num_processes

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, batch_index: int) -> bool:
        """Batches are dealt round-robin: each is computed whole, by one process, as alone."""
        return batch_index % self.world == self.rank

    def sum(self, vec):
        """The element-wise sum of a numpy vector over the processes."""
        if self.world == 1:
            return vec
        import numpy as np
        import torch
        from accelerate.utils import reduce

        t = torch.from_numpy(np.ascontiguousarray(vec, np.float64)).to(self.state.device)
        return reduce(t, "sum").cpu().numpy()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])
