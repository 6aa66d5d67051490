"""How runs end and who may write a folder: the process group is gone when a 2-process command
exits, and a second run on the same --out is refused while the first one lives."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import PROCESS_ENV, free_port, ok, one_line_error, run
from dmdctl.runtime import LOCK_NAME, OutputLock

ENV = PROCESS_ENV

# Runs the real entry point (dmdctl.cli.main, as `python -m dmdctl` does) and records, on the
# way out, whether this process still has a process group and gloo worker threads.
PROBE = """
import json, os, sys, torch
from dmdctl.cli import main
from dmdctl.runtime import process_group_threads
try:
    sys.argv = ["dmdctl", *sys.argv[2:]]
    main()
finally:
    state = {"initialized": torch.distributed.is_initialized(), "threads": process_group_threads()}
    with open(os.path.join(sys.argv_out, "rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(state, f)
"""


def test_two_process_command_ends_without_process_group(toy_teacher, tmp_path):
    """The abort at exit came from gloo worker threads still running during interpreter shutdown;
    after a command they must be gone (the group destroyed), on every process."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE.replace("sys.argv_out", repr(str(tmp_path))))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), "-",
        "eval-fid", "--teacher-path", toy_teacher, "--steps", "2", "--num-samples", "200",
        "--batch-size", "100", "--device", "cpu", "--json", str(tmp_path / "fid.json"),
    ]  # fmt: skip
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "fid.json").read_text())["num_processes"] == 2
    for rank in (0, 1):
        state = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert state == {"initialized": False, "threads": []}, (rank, state)


def _lock_holder(path: Path) -> dict:
    return json.loads((path / LOCK_NAME).read_text())


def test_second_writer_is_refused_while_the_first_runs(toy_teacher, tmp_path):
    out = tmp_path / "pairs"
    args = ["make-pairs", "--teacher-path", toy_teacher, "--out", str(out), "--steps", "18"]
    first = subprocess.Popen(
        [sys.executable, "-m", "dmdctl", *args, "--num-pairs", "2000000", "--shard-size", "4096"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        t0 = time.time()
        while not (out / LOCK_NAME).is_file() or not (out / LOCK_NAME).read_text():
            assert first.poll() is None, first.communicate()[1]
            assert time.time() - t0 < 120, "the first run never took the lock"
            time.sleep(0.05)
        # the second run: this test's own process, as a user would type it
        second = run(*args, "--num-pairs", "64", "--shard-size", "64")
        assert first.poll() is None  # still running: the refusal came while it held the folder
    finally:
        first.terminate()
        first.wait(timeout=60)
    one_line_error(second, f"pid {first.pid}", f"host {socket.gethostname()}", "in use")
    # the first run stopped cleanly on SIGTERM and gave the folder back
    assert first.returncode == 143
    assert not (out / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "teacher"
    out.mkdir()
    stale = {"host": socket.gethostname(), "pid": dead.pid, "command": "train-teacher"}
    (out / LOCK_NAME).write_text(json.dumps(stale))
    r = ok(run("train-teacher", "--out", out, "--steps", "20", "--batch-size", "64"))
    assert f"took over the lock of {out}" in r.stderr and f"pid {dead.pid}" in r.stderr
    assert (out / "teacher.safetensors").is_file()
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_lock_from_another_host_is_refused(tmp_path):
    out = tmp_path / "teacher"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"host": "node-17.example", "pid": 4242}))
    r = run("train-teacher", "--out", out, "--steps", "20", "--batch-size", "64")
    one_line_error(r, "host node-17.example", "pid 4242", str(out / LOCK_NAME))
    assert not (out / "teacher.safetensors").exists()


@pytest.mark.parametrize("command", ["sample", "eval-fid"])
def test_read_only_commands_do_not_need_the_lock(toy_teacher, tmp_path, command):
    held = OutputLock(tmp_path, "distill").acquire()  # as if a run were writing there
    try:
        if command == "sample":
            args = ["--num", "20", "--out", tmp_path / "s", "--no-plot"]
        else:
            args = ["--num-samples", "100", "--json", tmp_path / "fid.json"]
        ok(run(command, "--teacher-path", toy_teacher, "--steps", "2", *args))
    finally:
        held.release()


@pytest.mark.parametrize(
    ("variable", "says"),
    [
        ("ACCELERATE_USE_FSDP", ["asks for FSDP", "pass --fsdp", "DDP"]),
        ("ACCELERATE_USE_DEEPSPEED", ["DeepSpeed", "does not support", "--fsdp"]),
    ],
)
def test_sharded_launch_is_refused_not_run_as_ddp(
    toy_teacher, tmp_path, monkeypatch, variable, says
):
    """`accelerate launch --config_file <fsdp config>` sets this variable; on the CPU Accelerate
    1.15 would quietly train with DDP instead: dmdctl says so before training, and names its own
    --fsdp as the way to shard."""
    monkeypatch.setenv(variable, "true")
    r = run("distill", "--teacher-path", toy_teacher, "--reg-weight", "0", "--out", tmp_path / "d",
            "--steps", "2", "--batch-size", "8", "--cpu")  # fmt: skip
    one_line_error(r, *says)
    assert not (tmp_path / "d" / "log.jsonl").exists()


def test_sample_under_a_launcher_leaves_the_files_to_the_main_process(
    toy_teacher, tmp_path, monkeypatch
):
    """`torchrun -m dmdctl sample` used to have every process write the same files, and one
    process's rename could pull a file from under the other (exit 2 in 4 of 20 stress launches)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    r = ok(run("sample", "--teacher-path", toy_teacher, "--steps", "2", "--num", "20",
               "--out", tmp_path / "s", "--no-plot"))  # fmt: skip
    assert not (tmp_path / "s").exists() and "sample" not in r.stdout
    monkeypatch.setenv("RANK", "0")
    ok(run("sample", "--teacher-path", toy_teacher, "--steps", "2", "--num", "20",
           "--out", tmp_path / "s", "--no-plot"))  # fmt: skip
    assert (tmp_path / "s" / "samples.safetensors").is_file()
