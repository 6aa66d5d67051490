"""Several processes: make-pairs splits the shards, distill trains with DDP (gloo on this CPU).

One ``torchrun --nproc_per_node 2`` launch runs three commands in the same two processes (this
file is the script; see the bottom): finishing a pairs folder a 1-process run left half done,
a distill whose batch does not split over 2 processes, and a distill run that is compared
with a 1-process run of the same global batch.

Tolerance of that comparison: the two runs draw the same numbers (every draw is made for the
global batch and sliced per process), so they differ only by float rounding: DDP averages the
two processes' gradients with an all-reduce (sum of two half-batch means, then / 2) where the
1-process run takes one mean over the whole batch, and the logged losses are means of two
half-batch means. That is ~1e-7 relative per step; Adam and 30 steps grow it to ~1e-6 (measured
here: 2.6e-6 relative on the losses, 1.2e-7 absolute on the weights). The test allows 1e-4
relative on the logged values and 1e-5 absolute on weights of magnitude ~1-7.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dmdctl.core.sampling as sampling
from cli_helpers import PROCESS_ENV
from dmdctl.commands.make_pairs import make_pairs
from dmdctl.data.pairs import PROGRESS, PairWriter, read_manifest
from dmdctl.settings.distill import DistillConfig
from dmdctl.settings.make_pairs import MakePairsConfig
from dmdctl.training.loop import distill

ENV = PROCESS_ENV
RTOL_LOG, ATOL_WEIGHTS = 1e-4, 1e-5
PAIRS = dict(num_pairs=256, shard_size=64, steps=8)  # the toy_pairs fixture's settings
DISTILL = dict(
    steps=30,
    batch_size=64,
    pair_batch_size=32,
    checkpoint_every=15,
    log_every=5,
    plot_samples=100,
    eval_every=15,
    eval_samples=200,
    lr=1e-3,
    fake_lr=1e-3,
    warmup=5,
)


# DMD2 in 2 processes: the GAN head (a second DDP module, trained with the fake score) and
# backward simulation for a 2-step generator
DMD2 = dict(steps=10, batch_size=32, checkpoint_every=10, log_every=5, plot_samples=0, lr=1e-3,
            fake_lr=1e-3, warmup=2, reg_weight=0.0, gan_weight=0.05, denoising_steps="80,1",
            fake_updates=2)  # fmt: skip


def flags(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def test_two_processes_make_pairs_and_distill_like_one(
    toy_teacher, toy_pairs, tmp_path, monkeypatch
):
    # 1. a 1-process make-pairs interrupted after its first shard
    pairs = tmp_path / "pairs"
    real = sampling.heun_sample
    calls = {"n": 0}

    def dies_in_second_shard(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sampling, "heun_sample", dies_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        make_pairs(MakePairsConfig(teacher_path=toy_teacher, out=str(pairs), **PAIRS))
    monkeypatch.setattr(sampling, "heun_sample", real)
    assert len(read_manifest(pairs)["shards"]) == 1

    # 2. two processes: finish the pairs, refuse an odd batch, distill
    d2 = tmp_path / "d2"
    jobs = [
        ["make-pairs", "--teacher-path", toy_teacher, "--out", str(pairs), *flags(PAIRS)],
        [
            "distill",
            "--teacher-path",
            toy_teacher,
            "--pairs",
            str(pairs),
            "--out",
            str(tmp_path / "odd"),
            "--batch-size",
            "63",
        ],
        [
            "distill",
            "--teacher-path",
            toy_teacher,
            "--pairs",
            str(pairs),
            "--out",
            str(d2),
            *flags(DISTILL),
        ],
        ["distill", "--teacher-path", toy_teacher, "--out", str(tmp_path / "gan2"), *flags(DMD2)],
    ]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            __file__,
            str(tmp_path),
            json.dumps(jobs),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    for rank in ranks:
        assert [job["code"] for job in rank] == [0, 2, 0, 0], rank
        err = [line for line in rank[1]["stderr"].splitlines() if line.strip()]
        assert err == ["error: --batch-size 63 is not divisible by the 2 processes"], rank[1][
            "stderr"
        ]
    assert not (tmp_path / "odd").exists()

    # the pairs are byte-identical to a 1-process run's, and only the missing shards were made
    names = sorted(p.name for p in Path(toy_pairs).glob("pairs-*.safetensors"))
    assert names == sorted(p.name for p in pairs.glob("pairs-*.safetensors"))
    for name in names:
        assert (Path(toy_pairs) / name).read_bytes() == (pairs / name).read_bytes()
    assert read_manifest(pairs)["shards"] == read_manifest(toy_pairs)["shards"]
    assert read_manifest(pairs)["complete"] and not (pairs / PROGRESS).exists()

    # 3. the same distill runs in one process
    d1 = tmp_path / "d1"
    distill(DistillConfig(teacher_path=toy_teacher, pairs=toy_pairs, out=str(d1), **DISTILL))
    distill(DistillConfig(teacher_path=toy_teacher, out=str(tmp_path / "gan1"), **DMD2))
    ga = [json.loads(x) for x in (tmp_path / "gan1" / "log.jsonl").read_text().splitlines()]
    gb = [json.loads(x) for x in (tmp_path / "gan2" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ga] == [r["step"] for r in gb] == [5, 10]
    for a, b in zip(ga, gb, strict=True):
        for k in ("loss_dm", "loss_gan", "loss_cls", "loss_fake", "real_logit"):
            assert abs(a[k] - b[k]) <= RTOL_LOG * max(abs(a[k]), 1e-3), (a["step"], k, a[k], b[k])
    for n in ("generator", "fake", "gan_head"):
        w1 = load_file(str(tmp_path / "gan1" / "checkpoints" / "step-0000010" / f"{n}.safetensors"))
        w2 = load_file(str(tmp_path / "gan2" / "checkpoints" / "step-0000010" / f"{n}.safetensors"))
        assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= ATOL_WEIGHTS, n

    # only the main process wrote: one log row per step, one set of checkpoints and plots
    rows1 = [json.loads(x) for x in (d1 / "log.jsonl").read_text().splitlines()]
    rows2 = [json.loads(x) for x in (d2 / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows2] == [r["step"] for r in rows1]
    assert sorted(p.name for p in (d2 / "checkpoints").iterdir()) == [
        "step-0000015",
        "step-0000030",
    ]
    assert sorted(p.name for p in (d2 / "samples").iterdir()) == [
        "step-0000015.png",
        "step-0000030.png",
    ]
    worst = 0.0
    for a, b in zip(rows1, rows2, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if k == "step" or "seconds" in k or k.endswith("per_s") or not isinstance(a[k], float):
                continue  # wall-clock timings differ
            rel = abs(a[k] - b[k]) / max(abs(a[k]), 1e-12)
            worst = max(worst, rel)
            assert rel <= RTOL_LOG, (a["step"], k, a[k], b[k])
    files = ["generator.safetensors"] + [
        f"checkpoints/step-0000030/{n}.safetensors" for n in ("generator", "fake", "ema")
    ]
    worst_w = 0.0
    for f in files:
        w1, w2 = load_file(str(d1 / f)), load_file(str(d2 / f))
        assert w1.keys() == w2.keys()
        for k in w1:
            worst_w = max(worst_w, (w1[k] - w2[k]).abs().max().item())
    assert worst_w <= ATOL_WEIGHTS
    print(
        f"2 vs 1 process: max relative log difference {worst:.2e}, max weight difference {worst_w:.2e}"
    )


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_processes_at_one_checkpoint_and_resume_is_exact(
    toy_teacher, toy_pairs, tmp_path
):
    """torchrun forwards SIGTERM to its workers (then SIGKILLs them after 30 s): they agree on a
    step, the main one saves, and the resumed 2-process run ends bitwise where an uninterrupted
    2-process run does (gloo on the CPU reduces in a fixed order). Against a 1-process run the
    rounding differences grow chaotically with the step count (measured: 3e-5 relative on the
    losses at step 50, 5e-3 at step 75), which is why the fast test stops at 30 steps."""
    import signal
    import time

    args = dict(DISTILL, steps=100, checkpoint_every=20, eval_every=0, plot_samples=0)

    def command(out):
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "dmdctl",
            "distill",
            "--teacher-path",
            toy_teacher,
            "--pairs",
            toy_pairs,
            "--out",
            str(out),
            *flags(args),
        ]

    out = tmp_path / "cut"
    proc = subprocess.Popen(
        command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    t0 = time.time()
    while not (out / "checkpoints" / "step-0000020").is_dir():
        assert proc.poll() is None and time.time() - t0 < 300, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    msgs = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(msgs) == 1 and "stopped by SIGTERM at step" in msgs[0], err[-3000:]  # main only
    step = int(msgs[0].split("at step ")[1].split(";")[0])
    assert 20 <= step < 100 and (out / "checkpoints" / f"step-{step:07d}" / "state.json").is_file()
    assert not (out / "generator.safetensors").exists()

    r = subprocess.run(
        command(out) + ["--resume", "latest"], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    whole = tmp_path / "whole"
    r = subprocess.run(command(whole), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    w1 = load_file(str(whole / "generator.safetensors"))
    w2 = load_file(str(out / "generator.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (whole / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 101, 5))
    drop = ("samples_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == [
        {k: v for k, v in r.items() if k not in drop} for r in ref
    ]


def test_records_left_by_a_killed_process_are_merged_on_the_next_run(
    toy_teacher, tmp_path, monkeypatch
):
    """A non-main process wrote a shard and its record, then everything was killed before the
    main process merged it: the next run lists it and makes only the shards really missing."""
    cfg = dict(teacher_path=toy_teacher, num_pairs=96, shard_size=32, steps=4)
    make_pairs(MakePairsConfig(out=str(tmp_path / "whole"), **cfg))
    whole = read_manifest(tmp_path / "whole")

    cut = tmp_path / "cut"
    real = sampling.heun_sample
    calls = {"n": 0}

    def dies_in_second_shard(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sampling, "heun_sample", dies_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        make_pairs(MakePairsConfig(out=str(cut), **cfg))
    monkeypatch.setattr(sampling, "heun_sample", real)
    # what "process 1" left: shard 2 on disk with its record, not yet in the manifest
    (cut / "pairs-00002.safetensors").write_bytes(
        (tmp_path / "whole" / "pairs-00002.safetensors").read_bytes()
    )
    (cut / PROGRESS).mkdir()
    (cut / PROGRESS / "pairs-00002.json").write_text(json.dumps(whole["shards"][2]))
    # and a half-written shard of a process killed mid-write
    (cut / "pairs-00001.safetensors.tmp").write_bytes(b"partial")

    result = make_pairs(MakePairsConfig(out=str(cut), **cfg))
    assert result["made_now"] == 32  # shard 1 only
    assert read_manifest(cut)["shards"] == whole["shards"]
    assert sorted(p.name for p in cut.iterdir()) == [
        "config.toml",
        "manifest.json",
        "pairs-00000.safetensors",
        "pairs-00001.safetensors",
        "pairs-00002.safetensors",
    ]


def test_a_damaged_listed_shard_is_made_again(toy_teacher, tmp_path):
    cfg = MakePairsConfig(
        teacher_path=toy_teacher, out=str(tmp_path), num_pairs=64, shard_size=32, steps=4
    )
    make_pairs(cfg)
    good = (tmp_path / "pairs-00001.safetensors").read_bytes()
    (tmp_path / "pairs-00001.safetensors").write_bytes(good[:-7])
    result = make_pairs(cfg)
    assert result["remade_shards"] == 1 and result["made_now"] == 32
    assert (tmp_path / "pairs-00001.safetensors").read_bytes() == good


def test_shards_split_over_processes_in_turn(toy_teacher, tmp_path):
    """Process r of w makes every w-th missing shard: no shard twice, none forgotten."""
    settings = {"num_pairs": 10 * 8, "shard_size": 8, "seed_start": 0}
    w = PairWriter(tmp_path, settings, main=False)
    w.shards = {0: {}, 3: {}, 4: {}}
    todo = w.missing()
    parts = [todo[r::3] for r in range(3)]
    assert sorted(sum(parts, [])) == todo == [1, 2, 5, 6, 7, 8, 9]
    assert parts == [[1, 6, 9], [2, 7], [5, 8]]


# --- the script torchrun starts (2 processes) ------------------------------------------------------
def _launched(out_root: str, jobs_json: str) -> None:
    import contextlib
    import io

    from typer.main import get_command

    from dmdctl.cli import app

    command = get_command(app)
    results = []
    for args in json.loads(jobs_json):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = command.main(args, standalone_mode=False, prog_name="dmdctl")
            except SystemExit as e:
                code = e.code
        results.append({"args": args, "code": code or 0, "stderr": err.getvalue()})
    rank = os.environ["RANK"]
    (Path(out_root) / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    # as cli.main ends: destroy the group, then leave without the interpreter shutdown that
    # DDP's surviving gloo threads can abort (dmdctl.runtime; 2 of 15 launches did, under load)
    from dmdctl.runtime import exit_process, shutdown_process_group

    shutdown_process_group()
    exit_process(0)


if __name__ == "__main__":
    _launched(sys.argv[1], sys.argv[2])
