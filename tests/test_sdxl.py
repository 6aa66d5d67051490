"""SDXL teachers, exercised for real on tiny random SDXL pipelines written to disk.

Two text encoders (the second with a projection, or without one), the UNet's text-time added
embedding, Euler sampling: each conversion is held to what stock diffusers computes.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import SD_PROMPTS as PROMPTS
from cli_helpers import captioned_images, largest_change, ok, one_line_error, real_store, run


@pytest.fixture(scope="module")
def xl_pipe(tmp_path_factory) -> Path:
    from dmdctl.teachers.sd.testing import build_xl_pipeline

    return build_xl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


@pytest.fixture(autouse=True)
def offline(hf_offline):
    """Every test here runs with HF_HUB_OFFLINE=1."""


def _time_ids(pipe):
    side = pipe.default_sample_size * pipe.vae_scale_factor
    return torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32)


@pytest.mark.parametrize("projection", [True, False])
def test_prompts_are_encoded_as_the_pipeline_encodes_them(projection, xl_pipe, tmp_path):
    """Tokens: both encoders' penultimate hidden states, concatenated; pooled: the second
    encoder's (projected) output; the guidance's unconditional branch: zeros, as the pipeline's
    force_zeros_for_empty_prompt (and DMD2's SDXL code) build it."""
    from diffusers import StableDiffusionXLPipeline

    from dmdctl.teachers.sd.denoiser import unpack_sdxl_condition
    from dmdctl.teachers.sd.pipeline import load_text_encoder, sd_config
    from dmdctl.teachers.sd.testing import build_xl_pipeline

    folder = xl_pipe if projection else build_xl_pipeline(tmp_path / "p", projection=False)
    config = sd_config(folder, str(folder))
    assert config["arch"] == "sdxl" and config["pooled_dim"] == 16
    enc = load_text_encoder(folder)
    ours = enc(PROMPTS[:3])
    assert ours.shape == (3, 16 + 1, 32)
    tokens, pooled = unpack_sdxl_condition(ours, config["pooled_dim"])
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    emb, neg, pool, neg_pool = pipe.encode_prompt(PROMPTS[:3], device="cpu")
    torch.testing.assert_close(tokens, emb, rtol=0, atol=0)
    torch.testing.assert_close(pooled, pool, rtol=0, atol=0)
    assert neg.abs().sum() == 0 and neg_pool.abs().sum() == 0
    u = enc.uncond()
    assert u.shape == (1, 17, 32) and u.abs().sum() == 0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_x0_equals_the_euler_schedulers_prediction(prediction, xl_pipe, tmp_path):
    """D(x_sigma, sigma_t, c) equals EulerDiscreteScheduler's pred_original_sample for the UNet
    called as StableDiffusionXLPipeline calls it (pooled embedding, time ids, scaled input)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from dmdctl.teachers import resolve_teacher
    from dmdctl.teachers.sd.testing import build_xl_pipeline

    folder = xl_pipe
    if prediction != "epsilon":
        folder = build_xl_pipeline(tmp_path / "v", prediction_type=prediction, seed=1)
    teacher = resolve_teacher("sdxl", folder)
    d = teacher.denoiser
    assert type(d).__name__ == "SDXLDenoiser" and d.prediction_type == prediction
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    emb, _, pooled, _ = pipe.encode_prompt(
        PROMPTS[:2], device="cpu", do_classifier_free_guidance=False
    )
    cond = teacher.text_encoder()(PROMPTS[:2])
    sched = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    for i in (0, 4, 9):
        t = sched.timesteps[i]
        sched._step_index = i
        sigma = sched.sigmas[i]
        x = torch.randn(2, 4, 8, 8, generator=g) * (1 + sigma)
        with torch.no_grad():
            out = pipe.unet(
                sched.scale_model_input(x, t),
                t,
                encoder_hidden_states=emb,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": _time_ids(pipe).repeat(2, 1)},
            ).sample
            want = sched.step(out, t, x).pred_original_sample
            got = d(x, torch.full((2,), float(sigma)), cond)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_pairs_are_the_pipelines_own_latents(xl_pipe, prompts_file, tmp_path):
    """make-pairs --teacher sdxl (DMD2's pair sampler: Euler, trailing spacing, CFG 8) stores
    what StableDiffusionXLPipeline computes for the same noise."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    out = tmp_path / "pairs"
    ok(
        run(
            "make-pairs", "--teacher", "sdxl", "--teacher-path", xl_pipe, "--prompts",
            prompts_file, "--num-pairs", 3, "--steps", 4, "--out", out, "--device", "cpu",
        )
    )  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    s = manifest["sampler"]
    assert (s["name"], s["guidance"], s["nfe"]) == ("euler-trailing", 8.0, 8)
    shard = load_file(str(out / manifest["shards"][0]["file"]))
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_pipe)
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing"
    )
    for i in (0, 2):
        ref = pipe(
            PROMPTS[i],
            num_inference_steps=4,
            guidance_scale=8.0,
            latents=shard["noise"][i : i + 1],
            output_type="latent",
        ).images[0]
        torch.testing.assert_close(shard["target"][i], ref, rtol=1e-4, atol=1e-4)


