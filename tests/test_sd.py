"""Stable Diffusion teachers, exercised for real on tiny random diffusers pipelines on disk.

The pipelines are written with ``save_pretrained`` (tokenizer from locally written vocab/merges
files), loaded through the same code a user's ``--teacher sd15`` run takes, and the distilled
generator is exported and run by stock diffusers.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import (
    PROCESS_ENV,
    captioned_images,
    largest_change,
    ok,
    one_line_error,
    real_store,
    run,
)
from cli_helpers import SD_PROMPTS as PROMPTS
from dmdctl.errors import UserError


@pytest.fixture(scope="module")
def vpred_pipe(tmp_path_factory) -> Path:
    from dmdctl.teachers.sd.testing import build_pipeline

    return build_pipeline(
        tmp_path_factory.mktemp("sdv") / "pipe", prediction_type="v_prediction", seed=1
    )


@pytest.fixture(autouse=True)
def offline(hf_offline):
    """Every test here runs with HF_HUB_OFFLINE=1."""


def _ddim(folder, **kw):
    from diffusers import DDIMScheduler

    s = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", clip_sample=False, **kw)
    s.set_timesteps(10)
    return s


@pytest.mark.parametrize("which", ["eps", "v"])
def test_x0_and_cfg_match_the_diffusers_scheduler_step(which, sd_pipe, vpred_pipe):
    """D(x_sigma, sigma, c) equals DDIM's pred_original_sample for the same UNet output, and
    the guided real score equals the step on eps_u + w (eps_c - eps_u)."""
    from dmdctl.teachers import resolve_teacher
    from dmdctl.teachers.sd.denoiser import GuidedDenoiser

    folder = sd_pipe if which == "eps" else vpred_pipe
    teacher = resolve_teacher("sd15", folder)
    assert teacher.denoiser.prediction_type == ("epsilon" if which == "eps" else "v_prediction")
    sched = _ddim(folder)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 4, 8, 8, generator=g)
    cond = torch.randn(3, 16, 16, generator=g)
    uncond = torch.randn(1, 16, 16, generator=g)
    unet = teacher.denoiser.unet
    for t in sched.timesteps[[0, 4, 9]]:
        abar = sched.alphas_cumprod[t]
        sigma = ((1 - abar) / abar).sqrt().expand(3)
        out_c = unet(x_t, t, encoder_hidden_states=cond).sample
        ref = sched.step(out_c, t, x_t).pred_original_sample
        mine = teacher.denoiser(x_t / abar.sqrt(), sigma, cond)
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)
        out_u = unet(x_t, t, encoder_hidden_states=uncond.expand(3, -1, -1)).sample
        ref_cfg = sched.step(out_u + 2.5 * (out_c - out_u), t, x_t).pred_original_sample
        guided = GuidedDenoiser(teacher.denoiser, 2.5, uncond)
        torch.testing.assert_close(
            guided(x_t / abar.sqrt(), sigma, cond), ref_cfg, rtol=1e-4, atol=1e-4
        )


def test_fake_score_loss_is_the_unets_eps_mse(sd_pipe):
    from dmdctl.core.losses import edm_denoising_loss
    from dmdctl.teachers import resolve_teacher

    d = resolve_teacher("sd15", sd_pipe).denoiser
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    eps = torch.randn(4, 4, 8, 8, generator=g)
    cond = torch.randn(4, 16, 16, generator=g)
    t = torch.tensor([10, 200, 600, 990])
    sigma = d.sigmas[t]
    loss = edm_denoising_loss(d, x0, sigma, eps, cond, weight_fn=d.loss_weight)
    abar = d.abar[t].reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    eps_hat = d.unet(x_t, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(loss, ((eps_hat - eps) ** 2).mean(), rtol=1e-3, atol=1e-6)


def test_pairs_are_the_pipelines_own_latents(sd_pipe, prompts_file, tmp_path):
    """make-pairs (PNDM, CFG 3) stores what StableDiffusionPipeline computes for the same noise."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    out = tmp_path / "pairs"
    ok(
        run(
            "make-pairs", "--teacher", "sd15", "--teacher-path", sd_pipe, "--prompts",
            prompts_file, "--num-pairs", 4, "--steps", 5, "--guidance", 3.0, "--out", out,
            "--shard-size", 4, "--save-images", "--device", "cpu",
        )
    )  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampler"]["name"] == "pndm" and manifest["sampler"]["nfe"] == 10
    shard = load_file(str(out / manifest["shards"][0]["file"]))
    assert shard["cond"].tolist() == [0, 1, 2, 3] and shard["image"].dtype == torch.uint8
    pipe = StableDiffusionPipeline.from_pretrained(sd_pipe)
    for i in (0, 3):
        ref = pipe(
            PROMPTS[i],
            num_inference_steps=5,
            guidance_scale=3.0,
            latents=shard["noise"][i : i + 1],
            output_type="latent",
        ).images[0]
        torch.testing.assert_close(shard["target"][i], ref, rtol=1e-4, atol=1e-4)


