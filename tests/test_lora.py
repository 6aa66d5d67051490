"""LoRA generators and fake scores (--lora-rank, --fake-lora-rank; training/lora.py) on the tiny
Stable Diffusion pipeline: what trains, what checkpoints hold, exact resume, and the adapters
exported for stock diffusers' ``load_lora_weights``."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import SD_PROMPTS as PROMPTS
from cli_helpers import captioned_images, ok, one_line_error, real_store, run

RANK, ALPHA, FAKE_RANK = 4, 8.0, 2


@pytest.fixture(autouse=True)
def offline(hf_offline):
    """Every test here runs with HF_HUB_OFFLINE=1."""


def _real_images(folder, pipe):
    return real_store(captioned_images(folder, (16, 16)), pipe)


def _is_adapter(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def test_lora_run_trains_adapters_only_resumes_exactly_and_exports(sd_pipe, prompts_file, tmp_path):
    """A LoRA run (rank 4, alpha 8, LoRA fake score, GAN, 2 steps) through the CLI: checkpoints
    hold adapters only; a crash and --resume gives the uninterrupted run's checkpoint bitwise;
    the generator file's untargeted weights are the teacher's; `export --format lora` loaded by
    stock diffusers onto the teacher, and `export --format diffusers`, reproduce `dmdctl sample`."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    import dmdctl.training.loop as dd
    from dmdctl.generators import load_generator
    from dmdctl.teachers import resolve_teacher
    from dmdctl.teachers.sd.generate import text_to_image

    real = _real_images(tmp_path / "real", sd_pipe)

    def args(out):
        return ("distill", "--teacher", "sd15", "--teacher-path", sd_pipe, "--prompts",
                prompts_file, "--real-data", real, "--gan-weight", 1e-2, "--denoising-steps",
                "999,499", "--batch-size", 2, "--fake-updates", 1, "--plot-samples", 0,
                "--mixed-precision", "no", "--ema-decay", 0.9, "--lr", 1e-2, "--fake-lr", 1e-2,
                "--lora-rank", RANK, "--lora-alpha", ALPHA, "--fake-lora-rank", FAKE_RANK,
                "--steps", 4, "--checkpoint-every", 2, "--cpu", "--out", out)  # fmt: skip

    ok(run(*args(tmp_path / "whole")))
    real_step = dd.DMDTrainer.train_step

    def crash(self):
        if self.step == 3:
            raise RuntimeError("simulated crash")
        return real_step(self)

    dd.DMDTrainer.train_step = crash
    try:
        assert isinstance(run(*args(tmp_path / "cut")).exception, RuntimeError)
    finally:
        dd.DMDTrainer.train_step = real_step
    # the adapters' shape is fixed for a run: another rank on resume is refused
    r = run(*args(tmp_path / "cut"), "--resume", "latest", "--lora-rank", 8)
    one_line_error(r, "lora_rank 4 there, 8 now")
    ok(run(*args(tmp_path / "cut"), "--resume", "latest"))

    whole = tmp_path / "whole" / "checkpoints" / "step-0000004"
    cut = tmp_path / "cut" / "checkpoints" / "step-0000004"
    state = json.loads((whole / "state.json").read_text())
    assert state["lora"]["generator"] == {
        "rank": RANK,
        "alpha": ALPHA,
        "targets": state["config"]["lora_targets"].split(","),
    }
    teacher = resolve_teacher("sd15", sd_pipe).denoiser
    n_teacher = len(teacher.state_dict())
    for name in ("generator", "fake", "ema", "gan_head", "optim_generator", "optim_fake"):
        a = load_file(str(whole / f"{name}.safetensors"))
        b = load_file(str(cut / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        if name in ("generator", "fake", "ema"):  # adapters only, no UNet
            assert a and all(_is_adapter(k) for k in a), name
    gen_ckpt = load_file(str(whole / "generator.safetensors"))
    fake_ckpt = load_file(str(whole / "fake.safetensors"))
    assert len(gen_ckpt) < n_teacher
    assert {v.shape[0] for k, v in gen_ckpt.items() if ".lora_A." in k} == {RANK}
    assert {v.shape[0] for k, v in fake_ckpt.items() if ".lora_A." in k} == {FAKE_RANK}
    # AdamW's state (moments, step) of each adapter, nothing of the base
    opt = load_file(str(whole / "optim_generator.safetensors"))
    assert len({k.split(".")[0] for k in opt}) == len(gen_ckpt)
    a = load_file(str(tmp_path / "whole" / "generator.safetensors"))
    b = load_file(str(tmp_path / "cut" / "generator.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the generator file: the merged UNet (untargeted weights the teacher's, bitwise) + adapters
    full = {k: v for k, v in a.items() if not k.startswith("lora_adapter.")}
    ref = teacher.state_dict()
    assert full.keys() == ref.keys()
    assert any(k.startswith("lora_adapter.") for k in a)
    untouched = [k for k in ref if "norm" in k or "conv_in" in k or "conv_out" in k]
    assert untouched and all(torch.equal(full[k], ref[k]) for k in untouched)
    assert not torch.equal(full["unet.mid_block.resnets.0.conv1.weight"],
                           ref["unet.mid_block.resnets.0.conv1.weight"])  # fmt: skip
    # exported from the last checkpoint (its EMA adapters on the teacher's weights): the same file
    ok(run("export", tmp_path / "whole" / "checkpoints" / "step-0000004", "-o", tmp_path / "g.st"))
    c = load_file(str(tmp_path / "g.st"))
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)

    lora_dir, full_dir = tmp_path / "lora", tmp_path / "full"
    r = ok(run("export", tmp_path / "whole", "--format", "lora", "-o", lora_dir))
    assert "rank 4, alpha 8" in r.output
    assert sorted(p.name for p in lora_dir.iterdir()) == [
        "README.md",
        "pytorch_lora_weights.safetensors",
    ]
    card = (lora_dir / "README.md").read_text()
    assert "timesteps=[999, 499]" in card and "load_lora_weights" in card
    assert "LCMScheduler" in card
    ok(run("export", tmp_path / "whole", "--format", "diffusers", "-o", full_dir))
    # the last checkpoint's EMA adapters export to the same file as the generator file's
    ok(run("export", whole, "--format", "lora", "-o", tmp_path / "lora-ckpt"))
    x = load_file(str(lora_dir / "pytorch_lora_weights.safetensors"))
    y = load_file(str(tmp_path / "lora-ckpt" / "pytorch_lora_weights.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    gen = load_generator(tmp_path / "whole" / "generator.safetensors")
    seeds = [5, 6]
    ours = text_to_image(gen.fn, sd_pipe, gen.config, PROMPTS[:2], seeds, "cpu")
    stock = StableDiffusionPipeline.from_pretrained(sd_pipe)
    stock.scheduler = LCMScheduler.from_config(stock.scheduler.config)
    stock.load_lora_weights(lora_dir)
    merged = StableDiffusionPipeline.from_pretrained(full_dir)
    worst = {}
    for name, pipe in (("lora", stock), ("diffusers", merged)):
        for i, prompt in enumerate(PROMPTS[:2]):
            theirs = pipe(prompt, timesteps=[999, 499], guidance_scale=0, output_type="pt",
                          generator=torch.Generator().manual_seed(seeds[i])).images[0]  # fmt: skip
            worst[name] = max(worst.get(name, 0.0), (theirs - ours[i]).abs().max().item())
            torch.testing.assert_close(theirs, ours[i], rtol=0, atol=2e-5)
    print("largest image difference against dmdctl sample:", worst)
    # and the adapters matter: the teacher alone gives other images
    stock.unload_lora_weights()
    bare = stock(PROMPTS[0], timesteps=[999, 499], guidance_scale=0, output_type="pt",
                 generator=torch.Generator().manual_seed(seeds[0])).images[0]  # fmt: skip
    assert (bare - ours[0]).abs().max() > 1e-3


def test_lora_wiring(sd_trainer, tmp_path):
    """The optimisers hold exactly the adapters (and the GAN head); the adapters are scaled by
    alpha / rank; a step moves the adapters and leaves every base weight the teacher's."""
    from peft.tuners.lora import LoraLayer

    tr = sd_trainer(tmp_path / "r", lora_rank=RANK, lora_alpha=ALPHA, fake_lora_rank=FAKE_RANK,
                    mixed_precision="no", ema_decay=0.5, lr=1e-2, fake_lr=1e-2, warmup=0)  # fmt: skip
    g = tr.unwrapped_generator.denoiser
    fake = tr.acc.unwrap_model(tr.fake)
    adapters = {n: p for n, p in g.named_parameters() if ".lora_" in n}
    in_opt = {id(p) for group in tr.opt_g.param_groups for p in group["params"]}
    assert adapters and in_opt == {id(p) for p in adapters.values()}
    fake_adapters = [p for n, p in fake.named_parameters() if ".lora_" in n]
    in_opt_f = {id(p) for group in tr.opt_f.param_groups for p in group["params"]}
    assert in_opt_f == {id(p) for p in fake_adapters}  # no GAN here: adapters only
    assert all(not p.requires_grad for n, p in g.named_parameters() if n not in adapters)

    # the scale alpha / rank, in the forward pass: base(x) + (alpha / r) B A x
    layer = g.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q
    assert isinstance(layer, LoraLayer)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        x = torch.randn(3, layer.in_features)
        base = layer.base_layer(x)
        delta = x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T
        torch.testing.assert_close(layer(x), base + ALPHA / RANK * delta)
        layer.lora_B["default"].weight.zero_()
    fake_layer = fake.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q
    assert fake_layer.scaling["default"] == ALPHA / FAKE_RANK

    before = {k: v.clone() for k, v in g.state_dict().items()}
    teacher = tr.teacher.denoiser.state_dict()
    for _ in range(2):
        tr.train_step()
    after = g.state_dict()
    for k, v in after.items():
        if _is_adapter(k):
            continue
        assert torch.equal(v, before[k]), k
        plain = k.replace(".base_layer.", ".")
        assert torch.equal(v, teacher[plain]), k  # the teacher's own weights, bitwise
    assert any(not torch.equal(after[k], before[k]) for k in after if ".lora_A." in k)
    assert any(not torch.equal(after[k], before[k]) for k in after if ".lora_B." in k)
    # the EMA averages the adapters only
    assert tr.ema.shadow.keys() == set(adapters)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (("--lora-rank", 0), "--lora-rank must be positive, got 0"),
        (("--fake-lora-rank", -1), "--fake-lora-rank must be positive, got -1"),
        (("--lora-alpha", 4), "--lora-alpha scales LoRA adapters"),
        (("--lora-rank", 4, "--lora-targets", "nothing_here"), "--lora-targets"),
    ],
)
def test_lora_setting_errors(sd_pipe, prompts_file, tmp_path, extra, fragment):
    out = tmp_path / "run"
    r = run("distill", "--teacher-path", sd_pipe, "--prompts", prompts_file, "--steps", 1,
            "--batch-size", 2, "--plot-samples", 0, "--cpu", "--out", out, *extra)  # fmt: skip
    one_line_error(r, fragment)
    assert not out.exists()


def test_lora_export_of_a_full_run_is_refused(sd_pipe, prompts_file, tmp_path):
    run_dir = tmp_path / "run"
    ok(run("distill", "--teacher-path", sd_pipe, "--prompts", prompts_file, "--steps", 1,
           "--batch-size", 2, "--plot-samples", 0, "--mixed-precision", "no", "--cpu",
           "--out", run_dir))  # fmt: skip
    for source in (run_dir, run_dir / "checkpoints" / "step-0000001"):
        out = tmp_path / "lora"
        one_line_error(run("export", source, "--format", "lora", "-o", out), "no LoRA adapters")
        assert not out.exists()


def test_bf16_lora_file_merges_into_the_teachers_own_weights(sd_pipe, prompts_file, tmp_path):
    """Under bf16 the adapters train over a bf16 copy of the base; the generator file merges them
    into the teacher's fp32 weights, so `dmdctl sample` equals the teacher with the exported
    LoRA loaded (stock diffusers), as a checkpoint's export does."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from dmdctl.generators import load_generator
    from dmdctl.teachers.sd.generate import text_to_image

    run_dir = tmp_path / "run"
    ok(
        run(
            "distill", "--teacher", "sd15", "--teacher-path", sd_pipe, "--prompts", prompts_file,
            "--batch-size", 2, "--fake-updates", 1, "--plot-samples", 0, "--steps", 2,
            "--mixed-precision", "bf16", "--lr", 1e-2, "--lora-rank", RANK, "--cpu",
            "--out", run_dir,
        )
    )  # fmt: skip
    gen = load_generator(run_dir / "generator.safetensors")
    ours = text_to_image(gen.fn, sd_pipe, gen.config, PROMPTS[:2], [3, 4], "cpu")
    ok(run("export", run_dir, "--format", "lora", "-o", tmp_path / "lora"))
    pipe = StableDiffusionPipeline.from_pretrained(sd_pipe)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(tmp_path / "lora")
    for i, prompt in enumerate(PROMPTS[:2]):
        theirs = pipe(prompt, timesteps=[999], guidance_scale=0, output_type="pt",
                      generator=torch.Generator().manual_seed(3 + i)).images[0]  # fmt: skip
        torch.testing.assert_close(theirs, ours[i], rtol=0, atol=2e-5)
