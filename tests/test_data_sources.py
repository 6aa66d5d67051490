"""A text-to-image run fed from all three sources at once, as a DMD2 run at scale is: prompts
streamed from a file and encoded in the step (--prompt-cache off), pairs read by row from
memory-mapped shards (with the regression loss), real latents and captions read by row from a
prepare-real store (with the GAN). Killed with SIGKILL and resumed, it equals the run that was
never interrupted, bitwise; in 2 processes it equals 1 process (float rounding only)."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dmdctl.training.checkpoint as ck
from cli_helpers import PROCESS_ENV, captioned_images, ok, run
from test_preemption import dmdctl, last_logged_step, rerun, wait_until

STEPS = 6


@pytest.fixture(scope="module")
def sources(sd_pipe, prompts_file, tmp_path_factory):
    """Pairs made from the prompts file (streamed) and a store of 6 captioned images."""
    root = tmp_path_factory.mktemp("sources")
    ok(run("make-pairs", "--teacher-path", sd_pipe, "--prompts", prompts_file, "--num-pairs", 8,
           "--shard-size", 4, "--steps", 2, "--guidance", 1.75, "--device", "cpu",
           "--out", root / "pairs"))  # fmt: skip
    captioned_images(root / "images", (20, 24), n=6)
    ok(run("prepare-real", root / "images", "--teacher-path", sd_pipe, "--shard-size", 4,
           "--device", "cpu", "--out", root / "store"))  # fmt: skip
    return root


def args(sd_pipe, prompts_file, sources, out, steps=STEPS, fake_updates=2) -> list:
    return [
        "distill", "--teacher-path", sd_pipe, "--prompts", prompts_file, "--prompt-cache", "off",
        "--pairs", sources / "pairs", "--reg-weight", 0.25, "--pair-batch-size", 2,
        "--real-data", sources / "store", "--gan-weight", 0.01, "--real-guidance", 1.75,
        "--batch-size", 2, "--fake-updates", fake_updates, "--steps", steps, "--checkpoint-every", 2,
        "--log-every", 1, "--plot-samples", 0, "--lr", 1e-3, "--fake-lr", 1e-3, "--cpu",
        "--mixed-precision", "no", "--out", out,
    ]  # fmt: skip


def weights(run_dir: Path, step: int) -> dict:
    d = run_dir / "checkpoints" / f"step-{step:07d}"
    return {
        n: load_file(str(d / f"{n}.safetensors")) for n in ("generator", "fake", "gan_head", "ema")
    }


def test_sigkill_and_resume_with_streamed_sources_is_exact(
    sd_pipe, prompts_file, sources, tmp_path
):
    whole = tmp_path / "whole"
    r = ok(run(*args(sd_pipe, prompts_file, sources, whole)))
    assert "encoded in each step" in r.output and "GAN real data" in r.output
    assert not (whole / "prompt-embeddings.safetensors").exists()  # nothing cached
    cut = tmp_path / "cut"
    cmd = [str(a) for a in args(sd_pipe, prompts_file, sources, cut)]
    proc = subprocess.Popen(dmdctl(*cmd),
                            env=PROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    wait_until(
        proc, lambda: ck.list_checkpoints(cut / "checkpoints") and last_logged_step(cut) >= 3
    )
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (cut / "generator.safetensors").exists()
    rerun(*args(sd_pipe, prompts_file, sources, cut), "--resume", "latest")
    a, b = weights(whole, STEPS), weights(cut, STEPS)
    for name in a:
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    la = [json.loads(x) for x in (whole / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (cut / "log.jsonl").read_text().splitlines()]
    drop = ("samples_per_s",)
    assert [{k: v for k, v in x.items() if k not in drop} for x in la] == [
        {k: v for k, v in x.items() if k not in drop} for x in lb
    ]
    assert all(x["loss_reg"] > 0 and x["loss_cls"] > 0 for x in la)


@pytest.mark.slow
def test_two_processes_read_their_rows_and_train_like_one(sd_pipe, prompts_file, sources, tmp_path):
    one = tmp_path / "one"
    ok(run(*args(sd_pipe, prompts_file, sources, one, steps=4, fake_updates=1)))
    two = tmp_path / "two"
    jobs = [[str(a) for a in args(sd_pipe, prompts_file, sources, two, steps=4, fake_updates=1)]]
    script = Path(__file__).with_name("test_multiprocess.py")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path), json.dumps(jobs)],
        env=PROCESS_ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert all(rank[0]["code"] == 0 for rank in ranks), ranks
    # step 1 is computed before any update: every process read the same rows (prompts,
    # pairs, real latents and captions) as the 1-process run, so only float rounding differs
    la = [json.loads(x) for x in (one / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (two / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in la] == [x["step"] for x in lb] == [1, 2, 3, 4]
    first = ("loss_dm", "loss_reg", "loss_gan", "loss_cls", "loss_fake", "real_logit", "fake_logit")
    for k in first:
        assert abs(la[0][k] - lb[0][k]) <= 1e-5 * max(abs(la[0][k]), 1e-3), (k, la[0][k], lb[0][k])
    # after it, Adam turns the all-reduce's rounding into steps of up to +-lr on weights whose
    # gradient is mostly rounding (the tiny random UNet has such weights): measured 2.1e-4 here
    # at lr 1e-3 after 4 steps; a wrong row in one process would move the losses at step 1
    for x, y in zip(la[1:], lb[1:], strict=True):
        for k in ("loss_dm", "loss_reg", "loss_gan", "loss_cls", "loss_fake"):
            assert abs(x[k] - y[k]) <= 1e-3 * max(abs(x[k]), 1e-3), (x["step"], k, x[k], y[k])
    a, b = weights(one, 4), weights(two, 4)
    worst = max((a[n][k] - b[n][k]).abs().max().item() for n in a for k in a[n])
    assert worst <= 1e-3, worst


def test_a_row_that_turns_bad_stops_the_run_or_is_skipped_and_counted(
    sd_pipe, prompts_file, tmp_path, monkeypatch
):
    """A prompt that can no longer be read inside a run (its file changed under the job): the
    run stops naming it, its last checkpoint intact; with --skip-bad-records the row is replaced
    by the next readable one and log.jsonl counts it."""
    from dmdctl.data.prompts import PromptFile
    from dmdctl.errors import DataError

    read = PromptFile._read_line

    def second_row_gone(self, i):
        if i == 1:
            raise DataError(f"{self.path} changed while in use (prompt {i} is cut short)")
        return read(self, i)

    monkeypatch.setattr(PromptFile, "_read_line", second_row_gone)
    common = ["distill", "--teacher-path", sd_pipe, "--prompts", prompts_file, "--prompt-cache",
              "off", "--reg-weight", 0, "--batch-size", 2, "--fake-updates", 1, "--steps", 6,
              "--checkpoint-every", 1, "--log-every", 1, "--plot-samples", 0, "--cpu",
              "--mixed-precision", "no", "--real-guidance", 1.75]  # fmt: skip
    r = run(*common, "--out", tmp_path / "stop")
    assert r.exit_code == 2
    said = " ".join(r.stderr.split())
    assert "prompts.txt changed while in use (prompt 1 is cut short)" in said
    assert "without saving: the last checkpoint" in said and "--skip-bad-records" in said
    done = ck.list_checkpoints(tmp_path / "stop" / "checkpoints")
    assert not (tmp_path / "stop" / "generator.safetensors").exists()
    for d in done:  # every checkpoint written before the stop is whole
        assert (d / "state.json").is_file()
    ok(run(*common, "--skip-bad-records", "--out", tmp_path / "skip"))
    rows = [json.loads(x) for x in (tmp_path / "skip" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["bad_records"] > 0
    assert [x["bad_records"] for x in rows] == sorted(x["bad_records"] for x in rows)


def test_a_run_made_from_a_relative_teacher_path_works_from_any_folder(
    sd_pipe, prompts_file, tmp_path, monkeypatch
):
    """--teacher-path given relative to the working folder is recorded resolved: sample and export
    of the run work from another folder."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(sd_pipe, work / "my-sd")
    monkeypatch.chdir(work)
    ok(run("distill", "--teacher-path", "my-sd", "--prompts", prompts_file, "--reg-weight", 0,
           "--batch-size", 2, "--fake-updates", 1, "--steps", 1, "--plot-samples", 0, "--cpu",
           "--mixed-precision", "no", "--out", "run"))  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ok(run("sample", "--generator", work / "run" / "generator.safetensors", "--prompt", "a cat",
           "--num", 1, "--device", "cpu", "--out", "imgs"))  # fmt: skip
    assert (elsewhere / "imgs" / "images" / "00000.png").is_file()
    ok(run("export", work / "run", "--format", "diffusers", "-o", "exported"))
    assert (elsewhere / "exported" / "model_index.json").is_file()
    config = (work / "run" / "config.toml").read_text()
    assert f'teacher_path = "{(work / "my-sd").resolve()}"' in config