def test_prompt_files_and_their_errors(tmp_path):
    from dmdctl.teachers.sd.pipeline import read_prompts

    p = tmp_path / "caps.jsonl"
    p.write_text('{"caption": "a cat"}\n\n{"prompt": "a dog", "id": 3}\n')
    assert read_prompts(p) == ["a cat", "a dog"]
    p.write_text('{"caption": "a cat"}\n{"image": "x.png"}\n')
    with pytest.raises(UserError, match=r"caps.jsonl:2 has no 'caption'"):
        read_prompts(p)
    p.write_text("\n\n")
    with pytest.raises(UserError, match="holds no prompt"):
        read_prompts(p)


def test_loading_errors_are_one_line(sd_pipe, tmp_path, prompts_file):
    # a hub id that is not cached, offline: a message, no download attempt
    r = run(
        "make-pairs", "--teacher", "sd15", "--teacher-path", "nobody/no-such-model",
        "--prompts", prompts_file, "--out", tmp_path / "p", "--offline",
    )  # fmt: skip
    one_line_error(r, "nobody/no-such-model", "offline")
    # a folder that is not a pipeline
    r = run("make-pairs", "--teacher", "sd15", "--teacher-path", tmp_path, "--out", tmp_path / "p")
    one_line_error(r, "neither a diffusers pipeline folder")
    # a pipeline whose UNet weights are only a pickle: refused, not loaded
    bad = tmp_path / "binpipe"
    import shutil

    shutil.copytree(sd_pipe, bad)
    w = bad / "unet" / "diffusion_pytorch_model.safetensors"
    w.rename(w.with_suffix(".bin"))
    r = run(
        "make-pairs", "--teacher-path", bad, "--prompts", prompts_file, "--out", tmp_path / "p2"
    )
    one_line_error(r, "no .safetensors weights", "safetensors only")
    # a text-to-image teacher without prompts
    r = run("make-pairs", "--teacher-path", sd_pipe, "--out", tmp_path / "p3")
    one_line_error(r, "--prompts FILE")


