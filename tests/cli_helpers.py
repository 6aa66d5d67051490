"""Running the CLI in-process as a user would, and the one-line-error contract every command keeps."""

import os
import socket

from typer.testing import CliRunner

from dmdctl.cli import app

runner = CliRunner()

# the environment of every test that starts dmdctl in other processes: on 2 cores two torch
# processes crawl unless each has one thread and OpenMP threads sleep when idle
PROCESS_ENV = dict(
    os.environ, DMDCTL_QUIET="1", OMP_WAIT_POLICY="PASSIVE", DMDCTL_THREADS="1",
    OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(r):
    assert r.exit_code == 0, r.output + str(r.exception)
    return r


def one_line_error(r, *fragments):
    """Exit code 2 and exactly one `error:` line on stderr holding every fragment, no traceback."""
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    for f in fragments:
        assert f in lines[0], lines[0]
    assert "Traceback" not in r.output


# the prompts of the tiny SD pipeline tests (conftest.py writes them to a file)
SD_PROMPTS = ["a photo of a cat", "a red dog", "the blue sky", "a dog on the grass"]


def pairs_config(teacher, out, **kw):
    """100 toy pairs in shards of 32 from a 6-step sampler."""
    from dmdctl.settings.make_pairs import MakePairsConfig

    base = dict(
        teacher_path=teacher, out=str(out), num_pairs=100, shard_size=32, batch_size=16, steps=6
    )
    base.update(kw)
    return MakePairsConfig(**base)


def distill_config(teacher, pairs, out, **kw):
    """A distill run on the toy teacher that takes seconds (40 steps, checkpoints at 20)."""
    from dmdctl.settings.distill import DistillConfig

    base = dict(
        teacher_path=teacher,
        pairs=pairs,
        out=str(out),
        steps=40,
        batch_size=64,
        pair_batch_size=32,
        checkpoint_every=20,
        log_every=10,
        plot_samples=200,
        lr=1e-3,
        fake_lr=1e-3,
        warmup=5,
    )
    base.update(kw)
    return DistillConfig(**base)


def captioned_images(folder, size=(20, 24), n=3):
    """``n`` random RGB images of ``size`` (h, w) in ``folder`` with a captions.jsonl naming
    SD_PROMPTS in turn: the real data of a text-to-image GAN run."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{i}.png")
        rows.append(json.dumps({"file": f"{i}.png", "caption": SD_PROMPTS[i % len(SD_PROMPTS)]}))
    (folder / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def largest_change(denoiser, unet_state: dict, prefix: str = "unet.") -> float:
    """The largest change of any weight of a distilled network from the teacher's."""
    return max(
        (v - unet_state[k.removeprefix(prefix)]).abs().max().item()
        for k, v in denoiser.state_dict().items()
    )


def real_store(source, teacher_path, out=None, teacher=None):
    """``dmdctl prepare-real SOURCE``: the store ``distill --real-data`` reads (an image folder
    with captions.jsonl, an image folder or an npz, made once for the teacher)."""
    from pathlib import Path

    out = Path(out) if out is not None else Path(f"{source}-store")
    extra = ["--teacher", teacher] if teacher else []
    ok(run("prepare-real", source, "--teacher-path", teacher_path, *extra, "--device", "cpu",
           "--out", out))  # fmt: skip
    return out
