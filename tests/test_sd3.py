"""Flow-matching teachers: SD3 pipelines (tiny, random, written to disk) held to stock diffusers,
and the built-in toy2d-flow teacher distilled for real."""

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import SD_PROMPTS as PROMPTS
from cli_helpers import captioned_images, ok, one_line_error, real_store, run


@pytest.fixture(scope="module")
def sd3_pipe(tmp_path_factory) -> Path:
    from dmdctl.teachers.sd.testing import build_sd3_pipeline

    return build_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


@pytest.fixture(autouse=True)
def offline(hf_offline):
    """Every test here runs with HF_HUB_OFFLINE=1."""


@pytest.mark.parametrize("t5", [True, False])
def test_prompts_are_encoded_as_the_sd3_pipeline_encodes_them(t5, sd3_pipe, tmp_path):
    """CLIP x2 (penultimate hidden states, padded to T5's width) then T5's tokens; pooled: both
    CLIP projections; without text_encoder_3, zeros for T5's tokens, as the pipeline gives. The
    guidance's unconditional branch is the encoded empty prompt (the pipeline's negative)."""
    from diffusers import StableDiffusion3Pipeline

    from dmdctl.teachers.sd.denoiser import unpack_sdxl_condition
    from dmdctl.teachers.sd.pipeline import load_text_encoder, sd_config
    from dmdctl.teachers.sd.testing import build_sd3_pipeline

    folder = sd3_pipe if t5 else build_sd3_pipeline(tmp_path / "p", t5=False)
    config = sd_config(folder, str(folder))
    assert config["arch"] == "sd3" and config["t5"] is t5 and config["shift"] == 3.0
    enc = load_text_encoder(folder)
    ours = enc(PROMPTS[:3])
    assert ours.shape == (3, 16 + 256 + 1, 48)
    tokens, pooled = unpack_sdxl_condition(ours, config["pooled_dim"])
    no_t5 = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, **no_t5)
    emb, neg, pool, neg_pool = pipe.encode_prompt(PROMPTS[:3], None, None, device="cpu")
    torch.testing.assert_close(tokens, emb, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, pool, rtol=0, atol=1e-5)
    assert bool(tokens[:, 16:].abs().sum() == 0) is (not t5)
    u_tokens, u_pooled = unpack_sdxl_condition(enc.uncond(), config["pooled_dim"])
    torch.testing.assert_close(u_tokens, neg[:1], rtol=0, atol=1e-5)
    torch.testing.assert_close(u_pooled, neg_pool[:1], rtol=0, atol=1e-5)


def test_x0_and_the_one_step_generator_are_the_flow_schedulers_step(sd3_pipe):
    """D(x_sigma, sigma) with x_sigma = x_t / (1 - t) is x_t - t v(x_t, 1000 t) for the
    transformer called as the pipeline calls it; at t = 1 (sigma = inf) the input is the noise
    itself and D is FlowMatchEulerDiscreteScheduler's one step from t = 1 to 0; the fake score's
    loss weight makes the x0 error the velocity MSE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from dmdctl.teachers import resolve_teacher

    teacher = resolve_teacher("sd3", sd3_pipe)
    d = teacher.denoiser
    assert type(d).__name__ == "SD3Denoiser" and d.sigma_max == math.inf
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_pipe)
    emb, _, pooled, _ = pipe.encode_prompt(PROMPTS[:2], None, None, device="cpu",
                                           do_classifier_free_guidance=False)  # fmt: skip
    cond = teacher.text_encoder()(PROMPTS[:2])
    g = torch.Generator().manual_seed(0)
    for t in (0.3, 0.75, 0.98):
        x_t = torch.randn(2, 4, 8, 8, generator=g)
        with torch.no_grad():
            v = pipe.transformer(hidden_states=x_t, encoder_hidden_states=emb,
                                 pooled_projections=pooled,
                                 timestep=torch.full((2,), 1000 * t)).sample  # fmt: skip
            sigma = t / (1 - t)
            got = d(x_t * (1 + sigma), torch.full((2,), sigma), cond)
        torch.testing.assert_close(got, x_t - t * v, rtol=1e-4, atol=1e-4)
    # one step from pure noise: the stock scheduler's single Euler step
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(1)
    assert sched.sigmas.tolist() == [1.0, 0.0]
    z = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        v = pipe.transformer(hidden_states=z, encoder_hidden_states=emb, pooled_projections=pooled,
                             timestep=sched.timesteps.expand(2)).sample  # fmt: skip
        want = sched.step(v, sched.timesteps[0], z).prev_sample
        got = d(z * d.input_scale_at(math.inf), math.inf, cond)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the flow-matching loss: |x0 error|^2 / t^2 = |velocity error|^2
    s = torch.tensor([0.5, 3.0])
    torch.testing.assert_close(d.loss_weight(s), (1 / (s / (1 + s))) ** 2)
    # the DM loss's grid: the scheduler's shifted training times (pure noise left out)
    grid = d.training_sigmas(1000)
    t_grid = grid / (1 + grid)
    train = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config).sigmas.flip(0)
    torch.testing.assert_close(t_grid, train[:-1].float(), rtol=1e-5, atol=1e-6)


def test_pairs_are_the_sd3_pipelines_own_latents(sd3_pipe, prompts_file, tmp_path):
    """make-pairs on an SD3 folder (its recipe: FlowMatchEuler, CFG 7) stores what
    StableDiffusion3Pipeline computes for the same noise."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    out = tmp_path / "pairs"
    ok(
        run(
            "make-pairs", "--teacher-path", sd3_pipe, "--prompts", prompts_file,
            "--num-pairs", 3, "--steps", 4, "--out", out, "--device", "cpu",
        )
    )  # fmt: skip
    s = json.loads((out / "manifest.json").read_text())["sampler"]
    assert (s["name"], s["guidance"], s["nfe"]) == ("flow-euler", 7.0, 8)
    manifest = json.loads((out / "manifest.json").read_text())
    shard = load_file(str(out / manifest["shards"][0]["file"]))
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_pipe)
    for i in (0, 2):
        ref = pipe(PROMPTS[i], num_inference_steps=4, guidance_scale=7.0,
                   latents=shard["noise"][i : i + 1], output_type="latent").images[0]  # fmt: skip
        torch.testing.assert_close(shard["target"][i], ref, rtol=1e-4, atol=1e-4)