def test_each_source_conditions_its_own_samples(sd_pipe, prompts_file, sources, tmp_path):
    """Wiring: in a step, the generator's own samples are conditioned on rows of --prompts, the
    pairs on rows of the pairs' prompts file (a different file here), and the GAN's real samples
    on their store's captions, each encoded as the teacher's encoder encodes those texts."""
    from dmdctl.data.prompts import PromptFile
    from dmdctl.settings.distill import DistillConfig
    from dmdctl.teachers import resolve_teacher
    from dmdctl.training.trainer import DMDTrainer

    other = tmp_path / "other-prompts.txt"  # the generator's prompts: not the pairs' file
    other.write_text("\n".join(["a green bird", "two cups of tea", "snow on a roof"]) + "\n")
    cfg = DistillConfig(
        teacher_path=str(sd_pipe), prompts=str(other), prompt_cache="off",
        pairs=str(sources / "pairs"), reg_weight=0.25, pair_batch_size=2,
        real_data=str(sources / "store"), gan_weight=0.01, real_guidance=1.75, batch_size=2,
        fake_updates=1, plot_samples=0, cpu=True, mixed_precision="no", out=str(tmp_path / "r"),
    )  # fmt: skip
    cfg.validate()
    tr = DMDTrainer(cfg)
    encode = resolve_teacher(None, sd_pipe).text_encoder()
    seen: dict = {}

    def spy(obj, name, record):
        real = getattr(obj, name)

        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            record(args, out)
            return out

        setattr(obj, name, wrapped)

    spy(tr.pairs, "rows", lambda a, out: seen.setdefault("pair_rows", out[2]))
    spy(tr.real_data, "rows", lambda a, out: seen.setdefault("captions", out[1]))
    spy(tr.gen_table.source, "texts", lambda a, out: seen.setdefault("gen_texts", out))
    gen_forward = tr.generator.forward
    tr.generator.forward = lambda z, c=None, **kw: (
        seen.setdefault("gen_cond", c),
        gen_forward(z, c, **kw),
    )[1]
    fake_forward = tr.fake.forward
    fake_conds = []
    tr.fake.forward = lambda x, s, c=None: (fake_conds.append(c), fake_forward(x, s, c))[1]
    tr.train_step()
    pair_texts = PromptFile(sources / "pairs" / "prompts.txt").texts(seen["pair_rows"].tolist())
    gen_cond = seen["gen_cond"]
    assert gen_cond.shape[0] == 4  # 2 generator samples, then 2 pairs
    assert set(seen["gen_texts"]) <= set(other.read_text().split("\n"))
    torch.testing.assert_close(gen_cond[:2], encode(seen["gen_texts"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(gen_cond[2:], encode(pair_texts), rtol=0, atol=1e-6)
    assert isinstance(seen["captions"], list) and len(seen["captions"]) == 2
    real_cond = fake_conds[-1]  # the step's last fake-score pass: the head's real samples
    torch.testing.assert_close(real_cond, encode(seen["captions"]), rtol=0, atol=1e-6)
