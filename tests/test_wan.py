"""Wan 2.1 text-to-video teachers: a tiny random WanPipeline (written to disk) held to stock
diffusers at every step (prompt encoding, the VAE's normalisation, x0 and the scheduler's step,
pairs, guidance), distilled for real (one and three steps, resumed, exported, sampled as
videos), with bad inputs refused in one line."""

import json
import math
from pathlib import Path

import pytest
import torch

from cli_helpers import SD_PROMPTS as PROMPTS
from cli_helpers import ok, one_line_error, run

VIDEO = "5x32x32"  # 5 frames (2 latent frames) of 32x32 (4x4 latents, 2x2 tokens a frame)
SIZE = dict(num_frames=5, height=32, width=32)


@pytest.fixture(scope="module")
def wan_pipe(tmp_path_factory) -> Path:
    from dmdctl.teachers.wan.testing import build_wan_pipeline

    return build_wan_pipeline(tmp_path_factory.mktemp("wan") / "pipe")


@pytest.fixture(scope="module")
def stock(wan_pipe):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(wan_pipe)


@pytest.fixture(autouse=True)
def offline(hf_offline):
    """Every test here runs with HF_HUB_OFFLINE=1."""


def teacher_of(folder, **kw):
    from dmdctl.teachers import resolve_teacher

    return resolve_teacher(kw.pop("teacher", None), folder, video_size=VIDEO, **kw)


def test_a_wan_folder_is_a_wan_teacher_with_5d_latents(wan_pipe):
    """A WanPipeline folder given alone is the wan kind, its latents [16, F, H/8, W/8] with
    F = (frames - 1) / 4 + 1; the recipe of a bare folder is the wan-t2v-1.3b preset's."""
    from dmdctl.config import resolve
    from dmdctl.settings.distill import DistillConfig

    t = teacher_of(wan_pipe)
    assert t.name == "wan" and t.text_conditioned
    assert t.sample_shape == (16, 2, 4, 4)
    assert t.config["shift"] == 3.0 and t.config["arch"] == "wan"
    assert teacher_of(wan_pipe, teacher="wan-t2v-1.3b").sha256 == t.sha256
    cfg = resolve(DistillConfig, teacher_path=str(wan_pipe), prompts="p.txt", out="o", cpu=True)
    assert (cfg.denoising_steps, cfg.flow_shift, cfg.real_guidance) == ("1,0.757,0.522", 8.0, 3.5)


def test_prompts_are_encoded_as_the_wan_pipeline_encodes_them(wan_pipe, stock):
    """UMT5's last hidden state over 512 tokens, zero after each prompt's own tokens (the
    pipeline's padding); the unconditional branch is Wan's negative prompt, encoded."""
    from dmdctl.teachers.wan.pipeline import NEGATIVE_PROMPT

    enc = teacher_of(wan_pipe).text_encoder()
    prompts = PROMPTS[:3] + ["  a   red\n dog &amp; a cat  "]  # cleaned as prompt_clean does
    ours = enc(prompts)
    assert ours.shape == (4, 512, 32)
    with torch.no_grad():
        emb, neg = stock.encode_prompt(prompts, negative_prompt=[NEGATIVE_PROMPT] * 4,
                                       max_sequence_length=512, device="cpu")  # fmt: skip
    torch.testing.assert_close(ours, emb, rtol=0, atol=1e-5)
    torch.testing.assert_close(enc.uncond(), neg[:1], rtol=0, atol=1e-5)
    lengths = (ours.abs().sum(-1) > 0).sum(1)
    assert lengths.tolist() == (emb.abs().sum(-1) > 0).sum(1).tolist() and lengths.max() < 512


