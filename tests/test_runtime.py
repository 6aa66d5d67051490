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


def test_exit_process_skips_interpreter_shutdown_only_when_gloo_threads_survive(
    monkeypatch, capsys
):
    """After DDP the gloo threads outlive destroy_process_group (torch 2.14.1): then the process
    leaves by os._exit with sys.exit's status; otherwise it is a plain SystemExit."""
    from dmdctl import runtime

    monkeypatch.setattr(runtime, "process_group_threads", lambda: [])
    with pytest.raises(SystemExit) as e:
        runtime.exit_process(3)
    assert e.value.code == 3
    calls = []
    monkeypatch.setattr(runtime, "process_group_threads", lambda: ["pt_gloo_runloop"])
    monkeypatch.setattr(runtime.os, "_exit", calls.append)
    for code in (None, 2, "error: stopped"):
        runtime.exit_process(code)
    assert calls == [0, 2, 1]
    assert "error: stopped" in capsys.readouterr().err


def test_two_process_distill_exits_zero_with_its_output(toy_teacher, tmp_path):
    """A 2-process distill (DDP, whose gloo threads survive the group) through the real entry
    point: exit status 0 on both processes and the last lines printed before os._exit arrive."""
    out = tmp_path / "d"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "dmdctl",
        "distill", "--teacher-path", toy_teacher, "--out", str(out), "--steps", "4",
        "--batch-size", "32", "--plot-samples", "0", "--reg-weight", "0",
    ]  # fmt: skip
    env = {k: v for k, v in ENV.items() if k != "DMDCTL_QUIET"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    # the closing summary table, printed last, arrived whole
    assert "generator" in r.stdout and r.stdout.rstrip().endswith("┘"), r.stdout
    assert (out / "generator.safetensors").is_file()


def test_the_entry_point_ends_through_exit_process(monkeypatch):
    """cli.main hands its exit status to exit_process (so a DDP run leaves by os._exit)."""
    from dmdctl import cli, runtime

    calls = []
    monkeypatch.setattr(runtime, "process_group_threads", lambda: ["pt_gloo_runloop"])
    monkeypatch.setattr(runtime.os, "_exit", calls.append)
    monkeypatch.setattr(sys, "argv", ["dmdctl", "--version"])
    cli.main()
    monkeypatch.setattr(sys, "argv", ["dmdctl", "no-such-command"])
    cli.main()
    assert calls == [0, 2]