@contextlib.contextmanager
def renoising_noise(monkeypatch, seed: int, shape, steps: int):
    """FlowMatchLCMScheduler's noise draws, replaced by draws 2..K of ``seed``'s own RNG (what
    `dmdctl sample` renoises with); one extra draw for its last step, which does not use it."""
    import diffusers.schedulers.scheduling_flow_match_lcm as lcm

    from dmdctl.core.sampling import seeded_noise_draws

    draws = list(seeded_noise_draws([seed], tuple(shape), steps + 1, "cpu")[1:])

    def next_draw(shape_, generator=None, device=None, dtype=None, **_):
        return draws.pop(0).to(dtype=dtype).reshape(shape_)

    with monkeypatch.context() as m:
        m.setattr(lcm, "randn_tensor", next_draw)
        yield


@pytest.mark.parametrize("variant", ["dmd-1step", "dmd2-4step-lora"])
def test_sd3_distills_and_exports_to_stock_diffusers(
    variant, sd3_pipe, prompts_file, tmp_path, monkeypatch
):
    """DMD (one step at t = 1, regression on pairs) and DMD2 (the sd3 recipe's 4 steps, the GAN
    on captioned images through the transformer's middle-block tokens, a LoRA generator) on a
    tiny SD3 pipeline; the exported folder (and the LoRA on the teacher) reproduce `dmdctl sample`
    in StableDiffusion3Pipeline."""
    from diffusers import StableDiffusion3Pipeline

    from dmdctl.generators import load_generator
    from dmdctl.teachers.sd.generate import step_scheduler, text_to_image

    run_dir = tmp_path / "run"
    common = ("--teacher", "sd3", "--teacher-path", sd3_pipe, "--prompts", prompts_file,
              "--batch-size", 2, "--fake-updates", 1, "--plot-samples", 0, "--steps", 2,
              "--lr", 1e-3, "--fake-lr", 1e-3, "--cpu", "--out", run_dir)  # fmt: skip
    if variant == "dmd-1step":
        pairs = tmp_path / "pairs"
        ok(run("make-pairs", "--teacher", "sd3", "--teacher-path", sd3_pipe, "--prompts",
               prompts_file, "--num-pairs", 4, "--steps", 2, "--out", pairs, "--device", "cpu"))  # fmt: skip
        ok(run("distill", *common, "--pairs", pairs, "--reg-weight", 0.25, "--pair-batch-size",
               2, "--denoising-steps", "1"))  # fmt: skip
        steps = [1.0]
    else:
        real = real_store(captioned_images(tmp_path / "real", (20, 20)), sd3_pipe)
        r = ok(run("distill", *common, "--real-data", real, "--gan-weight", 1e-2,
                   "--lora-rank", 4, "--mixed-precision", "no"))  # fmt: skip
        assert "(3 latents from" in " ".join(r.output.split())
        steps = [1.0, 0.9, 0.75, 0.5]
    logged = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert logged and all(np.isfinite(row["loss_dm"]) for row in logged)
    extra = "loss_reg" if variant == "dmd-1step" else "loss_cls"  # regression, or the GAN
    assert all(np.isfinite(row[extra]) for row in logged)
    gen = load_generator(run_dir / "generator.safetensors")
    assert gen.nfe == len(steps) and gen.config["arch"] == "sd3"
    ours = text_to_image(gen.fn, sd3_pipe, gen.config, PROMPTS[:2], [5, 6], "cpu")
    samples = tmp_path / "samples"
    ok(run("sample", "--generator", run_dir / "generator.safetensors", "--prompts", prompts_file,
           "--out", samples, "--seed", 5, "--device", "cpu"))  # fmt: skip
    ok(run("export", run_dir, "--format", "diffusers", "-o", tmp_path / "full"))
    pipes = [StableDiffusion3Pipeline.from_pretrained(tmp_path / "full")]
    assert type(pipes[0].scheduler).__name__ == step_scheduler("sd3", steps, {})[1]
    if variant != "dmd-1step":
        ok(run("export", run_dir, "--format", "lora", "-o", tmp_path / "lora"))
        with_lora = StableDiffusion3Pipeline.from_pretrained(sd3_pipe)
        with_lora.scheduler = pipes[0].scheduler
        with_lora.load_lora_weights(tmp_path / "lora")
        pipes.append(with_lora)
    how = {"num_inference_steps": 1} if steps == [1.0] else {"sigmas": steps}
    index = [json.loads(x) for x in (samples / "images.jsonl").read_text().splitlines()]
    for i, prompt in enumerate(PROMPTS[:2]):
        for pipe in pipes:
            # StableDiffusion3Pipeline does not hand `generator` to the scheduler's step: the
            # renoising noise of a few-step run comes from torch's global RNG. Here it is fed
            # the seed's own draws, so the comparison holds the steps' arithmetic to ours
            with renoising_noise(monkeypatch, 5 + i, gen.sample_shape, len(steps)):
                theirs = pipe(prompt, guidance_scale=0, output_type="pt",
                              generator=torch.Generator().manual_seed(5 + i), **how).images[0]  # fmt: skip
            torch.testing.assert_close(theirs, ours[i], rtol=0, atol=2e-5)
        png = np.asarray(Image.open(samples / index[i]["file"])).astype(np.float64) / 255
        assert np.abs(png - ours[i].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6


def test_sd3_presets_and_their_refusals(sd3_pipe, sd_pipe, prompts_file, tmp_path):
    from dmdctl.config import resolve
    from dmdctl.settings.distill import DistillConfig

    bare = resolve(DistillConfig, teacher_path=str(sd3_pipe), prompts=str(prompts_file),
                   out=str(tmp_path / "b"), cpu=True)  # fmt: skip
    assert bare.real_guidance == 7.0 and bare.denoising_steps == "1,0.9,0.75,0.5"
    for teacher, folder, says in (("sd3", sd_pipe, "SD1.x/2.x"), ("sdxl", sd3_pipe, "SD3")):
        out = tmp_path / f"x-{teacher}"
        one_line_error(
            run("distill", "--teacher", teacher, "--teacher-path", folder, "--prompts",
                prompts_file, "--out", out, "--cpu"),
            f"is an {says} pipeline",
        )  # fmt: skip
        assert not out.exists()
    out = tmp_path / "bad-steps"
    one_line_error(
        run("distill", "--teacher", "sd3", "--teacher-path", sd3_pipe, "--prompts",
            prompts_file, "--denoising-steps", "999,499", "--out", out, "--cpu"),
        "t values in (0, 1]",
    )  # fmt: skip


def test_no_t5_is_recorded_and_followed_by_sample_and_export(
    sd3_pipe, sd_pipe, prompts_file, tmp_path
):
    """--no-t5: T5's tokens are zeros in the cached embeddings; the generator records it, and the
    export (loaded as its model card says, text_encoder_3=None) gives `dmdctl sample`'s images."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    from dmdctl.generators import load_generator
    from dmdctl.teachers.sd.generate import text_to_image

    run_dir = tmp_path / "run"
    ok(run("distill", "--teacher", "sd3", "--teacher-path", sd3_pipe, "--prompts", prompts_file,
           "--no-t5", "--denoising-steps", "1", "--batch-size", 2, "--fake-updates", 1,
           "--plot-samples", 0, "--steps", 1, "--cpu", "--out", run_dir))  # fmt: skip
    emb = load_file(str(run_dir / "prompt-embeddings.safetensors"))["embeddings"]
    assert emb[:, 16:-1].abs().sum() == 0 and emb[:, :16].abs().sum() > 0
    gen = load_generator(run_dir / "generator.safetensors")
    assert gen.config["t5"] is False
    ours = text_to_image(gen.fn, sd3_pipe, gen.config, PROMPTS[:2], [5, 6], "cpu")
    ok(run("export", run_dir, "--format", "diffusers", "-o", tmp_path / "full"))
    assert "text_encoder_3=None, tokenizer_3=None" in (tmp_path / "full" / "README.md").read_text()
    pipe = StableDiffusion3Pipeline.from_pretrained(
        tmp_path / "full", text_encoder_3=None, tokenizer_3=None
    )
    for i, prompt in enumerate(PROMPTS[:2]):
        theirs = pipe(prompt, guidance_scale=0, output_type="pt", num_inference_steps=1,
                      generator=torch.Generator().manual_seed(5 + i)).images[0]  # fmt: skip
        torch.testing.assert_close(theirs, ours[i], rtol=0, atol=2e-5)
    # on a teacher without T5, --no-t5 is refused in one line
    one_line_error(
        run("distill", "--teacher-path", sd_pipe, "--no-t5", "--prompts", prompts_file,
            "--out", tmp_path / "x", "--cpu"),
        "--no-t5 is for SD3 teachers",
    )  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_the_real_scores_guidance_is_the_sd3_pipelines_cfg(sd3_pipe):
    """The guided real score (the encoded empty prompt as the unconditional branch) equals
    x_t - t v for the pipeline's CFG-combined velocity with its own negative embeddings."""
    from diffusers import StableDiffusion3Pipeline

    from dmdctl.teachers import resolve_teacher
    from dmdctl.teachers.sd.denoiser import GuidedDenoiser

    teacher = resolve_teacher("sd3", sd3_pipe)
    enc = teacher.text_encoder()
    real = GuidedDenoiser(teacher.denoiser, 7.0, enc.uncond())
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_pipe)
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS[:2], None, None, device="cpu")
    t = 0.6
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = pipe.transformer(
            hidden_states=torch.cat([x_t, x_t]),
            encoder_hidden_states=torch.cat([neg, emb]),
            pooled_projections=torch.cat([neg_pooled, pooled]),
            timestep=torch.full((4,), 1000 * t),
        ).sample
        u, c = v.chunk(2)
        want = x_t - t * (u + 7.0 * (c - u))
        sigma = t / (1 - t)
        got = real(x_t * (1 + sigma), torch.full((2,), sigma), enc(PROMPTS[:2]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_an_sd35_style_transformer_distils_and_exports(prompts_file, tmp_path):
    """SD3.5's transformer additions (RMS-normed queries/keys, a dual-attention block, as in SD3.5
    medium) on a tiny pipeline: a one-step run exports and reproduces `dmdctl sample`."""
    from diffusers import StableDiffusion3Pipeline

    from dmdctl.generators import load_generator
    from dmdctl.teachers.sd.generate import text_to_image
    from dmdctl.teachers.sd.testing import build_sd3_pipeline

    pipe_dir = build_sd3_pipeline(tmp_path / "pipe", size="tiny-3.5")
    run_dir = tmp_path / "run"
    ok(run("distill", "--teacher-path", pipe_dir, "--prompts", prompts_file, "--denoising-steps",
           "1", "--batch-size", 2, "--fake-updates", 1, "--plot-samples", 0, "--steps", 2,
           "--lr", 1e-3, "--cpu", "--out", run_dir))  # fmt: skip
    gen = load_generator(run_dir / "generator.safetensors")
    assert gen.config["transformer_config"]["qk_norm"] == "rms_norm"
    ours = text_to_image(gen.fn, pipe_dir, gen.config, PROMPTS[:1], [3], "cpu")
    ok(run("export", run_dir, "--format", "diffusers", "-o", tmp_path / "full"))
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "full")
    theirs = pipe(PROMPTS[0], guidance_scale=0, output_type="pt", num_inference_steps=1,
                  generator=torch.Generator().manual_seed(3)).images[0]  # fmt: skip
    torch.testing.assert_close(theirs, ours[0], rtol=0, atol=2e-5)
