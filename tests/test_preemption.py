"""Runs that survive: SIGKILL, SIGTERM, crashes, non-finite steps and full disks.

The subprocess tests start the real ``dmdctl`` command (1 thread, as in every multi-process test
here) and kill it at a moment chosen from what it has written to disk.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import dmdctl.data.pairs as dp
import dmdctl.training.checkpoint as ck
import dmdctl.training.trainer as dd
from cli_helpers import PROCESS_ENV
from dmdctl.cli import app
from dmdctl.commands.make_pairs import make_pairs
from dmdctl.data.pairs import load_pairs
from dmdctl.errors import UserError
from dmdctl.settings.distill import DistillConfig
from dmdctl.settings.make_pairs import MakePairsConfig
from dmdctl.training.loop import distill

ENV = PROCESS_ENV
DROP = ("samples_per_s",)  # wall-clock throughput differs between runs


def dmdctl(*args) -> list[str]:
    return [sys.executable, "-m", "dmdctl", *map(str, args)]


def rerun(*args):
    """The same command again, in this process (the run it continues was a real subprocess)."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in DROP} for r in rows]


def wait_until(proc: subprocess.Popen, condition, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (rc {proc.returncode}) too early: {err[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.01)


def last_logged_step(out: Path) -> int:
    path = Path(out) / "log.jsonl"
    if not path.is_file():
        return 0
    steps = [
        json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")
    ]
    return max(steps, default=0)


# --- distill: SIGKILL, SIGTERM -----------------------------------------------------------------
STEPS = 60


def run_args(teacher, pairs, out, **kw) -> dict:
    base = dict(
        teacher_path=teacher,
        pairs=pairs,
        out=str(out),
        steps=STEPS,
        batch_size=64,
        pair_batch_size=32,
        checkpoint_every=20,
        log_every=5,
        plot_samples=0,
        lr=1e-3,
        fake_lr=1e-3,
        warmup=5,
    )
    base.update(kw)
    return base


def cli_args(args: dict) -> list[str]:
    flags = []
    for k, v in args.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    return flags


@pytest.fixture(scope="module")
def whole_run(toy_teacher, toy_pairs, tmp_path_factory) -> Path:
    """The uninterrupted reference, run in this process (1 thread, like the subprocesses)."""
    out = tmp_path_factory.mktemp("whole")
    distill(DistillConfig(**run_args(toy_teacher, toy_pairs, out)))
    return out


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = comparable(log(a)), comparable(log(b))
    assert [r["step"] for r in rb] == list(range(5, STEPS + 1, 5))  # each step once
    assert ra == rb  # bitwise: same floats in the log
    ga = load_file(str(a / "generator.safetensors"))
    gb = load_file(str(b / "generator.safetensors"))
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    last = f"step-{STEPS:07d}"
    for name in ("generator", "fake", "optim_generator", "ema"):
        ca = load_file(str(a / "checkpoints" / last / f"{name}.safetensors"))
        cb = load_file(str(b / "checkpoints" / last / f"{name}.safetensors"))
        assert all(torch.equal(ca[k], cb[k]) for k in ca), name


def test_sigkill_then_resume_latest_matches_an_uninterrupted_run(
    toy_teacher, toy_pairs, whole_run, tmp_path
):
    out = tmp_path / "cut"
    args = cli_args(run_args(toy_teacher, toy_pairs, out))
    proc = subprocess.Popen(
        dmdctl("distill", *args),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # kill -9 once a checkpoint exists and the log has moved past it
    wait_until(
        proc,
        lambda: (
            ck.list_checkpoints(out / "checkpoints")
            and last_logged_step(out) > int(ck.list_checkpoints(out / "checkpoints")[0].name[5:])
        ),
    )
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "generator.safetensors").exists()
    latest = int(ck.list_checkpoints(out / "checkpoints")[-1].name[5:])
    assert latest < STEPS
    rows_before = last_logged_step(out)

    r = rerun("distill", *args, "--resume", "latest")
    if rows_before > latest:  # the log held rows past the checkpoint: they were replaced
        assert "dropped" in r.stderr
    assert_same_run(whole_run, out)


def test_sigterm_saves_a_checkpoint_exits_143_and_resume_gives_the_same_weights(
    toy_teacher, toy_pairs, whole_run, tmp_path
):
    out = tmp_path / "term"
    args = cli_args(run_args(toy_teacher, toy_pairs, out))
    proc = subprocess.Popen(
        dmdctl("distill", *args),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(proc, lambda: last_logged_step(out) >= 25)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    # one error line, the last (lines about the run, such as its length, may come before it)
    lines = [line for line in err.splitlines() if line.strip()]
    assert [x for x in lines if x.startswith("error:")] == lines[-1:], err
    msg = lines[-1]
    assert msg.startswith("error: stopped by SIGTERM at step ")
    assert "Resume with the same command plus --resume latest" in msg
    step = int(msg.split("at step ")[1].split(";")[0])
    assert 25 <= step < STEPS
    assert (out / "checkpoints" / f"step-{step:07d}" / "state.json").is_file()
    assert not (out / "generator.safetensors").exists()

    rerun("distill", *args, "--resume", "latest")
    assert_same_run(whole_run, out)


# --- distill: crashes, log rows past the checkpoint, pruning --------------------------------------
def small(teacher, pairs, out, **kw) -> DistillConfig:
    args = run_args(teacher, pairs, out, steps=40, checkpoint_every=20, log_every=10)
    args.update(kw)
    return DistillConfig(**args)


def test_resume_rewrites_log_rows_past_the_checkpoint(
    toy_teacher, toy_pairs, tmp_path, monkeypatch
):
    distill(small(toy_teacher, toy_pairs, tmp_path / "whole"))
    real_step = dd.DMDTrainer.train_step

    def crash_at_35(self):
        if self.step == 35:
            raise RuntimeError("simulated crash")
        return real_step(self)

    monkeypatch.setattr(dd.DMDTrainer, "train_step", crash_at_35)
    with pytest.raises(RuntimeError):
        distill(small(toy_teacher, toy_pairs, tmp_path / "cut"))
    assert [r["step"] for r in log(tmp_path / "cut")] == [10, 20, 30]  # 30 is past step-20
    monkeypatch.setattr(dd.DMDTrainer, "train_step", real_step)
    distill(small(toy_teacher, toy_pairs, tmp_path / "cut", resume="latest"))
    assert comparable(log(tmp_path / "cut")) == comparable(log(tmp_path / "whole"))


def test_keep_checkpoints_prunes_the_oldest(toy_teacher, toy_pairs, tmp_path):
    distill(small(toy_teacher, toy_pairs, tmp_path, checkpoint_every=10, keep_checkpoints=2))
    assert [p.name for p in ck.list_checkpoints(tmp_path / "checkpoints")] == [
        "step-0000030",
        "step-0000040",
    ]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


# --- non-finite guard --------------------------------------------------------------------------
def poison_dm_loss(monkeypatch, calls: set[int]):
    """Make the DM loss (hence the generator's gradient) NaN on the given calls (1-based)."""
    real = dd.dm_loss
    n = {"calls": 0}

    def dm_loss(*a, **k):
        n["calls"] += 1
        out = real(*a, **k)
        return out * float("nan") if n["calls"] in calls else out

    monkeypatch.setattr(dd, "dm_loss", dm_loss)


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    toy_teacher, toy_pairs, tmp_path, monkeypatch
):
    poison_dm_loss(monkeypatch, {13})
    cfg = small(toy_teacher, toy_pairs, tmp_path, checkpoint_every=10, log_every=5)
    with pytest.raises(UserError) as e:
        distill(cfg)
    msg = str(e.value)
    assert msg.startswith("non-finite loss_dm, ") and "at step 13 (checked at step 15)" in msg
    assert "step-0000010" in msg and "--skip-nonfinite" in msg
    # nothing after the poisoned step was logged or saved, and the checkpoint is finite
    assert [r["step"] for r in log(tmp_path)] == [5, 10]
    assert [p.name for p in ck.list_checkpoints(tmp_path / "checkpoints")] == ["step-0000010"]
    w = load_file(str(tmp_path / "checkpoints" / "step-0000010" / "generator.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())


def test_skip_nonfinite_skips_exactly_the_bad_update_and_counts_it(
    toy_teacher, toy_pairs, tmp_path, monkeypatch
):
    trainer = dd.DMDTrainer(small(toy_teacher, toy_pairs, tmp_path / "a", skip_nonfinite=True))
    for _ in range(3):
        trainer.train_step()
    params = {k: v.clone() for k, v in trainer.unwrapped_generator.state_dict().items()}
    opt = {
        (i, k): v.clone() for i, s in enumerate(trainer.opt_g.state.values()) for k, v in s.items()
    }
    poison_dm_loss(monkeypatch, {1})
    logs = trainer.train_step()
    assert float(logs["skipped"]) == 1.0 and not torch.isfinite(logs["grad_norm_g"])
    after = trainer.unwrapped_generator.state_dict()
    assert all(torch.equal(params[k], after[k]) for k in params)  # weights untouched
    opt_after = {
        (i, k): v for i, s in enumerate(trainer.opt_g.state.values()) for k, v in s.items()
    }
    assert all(torch.equal(opt[key], opt_after[key]) for key in opt)  # moments and step count
    assert float(trainer.train_step()["skipped"]) == 0.0  # and training goes on

    # a whole run: the poisoned step is skipped, counted, and the run finishes with finite weights
    poison_dm_loss(monkeypatch, {13})
    result = distill(small(toy_teacher, toy_pairs, tmp_path / "b", skip_nonfinite=True))
    assert result["skipped_steps"] == 1 and result["skipped_fake_updates"] == 0
    rows = log(tmp_path / "b")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    g = load_file(str(tmp_path / "b" / "generator.safetensors"))
    assert all(torch.isfinite(v).all() for v in g.values())
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-0000040" / "state.json").read_text())
    assert state["skipped_steps"] == 1


def test_skip_nonfinite_stops_when_every_step_is_skipped(
    toy_teacher, toy_pairs, tmp_path, monkeypatch
):
    poison_dm_loss(monkeypatch, set(range(1, 100)))
    with pytest.raises(UserError, match="every step from 1 to 10 had a non-finite loss"):
        distill(small(toy_teacher, toy_pairs, tmp_path, skip_nonfinite=True))
    assert not ck.list_checkpoints(tmp_path / "checkpoints")


# --- disk full ---------------------------------------------------------------------------------
def enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_a_checkpoint_keeps_the_earlier_ones(
    toy_teacher, toy_pairs, tmp_path, monkeypatch
):
    real = ck.save_file
    n = {"calls": 0}

    def full_on_second_checkpoint(*a, **k):
        n["calls"] += 1
        if n["calls"] > 5:  # generator, fake, 2 optimisers, EMA; then the disk is full
            enospc()
        return real(*a, **k)

    monkeypatch.setattr(ck, "save_file", full_on_second_checkpoint)
    with pytest.raises(UserError) as e:
        distill(small(toy_teacher, toy_pairs, tmp_path, checkpoint_every=10, steps=20))
    assert "could not write checkpoint" in str(e.value) and "No space left on device" in str(
        e.value
    )
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000010"]
    assert ck.list_checkpoints(tmp_path / "checkpoints")  # the earlier one is complete


def test_disk_full_while_writing_the_log_leaves_no_half_line(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n')

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, s):
            self.f.write(s[:5])
            self.f.flush()
            enospc()

        def flush(self):
            pass

    real_open = open
    monkeypatch.setattr(ck, "open", lambda *a, **k: Full(real_open(*a, **k)), raising=False)
    with pytest.raises(UserError, match="No space left on device"):
        ck.append_line(path, '{"step": 2}')
    assert path.read_text() == '{"step": 1}\n'


def test_disk_full_while_writing_a_shard(toy_teacher, tmp_path, monkeypatch):
    cfg = MakePairsConfig(
        teacher_path=toy_teacher, out=str(tmp_path), num_pairs=96, shard_size=32, steps=4
    )
    real = dp.save_file
    n = {"calls": 0}

    def full_on_second(*a, **k):
        n["calls"] += 1
        if n["calls"] == 2:
            enospc()
        return real(*a, **k)

    monkeypatch.setattr(dp, "save_file", full_on_second)
    with pytest.raises(UserError, match="pairs-00001.safetensors: No space left on device"):
        make_pairs(cfg)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.toml", "manifest.json", "pairs-00000.safetensors"]
    assert len(json.loads((tmp_path / "manifest.json").read_text())["shards"]) == 1
    monkeypatch.setattr(dp, "save_file", real)
    assert make_pairs(cfg)["made_now"] == 64
    assert len(load_pairs(tmp_path)) == 96


# --- make-pairs: SIGKILL, SIGTERM ---------------------------------------------------------------
MP = dict(num_pairs=1500, shard_size=50, batch_size=25, steps=40)


def mp_args(teacher, out) -> list[str]:
    return ["make-pairs", "--teacher-path", teacher, "--out", out] + cli_args(MP)


def shards_done(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, json.JSONDecodeError):
        return 0


@pytest.fixture(scope="module")
def whole_pairs(toy_teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole-pairs")
    make_pairs(MakePairsConfig(teacher_path=toy_teacher, out=str(out), **MP))
    return out


def assert_same_pairs(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("pairs-*.safetensors"))
    assert names == sorted(p.name for p in b.glob("pairs-*.safetensors"))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["shards"] == mb["shards"] and mb["complete"]
    seeds = torch.cat([load_file(str(b / n))["seed"] for n in names])
    assert seeds.tolist() == list(range(MP["num_pairs"]))  # none missing, none twice
    assert not list(b.glob("*.tmp")) and not (b / dp.PROGRESS).exists()


def test_make_pairs_killed_mid_run_then_rerun_has_every_pair_once(
    toy_teacher, whole_pairs, tmp_path
):
    out = tmp_path / "cut"
    proc = subprocess.Popen(
        dmdctl(*mp_args(toy_teacher, out)),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(proc, lambda: shards_done(out) >= 3)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = shards_done(out)
    assert 3 <= done < 30
    rerun(*mp_args(toy_teacher, out))
    assert_same_pairs(whole_pairs, out)


def test_make_pairs_sigterm_exits_143_with_a_resume_hint(toy_teacher, whole_pairs, tmp_path):
    out = tmp_path / "term"
    proc = subprocess.Popen(
        dmdctl(*mp_args(toy_teacher, out)),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(proc, lambda: shards_done(out) >= 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: stopped by SIGTERM"), err
    assert "Resume by running the same command again" in lines[0]
    done = shards_done(out)
    assert 2 <= done < 30
    # the manifest lists exactly the shard files on disk: the unfinished one was dropped
    listed = {e["file"] for e in json.loads((out / "manifest.json").read_text())["shards"]}
    assert listed == {p.name for p in out.glob("pairs-*.safetensors")}
    assert not list(out.glob("*.tmp"))
    result = make_pairs(MakePairsConfig(teacher_path=toy_teacher, out=str(out), **MP))
    assert result["made_now"] == MP["num_pairs"] - done * MP["shard_size"]
    assert_same_pairs(whole_pairs, out)