def test_sd_end_to_end_export_runs_in_stock_diffusers(sd_pipe, prompts_file, tmp_path):
    """make-pairs -> distill -> export --format diffusers -> StableDiffusionPipeline, which
    reproduces `dmdctl sample` for the same noise."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from dmdctl.generators import load_generator
    from dmdctl.teachers.sd.generate import text_to_image

    pairs, run_dir = tmp_path / "pairs", tmp_path / "run"
    ok(
        run(
            "make-pairs", "--teacher-path", sd_pipe, "--prompts", prompts_file,
            "--num-pairs", 8, "--steps", 3, "--shard-size", 8, "--out", pairs, "--device", "cpu",
        )
    )  # fmt: skip
    # make-pairs' default CFG is the DMD recipe's, the same as the sd15-dmd real score's
    assert json.loads((pairs / "manifest.json").read_text())["sampler"]["guidance"] == 3.0
    # pairs made at another guidance than the real score's are refused, in one line
    one_line_error(
        run(
            "distill", "--teacher", "sd15-dmd", "--teacher-path", sd_pipe, "--pairs", pairs,
            "--real-guidance", 1.75, "--out", tmp_path / "mismatch", "--steps", 1,
            "--batch-size", 2, "--pair-batch-size", 2, "--cpu",
        ),
        "made with guidance 3.0", "--allow-guidance-mismatch",
    )  # fmt: skip
    ok(
        run(
            "distill", "--teacher", "sd15-dmd", "--teacher-path", sd_pipe, "--pairs", pairs,
            "--out", run_dir, "--steps", 3, "--batch-size", 2, "--pair-batch-size", 2,
            "--fake-updates", 2, "--lpips-random-backbone", "--lpips-size", 32,
            "--checkpoint-every", 3, "--log-every", 1,
            "--plot-samples", 4, "--lr", "1e-3", "--cpu",
        )
    )  # fmt: skip
    import tomllib

    used = tomllib.loads((run_dir / "config.toml").read_text())
    # the sd15-dmd preset's defaults (bf16: the frozen real UNet runs in bf16; LPIPS regression),
    # flags win over them
    assert used["mixed_precision"] == "bf16" and used["warmup"] == 0 and used["lr"] == 1e-3
    assert used["fake_lr"] == 1e-5 and used["fake_updates"] == 2
    assert used["reg_loss"] == "lpips" and used["reg_weight"] == 0.25
    assert used["real_guidance"] == 3.0 and used["grad_checkpointing"] is True
    rows = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite(row["loss_dm"]) for row in rows)
    assert (run_dir / "samples" / "step-0000003.png").is_file()
    # the generator moved away from the teacher
    gen = load_generator(run_dir / "generator.safetensors")
    from dmdctl.teachers import resolve_teacher

    teacher_unet = resolve_teacher("sd15", sd_pipe).denoiser.unet.state_dict()
    assert largest_change(gen.fn.denoiser, teacher_unet) > 1e-5

    samples = tmp_path / "samples"
    ok(
        run(
            "sample", "--generator", run_dir / "generator.safetensors", "--prompts",
            prompts_file, "--out", samples, "--seed", 5, "--device", "cpu",
        )
    )  # fmt: skip
    index = [json.loads(x) for x in (samples / "images.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in index] == PROMPTS and index[0]["seed"] == 5
    # --num left out: one image per prompt (above); --num given: that many, prompts cycling
    ok(
        run(
            "sample", "--generator", run_dir / "generator.safetensors", "--prompts",
            prompts_file, "--out", tmp_path / "five", "--num", len(PROMPTS) + 2, "--device", "cpu",
        )
    )  # fmt: skip
    five = (tmp_path / "five" / "images.jsonl").read_text().splitlines()
    assert len(five) == len(PROMPTS) + 2 and json.loads(five[-1])["prompt"] == PROMPTS[1]

    # FID of a text-to-image generator goes through its images, and says so
    one_line_error(
        run("eval-fid", "--generator", run_dir / "generator.safetensors", "--num-samples", 10),
        "eval-fid --images",
    )

    export = tmp_path / "export"
    ok(run("export", run_dir, "--format", "diffusers", "-o", export))
    card = (export / "README.md").read_text()
    assert "timesteps=[999]" in card and "guidance_scale=0" in card
    assert '"fake_updates": 2' in card  # the run's training settings, from the generator file
    # the raw (non-EMA) generator of the last checkpoint exports too
    ok(run("export", run_dir, "--format", "diffusers", "--no-ema", "-o", tmp_path / "raw"))
    assert '"fake_updates": 2' in (tmp_path / "raw" / "README.md").read_text()
    assert not list(export.rglob("*.bin")) and list((export / "unet").glob("*.safetensors"))

    pipe = StableDiffusionPipeline.from_pretrained(export)
    assert isinstance(pipe.scheduler, LCMScheduler)
    ours = text_to_image(gen.fn, sd_pipe, gen.config, PROMPTS, list(range(5, 9)), "cpu")
    for i, prompt in enumerate(PROMPTS):
        theirs = pipe(
            prompt,
            num_inference_steps=1,
            guidance_scale=0,
            generator=torch.Generator().manual_seed(5 + i),
            output_type="pt",
        ).images[0]
        torch.testing.assert_close(theirs, ours[i], rtol=0, atol=2e-5)
        png = np.asarray(Image.open(samples / index[i]["file"])).astype(np.float64) / 255
        assert np.abs(png - theirs.permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6


def test_vprediction_teacher_distils(vpred_pipe, prompts_file, tmp_path):
    r = ok(
        run(
            "distill", "--teacher-path", vpred_pipe, "--prompts", prompts_file,
            "--reg-weight", 0, "--out", tmp_path / "run", "--steps", 2, "--batch-size", 2,
            "--real-guidance", 2.0, "--plot-samples", 0, "--cpu",
        )
    )  # fmt: skip
    assert "loss_dm" in r.output
    import tomllib

    used = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    # a bare pipeline folder takes the sd15 recipe (DMD2: no regression, constant lr, no EMA)
    assert used["fake_updates"] == 10 and used["lr"] == 1e-5 and used["real_guidance"] == 2.0
    assert used["reg_weight"] == 0.0 and used["lr_schedule"] == "constant"
    assert used["ema_decay"] == 0.0 and used["warmup"] == 0


def test_sd15_recipe_runs_without_pairs(sd_pipe, prompts_file, tmp_path):
    r = ok(
        run(
            "distill", "--teacher", "sd15", "--teacher-path", sd_pipe, "--prompts", prompts_file,
            "--out", tmp_path / "run", "--steps", 1, "--batch-size", 2, "--fake-updates", 1,
            "--plot-samples", 0, "--cpu",
        )
    )  # fmt: skip
    assert "loss_dm" in r.output and "loss_reg" not in r.output


def test_sd_usage_errors(sd_pipe, prompts_file, tmp_path, toy_teacher):
    r = run(
        "distill", "--teacher-path", sd_pipe, "--reg-weight", 0, "--out", tmp_path / "r",
        "--steps", 1, "--cpu",
    )  # fmt: skip
    one_line_error(r, "--prompts FILE")
    r = run(
        "distill", "--teacher-path", toy_teacher, "--prompts", prompts_file, "--reg-weight", 0,
        "--out", tmp_path / "r2", "--steps", 1, "--cpu",
    )  # fmt: skip
    one_line_error(r, "--prompts is for text-to-image teachers")
    r = run(
        "distill", "--teacher-path", sd_pipe, "--prompts", prompts_file, "--reg-weight", 0,
        "--optimizer", "adamw8bit", "--out", tmp_path / "r3", "--steps", 1, "--cpu",
    )  # fmt: skip
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        one_line_error(r, "bitsandbytes")


@pytest.mark.slow  # ~40 s: two torchrun launches of tiny SD pipelines
def test_two_processes_split_the_prompts_and_match_one(sd_pipe, prompts_file, tmp_path):
    """torchrun with 2 processes: the main process encodes the prompts once, both sample their
    shards, and the pairs equal a 1-process run's; a 2-process distill runs on them."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    env = dict(PROCESS_ENV, HF_HUB_OFFLINE="1")
    common = [
        "make-pairs", "--teacher-path", str(sd_pipe), "--prompts", str(prompts_file),
        "--num-pairs", "8", "--shard-size", "2", "--batch-size", "2", "--steps", "3",
        "--guidance", "2.0", "--device", "cpu",
    ]  # fmt: skip
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    two, one = tmp_path / "two", tmp_path / "one"
    r = subprocess.run(
        [*launch, "-m", "dmdctl", *common, "--out", str(two)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    ok(run(*common, "--out", one))
    m2 = json.loads((two / "manifest.json").read_text())
    m1 = json.loads((one / "manifest.json").read_text())
    assert len(m2["shards"]) == len(m1["shards"]) == 4
    for e1, e2 in zip(m1["shards"], m2["shards"], strict=True):
        a, b = load_file(str(one / e1["file"])), load_file(str(two / e2["file"]))
        assert torch.equal(a["cond"], b["cond"]) and torch.equal(a["noise"], b["noise"])
        torch.testing.assert_close(a["target"], b["target"], rtol=1e-5, atol=1e-5)
    r = subprocess.run(
        [
            *launch, "-m", "dmdctl", "distill", "--teacher-path", str(sd_pipe), "--pairs",
            str(two), "--teacher", "sd15-dmd", "--reg-loss", "l2", "--real-guidance", "2.0",
            "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2",
            "--pair-batch-size", "2", "--fake-updates", "1", "--mixed-precision", "no",
            "--plot-samples", "0", "--cpu",
        ],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "generator.safetensors").is_file()


def test_sd_gan_on_a_real_store_and_a_4_step_export(sd_pipe, prompts_file, tmp_path):
    """DMD2 on a tiny SD pipeline: real images with captions made once into a store by
    prepare-real (latents, captions as text), the GAN head trains on rows drawn from it (captions
    encoded in the step), and the 4-step generator (timesteps 999/749/499/249) exports to a
    folder that stock diffusers runs with LCMScheduler, giving the images of `dmdctl sample` for
    the same seeds."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from dmdctl.data.real import open_real_store
    from dmdctl.generators import load_generator
    from dmdctl.teachers import resolve_teacher
    from dmdctl.teachers.sd.generate import text_to_image

    store = real_store(captioned_images(tmp_path / "real", (40, 48)), sd_pipe)
    rows = open_real_store(store, resolve_teacher("sd15", sd_pipe))
    shape = resolve_teacher("sd15", sd_pipe).sample_shape
    x, captions = rows.rows(torch.tensor([2, 0]))
    assert x.shape == (2, *shape) and captions == [PROMPTS[2], PROMPTS[0]]
    run_dir = tmp_path / "run"
    common = ("distill", "--teacher", "sd15", "--teacher-path", sd_pipe, "--prompts", prompts_file,
              "--real-data", store, "--gan-weight", 1e-3, "--denoising-steps", "999,749,499,249",
              "--batch-size", 2, "--fake-updates", 1, "--plot-samples", 0, "--log-every", 1,
              "--lr", 1e-3, "--cpu", "--out", run_dir)  # fmt: skip
    r = ok(run(*common, "--steps", 2, "--checkpoint-every", 1))
    said = " ".join(r.output.split())  # as rich wraps it
    assert "GAN real data" in said and "(3 latents from" in said
    assert not list(run_dir.glob("real_data*"))  # nothing of the real data is copied per run
    rows = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(row["loss_cls"]) and np.isfinite(row["loss_gan"]) for row in rows)
    ok(run(*common, "--steps", 3, "--resume", "latest"))

    gen = load_generator(run_dir / "generator.safetensors")
    assert gen.nfe == 4
    export = tmp_path / "export"
    r = ok(run("export", run_dir, "--format", "diffusers", "-o", export))
    assert "t=999,749,499,249" in r.output
    card = (export / "README.md").read_text()
    assert "timesteps=[999, 749, 499, 249]" in card and "4 network evaluations" in card
    pipe = StableDiffusionPipeline.from_pretrained(export)
    assert isinstance(pipe.scheduler, LCMScheduler)
    ours = text_to_image(gen.fn, sd_pipe, gen.config, PROMPTS[:2], [5, 6], "cpu")
    for i, prompt in enumerate(PROMPTS[:2]):
        for how in ({"timesteps": [999, 749, 499, 249]}, {"num_inference_steps": 4}):
            theirs = pipe(prompt, guidance_scale=0, generator=torch.Generator().manual_seed(5 + i),
                          output_type="pt", **how).images[0]  # fmt: skip
            torch.testing.assert_close(theirs, ours[i], rtol=0, atol=2e-5)


def test_conditioning_timestep_is_a_one_step_generator_at_that_timestep(
    sd_pipe, prompts_file, tmp_path
):
    """--conditioning-timestep 399 (DMD2's SDXL one-step): the UNet at t = 399 on the unscaled
    noise, its eps turned into x0 with abar_399, as DMD2 computes it."""
    from dmdctl.config import resolve
    from dmdctl.settings.distill import DistillConfig
    from dmdctl.teachers import resolve_teacher
    from dmdctl.training.trainer import DMDTrainer, generator_sigmas

    teacher = resolve_teacher("sd15", sd_pipe)
    cfg = resolve(DistillConfig, teacher="sd15", teacher_path=str(sd_pipe), prompts=str(prompts_file),
                  conditioning_timestep=399, out=str(tmp_path / "r"), batch_size=2, cpu=True,
                  mixed_precision="no")  # fmt: skip
    d = teacher.denoiser
    assert generator_sigmas(cfg, teacher) == [float(d.sigmas[399])]
    z = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(
        2, 77, d.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():  # before the trainer casts the frozen teacher's weights to bf16
        eps = d.unet(z, torch.tensor([399, 399]), encoder_hidden_states=emb).sample
        ab = d.abar.double()[399].float()
        want = (z - (1 - ab).sqrt() * eps) / ab.sqrt()
    g = DMDTrainer(cfg).unwrapped_generator  # a copy of the teacher, in fp32 (no autocast)
    with torch.no_grad():
        torch.testing.assert_close(g(z, emb), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="timesteps must be integers in 0..999"):
        generator_sigmas(replace_steps(cfg, "1000,999"), teacher)


def replace_steps(cfg, steps):
    from dataclasses import replace

    return replace(cfg, conditioning_timestep=None, denoising_steps=steps)