def test_sdxl_dmd2_4_step_gan_run_exports_to_stock_diffusers(xl_pipe, prompts_file, tmp_path):
    """--teacher sdxl (DMD2's SDXL 4-step recipe) with the GAN on captioned images trains, and
    its export runs in StableDiffusionXLPipeline with LCMScheduler, giving `dmdctl sample`'s
    images for the same seeds."""
    import tomllib
    from diffusers import LCMScheduler, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from dmdctl.generators import load_generator
    from dmdctl.teachers.sd.generate import text_to_image

    real = real_store(captioned_images(tmp_path / "real"), xl_pipe)
    run_dir = tmp_path / "run"
    ok(
        run(
            "distill", "--teacher", "sdxl", "--teacher-path", xl_pipe, "--prompts", prompts_file,
            "--real-data", real, "--steps", 2, "--batch-size", 2, "--fake-updates", 1,
            "--plot-samples", 0, "--log-every", 1, "--lr", 1e-3, "--fake-lr", 1e-3,
            "--cpu", "--out", run_dir,
        )
    )  # fmt: skip
    used = tomllib.loads((run_dir / "config.toml").read_text())
    assert used["denoising_steps"] == "999,749,499,249" and used["real_guidance"] == 8.0
    assert used["gan_weight"] == 5e-3 and used["gan_classifier_weight"] == 1e-2
    logged = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss_dm"]) and np.isfinite(r["loss_cls"]) for r in logged)
    gen = load_generator(run_dir / "generator.safetensors")
    assert gen.nfe == 4 and gen.config["arch"] == "sdxl"
    teacher_unet = StableDiffusionXLPipeline.from_pretrained(xl_pipe).unet.state_dict()
    assert largest_change(gen.fn.denoiser, teacher_unet) > 1e-5

    samples = tmp_path / "samples"
    ok(
        run(
            "sample", "--generator", run_dir / "generator.safetensors", "--prompts",
            prompts_file, "--out", samples, "--seed", 5, "--device", "cpu",
        )
    )  # fmt: skip
    index = [json.loads(x) for x in (samples / "images.jsonl").read_text().splitlines()]
    export = tmp_path / "export"
    r = ok(run("export", run_dir, "--format", "diffusers", "-o", export))
    # the printed usage names the SDXL class (rich may wrap the line: compare without spaces)
    assert "StableDiffusionXLPipeline" in "".join(r.output.split()).replace("│", "")
    card = (export / "README.md").read_text()
    assert "StableDiffusionXLPipeline" in card and "timesteps=[999, 749, 499, 249]" in card
    # a checkpoint folder exports too (its own generator.safetensors is not an EMA file)
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    ok(run("export", ckpt, "--format", "diffusers", "-o", tmp_path / "from-ckpt"))
    assert load_file(str(tmp_path / "from-ckpt" / "unet" / "diffusion_pytorch_model.safetensors"))
    pipe = StableDiffusionXLPipeline.from_pretrained(export)
    assert isinstance(pipe.scheduler, LCMScheduler)
    ours = text_to_image(gen.fn, xl_pipe, gen.config, PROMPTS[:2], [5, 6], "cpu")
    for i, prompt in enumerate(PROMPTS[:2]):
        for how in ({"timesteps": [999, 749, 499, 249]}, {"num_inference_steps": 4}):
            theirs = pipe(prompt, guidance_scale=0, generator=torch.Generator().manual_seed(5 + i),
                          output_type="pt", **how).images[0]  # fmt: skip
            torch.testing.assert_close(theirs, ours[i], rtol=0, atol=2e-5)
        png = np.asarray(Image.open(samples / index[i]["file"])).astype(np.float64) / 255
        assert np.abs(png - ours[i].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6


def test_sdxl_1step_preset_is_dmd2s_conditioning_timestep_399(xl_pipe, prompts_file, tmp_path):
    from dmdctl.config import resolve
    from dmdctl.settings.distill import DistillConfig
    from dmdctl.teachers import resolve_teacher
    from dmdctl.training.trainer import generator_sigmas

    cfg = resolve(DistillConfig, teacher="sdxl-1step", teacher_path=str(xl_pipe),
                  prompts=str(prompts_file), out=str(tmp_path / "r"), cpu=True)  # fmt: skip
    assert cfg.conditioning_timestep == 399 and cfg.real_guidance == 8.0
    teacher = resolve_teacher("sdxl-1step", xl_pipe)
    assert generator_sigmas(cfg, teacher) == [float(teacher.denoiser.sigmas[399])]
    # a pipeline folder without --teacher brings the SDXL recipe, not SD1.5's
    bare = resolve(DistillConfig, teacher_path=str(xl_pipe), prompts=str(prompts_file),
                   out=str(tmp_path / "b"), cpu=True)  # fmt: skip
    assert bare.real_guidance == 8.0 and bare.denoising_steps == "999,749,499,249"


def test_the_wrong_architecture_is_refused_in_one_line(xl_pipe, sd_pipe, prompts_file, tmp_path):
    for teacher, folder, says in (("sdxl", sd_pipe, "SD1.x/2.x"), ("sd15", xl_pipe, "SDXL")):
        for cmd in ("distill", "make-pairs"):
            out = tmp_path / f"{cmd}-{teacher}"
            one_line_error(
                run(cmd, "--teacher", teacher, "--teacher-path", folder, "--prompts",
                    prompts_file, "--out", out, *(["--cpu"] if cmd == "distill" else [])),
                f"is an {says} pipeline", f"--teacher {teacher} is a recipe for",
            )  # fmt: skip
            assert not out.exists()


def test_sdxl_lora_run_exports_adapters_and_a_merged_pipeline(xl_pipe, prompts_file, tmp_path):
    """--teacher sdxl-lora (DMD2's SDXL LoRA recipe: rank 64, alpha 8, here rank 4): the
    adapters exported with --format lora, loaded by stock StableDiffusionXLPipeline onto the
    teacher, and the merged --format diffusers folder both give `dmdctl sample`'s images."""
    import tomllib
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    from dmdctl.generators import load_generator
    from dmdctl.teachers.sd.generate import text_to_image

    run_dir = tmp_path / "run"
    ok(
        run(
            "distill", "--teacher", "sdxl-lora", "--teacher-path", xl_pipe, "--prompts",
            prompts_file, "--gan-weight", 0, "--lora-rank", 4, "--steps", 2, "--batch-size", 2,
            "--fake-updates", 1, "--plot-samples", 0, "--lr", 1e-2, "--mixed-precision", "no",
            "--cpu", "--out", run_dir,
        )
    )  # fmt: skip
    used = tomllib.loads((run_dir / "config.toml").read_text())
    assert used["lora_rank"] == 4 and used["lora_alpha"] == 8.0
    gen = load_generator(run_dir / "generator.safetensors")
    ours = text_to_image(gen.fn, xl_pipe, gen.config, PROMPTS[:2], [5, 6], "cpu")
    steps = [999, 749, 499, 249]
    ok(run("export", run_dir, "--format", "lora", "-o", tmp_path / "lora"))
    assert "StableDiffusionXLPipeline" in (tmp_path / "lora" / "README.md").read_text()
    with_lora = StableDiffusionXLPipeline.from_pretrained(xl_pipe)
    with_lora.scheduler = LCMScheduler.from_config(with_lora.scheduler.config)
    plain = [
        with_lora(p, timesteps=steps, guidance_scale=0, output_type="pt",
                  generator=torch.Generator().manual_seed(5 + i)).images[0]
        for i, p in enumerate(PROMPTS[:2])
    ]  # fmt: skip
    with_lora.load_lora_weights(tmp_path / "lora")
    ok(run("export", run_dir, "--format", "diffusers", "-o", tmp_path / "full"))
    merged = StableDiffusionXLPipeline.from_pretrained(tmp_path / "full")
    for i, prompt in enumerate(PROMPTS[:2]):
        for pipe in (with_lora, merged):
            theirs = pipe(prompt, timesteps=steps, guidance_scale=0, output_type="pt",
                          generator=torch.Generator().manual_seed(5 + i)).images[0]  # fmt: skip
            torch.testing.assert_close(theirs, ours[i], rtol=0, atol=2e-5)
        assert (plain[i] - ours[i]).abs().max() > 1e-3  # the adapters changed the images


def test_the_real_scores_guidance_is_the_pipelines_cfg(xl_pipe):
    """The guided real score (zeros as the unconditional branch) equals the Euler scheduler's x0
    for the pipeline's CFG-combined prediction with zero negative embeddings."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from dmdctl.teachers import resolve_teacher
    from dmdctl.teachers.sd.denoiser import GuidedDenoiser

    teacher = resolve_teacher("sdxl", xl_pipe)
    enc = teacher.text_encoder()
    real = GuidedDenoiser(teacher.denoiser, 8.0, enc.uncond())
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_pipe)
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS[:2], device="cpu")
    sched = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(10)
    i = 3
    t, sigma = sched.timesteps[i], sched.sigmas[i]
    sched._step_index = i
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * (1 + sigma)
    with torch.no_grad():
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        out = pipe.unet(
            inp,
            t,
            encoder_hidden_states=torch.cat([neg, emb]),
            added_cond_kwargs={
                "text_embeds": torch.cat([neg_pooled, pooled]),
                "time_ids": _time_ids(pipe).repeat(4, 1),
            },
        ).sample
        u, c = out.chunk(2)
        want = sched.step(u + 8.0 * (c - u), t, x).pred_original_sample
        got = real(x, torch.full((2,), float(sigma)), enc(PROMPTS[:2]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