def test_the_vae_codec_is_the_pipelines_normalisation(wan_pipe, stock):
    """decode(z) is WanPipeline's own latents -> video (z * std + mean through AutoencoderKLWan),
    and encode inverts the normalisation: a video's latents come back as the VAE's mean / std."""
    t = teacher_of(wan_pipe)
    z = torch.randn(2, *t.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        video = t.codec.decode(z)
        mean = torch.tensor(stock.vae.config.latents_mean).view(1, 16, 1, 1, 1)
        std = torch.tensor(stock.vae.config.latents_std).view(1, 16, 1, 1, 1)
        want = stock.vae.decode(z / (1.0 / std) + mean).sample
    assert video.shape == (2, 3, 5, 32, 32)
    torch.testing.assert_close(video, want, rtol=0, atol=1e-6)
    with torch.no_grad():
        back = t.codec.encode(video)
        raw = stock.vae.encode(video).latent_dist.mean
    torch.testing.assert_close(back, (raw - mean) / std, rtol=1e-5, atol=1e-5)


def test_x0_is_the_transformers_flow_step_and_one_step_is_the_euler_step(wan_pipe, stock):
    """D(x_sigma, sigma) with x_sigma = x_t / (1 - t) is x_t - t v(x_t, 1000 t) for the
    transformer called as WanPipeline calls it, on 5-D latents; at t = 1 the input is the noise
    and D is FlowMatchEulerDiscreteScheduler's one step; the DM grid is the scheduler's shifted
    training times (shift 3, or --flow-shift's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    t = teacher_of(wan_pipe)
    d = t.denoiser
    assert type(d).__name__ == "WanDenoiser" and d.sigma_max == math.inf
    cond = t.text_encoder()(PROMPTS[:2])
    g = torch.Generator().manual_seed(0)
    for tt in (0.3, 0.757, 0.98):
        x_t = torch.randn(2, *t.sample_shape, generator=g)
        with torch.no_grad():
            v = stock.transformer(hidden_states=x_t, encoder_hidden_states=cond,
                                  timestep=torch.full((2,), 1000 * tt)).sample  # fmt: skip
            sigma = tt / (1 - tt)
            got = d(x_t * (1 + sigma), torch.full((2,), sigma), cond)
        torch.testing.assert_close(got, x_t - tt * v, rtol=1e-5, atol=1e-5)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(1)
    z = torch.randn(2, *t.sample_shape, generator=g)
    with torch.no_grad():
        v = stock.transformer(hidden_states=z, encoder_hidden_states=cond,
                              timestep=sched.timesteps.expand(2)).sample  # fmt: skip
        want = sched.step(v, sched.timesteps[0], z).prev_sample
        got = d(z * d.input_scale_at(math.inf), math.inf, cond)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for shift in (3.0, 8.0):
        d.set_shift(shift)
        grid = d.training_sigmas(1000)
        train = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        torch.testing.assert_close(grid / (1 + grid), train.sigmas.flip(0)[:-1].float(),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_pairs_are_the_wan_pipelines_own_latents(wan_pipe, stock, prompts_file, tmp_path):
    """make-pairs on a Wan folder (its recipe: the pipeline's UniPC scheduler, CFG 3.5 with Wan's
    negative prompt) stores what WanPipeline computes for the same noise; --save-images keeps
    the decoded videos."""
    from safetensors.torch import load_file

    from dmdctl.teachers.wan.pipeline import NEGATIVE_PROMPT

    out = tmp_path / "pairs"
    ok(run("make-pairs", "--teacher-path", wan_pipe, "--prompts", prompts_file, "--video-size",
           VIDEO, "--num-pairs", 3, "--steps", 4, "--out", out, "--device", "cpu",
           "--save-images"))  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    s = manifest["sampler"]
    assert (s["name"], s["guidance"], s["nfe"]) == ("unipc", 3.5, 8)
    assert manifest["sample_shape"] == [16, 2, 4, 4]
    shard = load_file(str(out / manifest["shards"][0]["file"]))
    assert shard["image"].shape == (3, 3, 5, 32, 32)
    for i in (0, 2):
        ref = stock(PROMPTS[i], negative_prompt=NEGATIVE_PROMPT, num_inference_steps=4,
                    guidance_scale=3.5, latents=shard["noise"][i : i + 1], output_type="latent",
                    **SIZE).frames[0]  # fmt: skip
        torch.testing.assert_close(shard["target"][i], ref, rtol=1e-4, atol=1e-4)
    # pairs of another video size do not fit a run at this one
    one_line_error(
        run("distill", "--teacher-path", wan_pipe, "--prompts", prompts_file, "--pairs", out,
            "--reg-weight", 1, "--video-size", "9x32x32", "--out", tmp_path / "x", "--cpu"),
        "samples of shape (16, 2, 4, 4)",
    )  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_the_real_scores_guidance_is_the_wan_pipelines_cfg(wan_pipe, stock):
    """The guided real score (Wan's negative prompt as the unconditional branch) equals
    x_t - t v for WanPipeline's CFG-combined velocity with its negative embeddings."""
    from dmdctl.teachers.sd.denoiser import GuidedDenoiser
    from dmdctl.teachers.wan.pipeline import NEGATIVE_PROMPT

    t = teacher_of(wan_pipe)
    enc = t.text_encoder()
    real = GuidedDenoiser(t.denoiser, 3.5, enc.uncond())
    with torch.no_grad():
        emb, neg = stock.encode_prompt(PROMPTS[:2], negative_prompt=[NEGATIVE_PROMPT] * 2,
                                       max_sequence_length=512, device="cpu")  # fmt: skip
    tt = 0.6
    x_t = torch.randn(2, *t.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = stock.transformer(hidden_states=torch.cat([x_t, x_t]),
                              encoder_hidden_states=torch.cat([neg, emb]),
                              timestep=torch.full((4,), 1000 * tt)).sample  # fmt: skip
        u, c = v.chunk(2)
        want = x_t - tt * (u + 3.5 * (c - u))
        sigma = tt / (1 - tt)
        got = real(x_t * (1 + sigma), torch.full((2,), sigma), enc(PROMPTS[:2]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def renoising_noise(monkeypatch, seed: int, shape, steps: int):
    """FlowMatchLCMScheduler's noise draws, replaced by draws 2..K of ``seed``'s own RNG (what
    `dmdctl sample` renoises with): WanPipeline does not hand its generator to the scheduler."""
    import diffusers.schedulers.scheduling_flow_match_lcm as lcm

    from dmdctl.core.sampling import seeded_noise_draws

    draws = list(seeded_noise_draws([seed], tuple(shape), steps + 1, "cpu")[1:])

    def next_draw(shape_, generator=None, device=None, dtype=None, **_):
        return draws.pop(0).to(dtype=dtype).reshape(shape_)

    monkeypatch.setattr(lcm, "randn_tensor", next_draw)


@pytest.mark.parametrize("variant", ["dmd-1step", "dmd2-3step-lora"])
def test_wan_distills_samples_videos_and_exports_to_stock_diffusers(
    variant, wan_pipe, prompts_file, tmp_path, monkeypatch
):
    """DMD (one step at t = 1, l2 regression on pairs) and DMD2 (the wan-t2v-1.3b recipe's 3
    steps with --flow-shift 8, a LoRA generator) on a tiny Wan pipeline; `sample` writes an mp4
    and a PNG strip per video; the exported WanPipeline folder (and the LoRA on the teacher)
    reproduce `dmdctl sample` in stock diffusers."""
    import functools

    import imageio.v3 as iio
    import numpy as np
    from diffusers import WanPipeline
    from PIL import Image

    from dmdctl.generators import load_generator
    from dmdctl.teachers.wan.generate import step_scheduler_name, text_to_video

    run_dir = tmp_path / "run"
    common = ("--teacher-path", wan_pipe, "--video-size", VIDEO, "--prompts", prompts_file,
              "--batch-size", 2, "--fake-updates", 1, "--plot-samples", 2, "--steps", 2,
              "--lr", 1e-3, "--fake-lr", 1e-3, "--cpu", "--out", run_dir)  # fmt: skip
    if variant == "dmd-1step":
        pairs = tmp_path / "pairs"
        ok(run("make-pairs", "--teacher-path", wan_pipe, "--video-size", VIDEO, "--prompts",
               prompts_file, "--num-pairs", 4, "--steps", 2, "--out", pairs, "--device", "cpu"))  # fmt: skip
        ok(run("distill", *common, "--pairs", pairs, "--reg-loss", "l2", "--reg-weight", 0.25,
               "--pair-batch-size", 2, "--denoising-steps", "1"))  # fmt: skip
        steps = [1.0]
    else:
        ok(run("distill", "--teacher", "wan-t2v-1.3b", *common, "--lora-rank", 4,
               "--mixed-precision", "no"))  # fmt: skip
        steps = [1.0, 0.757, 0.522]
    logged = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert logged and all(np.isfinite(row["loss_dm"]) for row in logged)
    if variant == "dmd-1step":
        assert all(row["loss_reg"] > 0 for row in logged)
    assert (run_dir / "samples" / "step-0000002.png").is_file()
    gen = load_generator(run_dir / "generator.safetensors")
    assert gen.nfe == len(steps) and gen.config["arch"] == "wan" and gen.sample_shape[1] == 2
    ours = text_to_video(gen.fn, wan_pipe, gen.config, PROMPTS[:2], [5, 6], "cpu")
    assert ours.shape == (2, 3, 5, 32, 32)
    samples = tmp_path / "samples"
    ok(run("sample", "--generator", run_dir / "generator.safetensors", "--prompts", prompts_file,
           "--num", 2, "--out", samples, "--seed", 5, "--device", "cpu"))  # fmt: skip
    index = [json.loads(x) for x in (samples / "videos.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in index] == [5, 6] and index[1]["prompt"] == PROMPTS[1]
    for i, row in enumerate(index):
        strip = np.asarray(Image.open(samples / row["strip"])).astype(np.float64) / 255
        want = ours[i].permute(2, 1, 3, 0).reshape(32, 5 * 32, 3).numpy()  # frames side by side
        assert np.abs(strip - want).max() <= 0.5 / 255 + 1e-6
        frames = iio.imread(samples / row["file"])  # decoded back from the H.264 file
        assert frames.shape == (5, 32, 32, 3)
    ok(run("export", run_dir, "--format", "diffusers", "-o", tmp_path / "full"))
    pipes = [WanPipeline.from_pretrained(tmp_path / "full")]
    assert type(pipes[0].scheduler).__name__ == step_scheduler_name(steps)
    if variant != "dmd-1step":
        ok(run("export", run_dir, "--format", "lora", "-o", tmp_path / "lora"))
        with_lora = WanPipeline.from_pretrained(wan_pipe)
        with_lora.scheduler = pipes[0].scheduler
        with_lora.load_lora_weights(tmp_path / "lora")
        pipes.append(with_lora)
    for pipe in pipes:
        if len(steps) > 1:  # as the model card says: the generator's times as the sigmas
            set_timesteps = pipe.scheduler.set_timesteps
            pipe.scheduler.set_timesteps = functools.partial(set_timesteps, sigmas=steps)
        for i, prompt in enumerate(PROMPTS[:2]):
            if len(steps) > 1:
                renoising_noise(monkeypatch, 5 + i, gen.sample_shape, len(steps))
            theirs = pipe(prompt, guidance_scale=1.0, output_type="pt", num_inference_steps=len(steps),
                          generator=torch.Generator().manual_seed(5 + i), **SIZE).frames[0]  # fmt: skip
            # WanPipeline's frames are [F, 3, H, W]
            torch.testing.assert_close(theirs.permute(1, 0, 2, 3), ours[i], rtol=0, atol=2e-5)


def captioned_videos(folder: Path, n: int = 4, frames: int = 7, size=(40, 48)) -> Path:
    """``n`` short mp4 clips (frames x H x W, larger than the teacher's) with captions.jsonl."""
    import imageio
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        base = rng.integers(0, 255, (1, *size, 3))
        clip = np.clip(base + 8 * np.arange(frames)[:, None, None, None], 0, 255).astype(np.uint8)
        imageio.mimwrite(str(folder / f"v{i}.mp4"), list(clip), fps=16, macro_block_size=8)
        rows.append({"file": f"v{i}.mp4", "caption": PROMPTS[i % len(PROMPTS)]})
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_prepare_real_encodes_videos_as_the_pipelines_vae_latents(wan_pipe, tmp_path):
    """prepare-real on a folder of captioned mp4 clips stores, per clip, the first 5 frames
    centre-cropped and resized to 32x32, encoded by the VAE and normalised (fp16); a clip with
    too few frames is refused in one line."""
    import imageio.v3 as iio
    import numpy as np

    from dmdctl.data.real import load_real_data
    from dmdctl.data.real_store import prepare_frame, to_unit_range

    src = captioned_videos(tmp_path / "videos")
    store = tmp_path / "store"
    ok(run("prepare-real", src, "--teacher-path", wan_pipe, "--video-size", VIDEO,
           "--device", "cpu", "--out", store))  # fmt: skip
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["sample_shape"] == [16, 2, 4, 4] and manifest["rows"] == 4
    t = teacher_of(wan_pipe)
    real = load_real_data(str(store), t)
    x, captions = real.rows(torch.tensor([1]))
    from PIL import Image

    frames = [prepare_frame(Image.fromarray(f), 32, 32) for f in iio.imread(src / "v1.mp4")[:5]]
    with torch.no_grad():
        want = t.codec.encode(to_unit_range(np.stack(frames)[None]))
    torch.testing.assert_close(x.float(), want, rtol=0, atol=2e-2)  # fp16 storage
    assert captions == [PROMPTS[1]]
    one_line_error(
        run("prepare-real", src, "--teacher-path", wan_pipe, "--video-size", "9x32x32",
            "--device", "cpu", "--out", tmp_path / "short"),
        "v0.mp4", "has 7 frames; the teacher's videos have 9",
    )  # fmt: skip


@pytest.fixture(scope="module")
def wan_sources(wan_pipe, prompts_file, tmp_path_factory):
    """Pairs (4, from the prompts) and a store of 4 captioned clips for the tiny Wan pipeline."""
    root = tmp_path_factory.mktemp("wan-sources")
    ok(run("make-pairs", "--teacher-path", wan_pipe, "--video-size", VIDEO, "--prompts",
           prompts_file, "--num-pairs", 4, "--shard-size", 2, "--steps", 2, "--device", "cpu",
           "--out", root / "pairs"))  # fmt: skip
    ok(run("prepare-real", captioned_videos(root / "videos"), "--teacher-path", wan_pipe,
           "--video-size", VIDEO, "--device", "cpu", "--out", root / "store"))  # fmt: skip
    return root


def wan_args(wan_pipe, prompts_file, sources, out, steps=4, fake_updates=2) -> list:
    """The recipe's 3 steps and flow shift, prompts encoded in the step, l2 regression on the
    pairs and the GAN on real clips through the fake score's middle-block tokens."""
    return [
        "distill", "--teacher", "wan-t2v-1.3b", "--teacher-path", wan_pipe, "--video-size", VIDEO,
        "--prompts", prompts_file, "--prompt-cache", "off", "--pairs", sources / "pairs",
        "--reg-loss", "l2", "--reg-weight", 0.25, "--pair-batch-size", 2,
        "--real-data", sources / "store", "--gan-weight", 0.01, "--batch-size", 2,
        "--fake-updates", fake_updates, "--steps", steps, "--checkpoint-every", 2,
        "--log-every", 1, "--plot-samples", 0, "--lr", 1e-3, "--fake-lr", 1e-3, "--cpu",
        "--mixed-precision", "no", "--out", out,
    ]  # fmt: skip


def test_a_wan_gan_run_killed_with_sigkill_resumes_exactly(
    wan_pipe, prompts_file, wan_sources, tmp_path
):
    """Every source at once on 5-D latents (pairs, real clips for the GAN head on the video's
    tokens, prompts encoded in the step), 3 generator steps: SIGKILL after a checkpoint, then
    --resume latest, equals the uninterrupted run bitwise (weights, GAN head, EMA, log)."""
    import signal
    import subprocess

    from safetensors.torch import load_file

    import dmdctl.training.checkpoint as ck
    from cli_helpers import PROCESS_ENV
    from test_preemption import dmdctl, last_logged_step, rerun, wait_until

    whole = tmp_path / "whole"
    r = ok(run(*wan_args(wan_pipe, prompts_file, wan_sources, whole)))
    assert "encoded in each step" in r.output and "GAN real data" in r.output
    cut = tmp_path / "cut"
    cmd = [str(a) for a in wan_args(wan_pipe, prompts_file, wan_sources, cut)]
    proc = subprocess.Popen(dmdctl(*cmd), env=PROCESS_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_until(
        proc, lambda: ck.list_checkpoints(cut / "checkpoints") and last_logged_step(cut) >= 3
    )
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (cut / "generator.safetensors").exists()
    rerun(*wan_args(wan_pipe, prompts_file, wan_sources, cut), "--resume", "latest")
    last = whole / "checkpoints" / "step-0000004", cut / "checkpoints" / "step-0000004"
    for name in ("generator", "fake", "gan_head", "ema", "optim_generator"):
        a, b = (load_file(str(d / f"{name}.safetensors")) for d in last)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    drop = ("samples_per_s",)
    la, lb = ([{k: v for k, v in json.loads(x).items() if k not in drop}
               for x in (d / "log.jsonl").read_text().splitlines()] for d in (whole, cut))  # fmt: skip
    assert la == lb and len(la) == 4
    assert all(x["loss_reg"] > 0 and x["loss_cls"] > 0 and math.isfinite(x["loss_dm"]) for x in la)
    # the head reads the middle block's tokens as one 2x2 map per latent frame
    head = load_file(str(last[0] / "gan_head.safetensors"))
    assert head["net.0.weight"].shape[1] == 16  # the transformer's width (2 heads x 8)


@pytest.mark.slow
def test_two_wan_processes_train_like_one(wan_pipe, prompts_file, wan_sources, tmp_path):
    """The same GAN + regression run in 2 processes (each its share of every global batch)
    equals 1 process up to float rounding."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from cli_helpers import PROCESS_ENV

    one, two = tmp_path / "one", tmp_path / "two"
    ok(run(*wan_args(wan_pipe, prompts_file, wan_sources, one, steps=2, fake_updates=1)))
    jobs = [[str(a) for a in wan_args(wan_pipe, prompts_file, wan_sources, two, 2, 1)]]
    script = Path(__file__).with_name("test_multiprocess.py")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path), json.dumps(jobs)],
        env=PROCESS_ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    # step 1 comes before any update: every process read the same rows (prompts, pairs, real
    # clips) as the 1-process run, so only the all-reduce's float rounding differs
    la, lb = ([json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
              for d in (one, two))  # fmt: skip
    for k in ("loss_dm", "loss_reg", "loss_gan", "loss_cls", "loss_fake"):
        assert abs(la[0][k] - lb[0][k]) <= 1e-5 * max(abs(la[0][k]), 1e-3), (k, la[0], lb[0])
    # after it Adam turns that rounding into steps of up to +-lr on weights whose gradient is
    # mostly rounding (as in test_data_sources): measured 1.7e-5 here at lr 1e-3
    for name in ("generator", "fake", "gan_head"):
        a, b = (load_file(str(d / "checkpoints" / "step-0000002" / f"{name}.safetensors"))
                for d in (one, two))  # fmt: skip
        worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
        assert worst <= 1e-3, (name, worst)


def test_fsdp_units_of_a_wan_transformer_are_its_blocks(wan_pipe):
    from dmdctl.training.sharding import shard_units

    net = teacher_of(wan_pipe).denoiser.network
    assert shard_units(net) == list(net.blocks) and len(net.blocks) == 2


def test_the_gan_head_scores_each_latent_frame_of_the_tokens_as_a_map(wan_pipe):
    """On a video's tokens [N, F*H*W, C] (the transformer's patch order: frame, row, column)
    the head's logit is the mean over frames of the same head on each frame's [C, H, W] map;
    the grid comes from the transformer's patching of the sample shape."""
    from dmdctl.core.gan import GANHead

    t = teacher_of(wan_pipe)
    grid = t.denoiser.token_grid(t.sample_shape)
    assert grid == (2, 2, 2)
    torch.manual_seed(0)
    head = GANHead((8, 16), grid)
    tokens = torch.randn(3, 8, 16)
    maps = tokens.transpose(1, 2).reshape(3, 16, *grid)  # [N, C, F, H, W]
    per_frame = torch.stack([head.net(maps[:, :, f]).flatten(1).mean(1) for f in range(2)], 1)
    torch.testing.assert_close(head(tokens), per_frame.mean(1))
    with pytest.raises(ValueError, match="do not lie on a 2x2x3 grid"):
        GANHead((8, 16), (2, 2, 3))


def test_without_imageio_sample_and_prepare_real_refuse_in_one_line(
    wan_pipe, prompts_file, tmp_path, monkeypatch
):
    """mp4 needs the video extra: without imageio-ffmpeg both commands say so and write nothing."""
    import sys

    from dmdctl.generators import save_generator

    t = teacher_of(wan_pipe)
    gen = save_generator(t.denoiser, "wan", t.config, t.sha256, tmp_path / "g.safetensors")
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if not installed
    for argv in (("sample", "--generator", gen, "--prompts", prompts_file, "--out",
                  tmp_path / "s", "--device", "cpu"),
                 ("prepare-real", tmp_path, "--teacher-path", wan_pipe, "--video-size", VIDEO,
                  "--device", "cpu", "--out", tmp_path / "s")):  # fmt: skip
        (tmp_path / "captions.jsonl").write_text('{"file": "g.safetensors", "caption": "a"}\n')
        one_line_error(run(*argv), "pip install 'dmdctl[video]'")
        assert not (tmp_path / "s").exists()
