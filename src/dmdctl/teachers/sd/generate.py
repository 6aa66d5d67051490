"""Text-to-image with a distilled SD generator, and its export as a diffusers pipeline.

``dmdctl sample`` and the exported pipeline compute the same thing: the UNet at the generator's
first timestep (999 by default) on the unscaled noise, the x0 conversion; for a few-step
generator, at each next timestep the x0 estimate renoised with fresh noise (drawn from the same
per-seed RNG, in the same order); then the VAE decoder, ``(x / 2 + 0.5).clamp(0, 1)``. The export
swaps the teacher pipeline's UNet for the distilled one and its scheduler for ``LCMScheduler``,
which run with the generator's timesteps does exactly these steps (its boundary-condition
scalings differ from pure x0 by ~1e-8 at t >= 249). SD3 and FLUX.1 (flow matching) exports run
with ``FlowMatchEulerDiscreteScheduler`` (one step) or ``FlowMatchLCMScheduler`` (a few steps).
A FLUX.1-dev generator takes the guidance value it was trained with as its input: the exported
pipeline is called with that ``guidance_scale`` (and the teacher's resolution as height/width).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dmdctl.errors import UserError
from dmdctl.teachers.sd import pipeline as sdp


def pipeline_folder_for(config: dict, teacher_path: str | None, offline: bool) -> Path:
    """The teacher pipeline a generator came from (its VAE, text encoder, tokenizer)."""
    return sdp.resolve_pipeline_folder(str(teacher_path or config["pipeline"]), offline)


@torch.no_grad()
def text_to_image_batches(
    generator: nn.Module,
    folder: Path,
    config: dict,
    prompts,
    seeds: list[int],
    device,
    batch_size: int = 8,
):
    """Images in [0, 1], ``[n, 3, H, W]`` float32, one batch at a time (memory flat in the
    number of images); prompt i (``prompts[i]``: a list, or a :class:`PromptFile` read by row)
    with noise seed i, each batch's prompts encoded with it."""
    encoder = sdp.load_text_encoder(folder, config).to(device)
    codec = sdp.VAECodec(sdp.load_vae(folder).to(device), config["scaling_factor"], config)
    side = int(config["resolution"]) // int(config["vae_scale"])
    shape = (int(config["latent_channels"]), side, side)
    yield from decoded_batches(generator, encoder, codec, shape, prompts, seeds, device, batch_size)


@torch.no_grad()
def decoded_batches(generator, encoder, codec, shape, prompts, seeds, device, batch_size):
    """What text-to-image and text-to-video sampling share: per batch, sample i from prompt
    ``prompts[i]`` (encoded with ``encoder``) and noise seed i, decoded by ``codec`` and mapped
    from [-1, 1] to [0, 1] as the pipelines' processors do; float32 on the CPU."""
    generator.to(device)
    for i in range(0, len(seeds), batch_size):
        chunk = seeds[i : i + batch_size]
        emb = encoder([prompts[j] for j in range(i, i + len(chunk))], device)
        x0 = generator.sample(chunk, emb, shape, device)
        yield (codec.decode(x0) / 2 + 0.5).clamp(0, 1).cpu()


def text_to_image(generator, folder, config, prompts, seeds, device, batch_size=8) -> torch.Tensor:
    """All images of :func:`text_to_image_batches` at once (for a few images)."""
    return torch.cat(
        list(text_to_image_batches(generator, folder, config, prompts, seeds, device, batch_size))
    )


PIPELINE_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}


# the pipeline component that holds the distilled network (and LoRA adapters)
NETWORK_PARTS = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}
FLOW_ARCHS = ("sd3", "flux")  # flow-matching pipelines: steps are t values
TAGS = {
    "sd": "stable-diffusion",
    "sdxl": "stable-diffusion-xl",
    "sd3": "stable-diffusion-3",
    "flux": "flux",
}


def no_t5_kwargs(config: dict) -> dict:
    """``from_pretrained`` arguments of an SD3 pipeline used without T5 (--no-t5)."""
    if config.get("arch") == "sd3" and not config.get("t5", True):
        return {"text_encoder_3": None, "tokenizer_3": None}
    return {}


def no_t5_text(config: dict) -> str:
    """:func:`no_t5_kwargs` as a model card's ``from_pretrained`` call spells them."""
    return "".join(f" {k}=None," for k in no_t5_kwargs(config))


def guidance_text(config: dict | None) -> str:
    """The ``guidance_scale`` an exported pipeline is called with: 0 (guidance was distilled),
    or a FLUX.1-dev generator's own guidance input (FLUX also gets the teacher's size, since
    FluxPipeline's default size is not read from the folder)."""
    config = config or {}
    if config.get("arch") != "flux":
        return "guidance_scale=0"
    side = int(config["resolution"])
    size = f"height={side}, width={side}"
    if config.get("guidance_embeds"):
        return f"guidance_scale={float(config['guidance']):g}, {size}"
    return size


def usage_call(steps: list, arch: str = "sd", config: dict | None = None) -> str:
    """How to run an exported pipeline with the generator's own steps (SD/SDXL: timesteps;
    SD3/FLUX: t values, given as the scheduler's sigmas, or one step, FlowMatchEuler's
    default); ``config`` is the teacher config the generator file keeps."""
    guidance = guidance_text(dict(config or {}, arch=arch))
    if arch in FLOW_ARCHS:
        if list(steps) == [1.0]:
            return f"num_inference_steps=1, {guidance}"
        return f"sigmas={list(steps)}, {guidance}"
    return f"timesteps={list(steps)}, {guidance}"


def guidance_note(config: dict | None) -> str:
    """The model card's sentence on ``guidance_scale``."""
    config = config or {}
    if config.get("arch") == "flux" and config.get("guidance_embeds"):
        return (
            f"Use `guidance_scale={float(config['guidance']):g}`: FLUX.1-dev takes the guidance "
            "value as an input of its transformer, and the generator (with the real and fake "
            "scores) was trained with this value there"
        )
    if config.get("arch") == "flux":
        return "This transformer has no guidance input; the real score used CFG during training"
    return (
        "Use `guidance_scale=0`: guidance was distilled into the generator (the real score used "
        "CFG during training)"
    )


def step_scheduler_name(arch: str, steps: list) -> str:
    """The diffusers scheduler that runs a generator's steps in the stock pipeline.

    SD/SDXL: ``LCMScheduler`` (x0 at each timestep, renoised to the next). SD3 and FLUX, one step
    at t = 1: the pipeline's own ``FlowMatchEulerDiscreteScheduler`` (one Euler step from t = 1
    to 0 is x_1 - v; a resolution-dependent shift leaves t = 1 at 1); a few steps:
    ``FlowMatchLCMScheduler`` (without a shift: see below).
    """
    if arch not in FLOW_ARCHS:
        return "LCMScheduler"
    return "FlowMatchEulerDiscreteScheduler" if list(steps) == [1.0] else "FlowMatchLCMScheduler"


def step_scheduler(arch: str, steps: list, scheduler_config: dict):
    """(scheduler, its name): :func:`step_scheduler_name`'s, made from the teacher's config."""
    import diffusers

    sched = dict(scheduler_config)
    name = step_scheduler_name(arch, steps)
    if arch in FLOW_ARCHS:
        if name == "FlowMatchLCMScheduler":
            # the sigmas the call passes are the generator's t exactly: no shift, fixed or
            # resolution-dependent (FluxPipeline still passes mu; unused without dynamic shifting)
            sched["shift"] = 1.0
            sched["use_dynamic_shifting"] = False
        return getattr(diffusers, name).from_config(sched), name
    k = len(steps)
    n_train = int(sched.get("num_train_timesteps", 1000))
    if list(steps) == [(n_train // k) * i - 1 for i in range(k, 0, -1)]:
        # LCM's own schedule for k steps is exactly these (999/749/499/249 for k=4): then
        # num_inference_steps=k alone runs them
        sched["original_inference_steps"] = k
    return diffusers.LCMScheduler.from_config(sched), "LCMScheduler"


def describe_steps(arch: str, steps: list, scheduler: str) -> str:
    """The model card's sentence on what the scheduler does with the generator's steps."""
    if arch in FLOW_ARCHS:
        if list(steps) == [1.0]:
            return (
                f"at t = 1 (pure noise); the scheduler in this folder is `{scheduler}`, whose "
                "one step from t = 1 to 0 is x_1 - v: exactly the generator"
            )
        return (
            f"at times t = {list(steps)}; the scheduler in this folder is `{scheduler}`: the "
            "transformer's velocity v gives x0 = x_t - t v, renoised to the next time. "
            f"{PIPELINE_CLASSES[arch]} does not pass `generator` to the scheduler, so that "
            "renoising noise comes from torch's global RNG (seed it with `torch.manual_seed` "
            "for repeatable images); `dmdctl sample` draws it from each seed's own generator, so "
            "the two give different images for the same seed, from the same distribution"
        )
    return (
        f"at timesteps {list(steps)}; the scheduler in this folder is `{scheduler}`, which at "
        "each of these timesteps takes the UNet's x0 prediction and renoises it to the next one"
    )


def teacher_named(pipeline: str, train_config: dict | None) -> str:
    """The teacher a run really used, for a model card: its pipeline as the generator file's
    teacher config records it (a hub id, or a local folder's resolved path) and, when the run
    named a preset (``--teacher sdxl``), that preset."""
    from dmdctl.teachers.sd.kind import StableDiffusion

    preset = (train_config or {}).get("teacher")
    named = f"`{pipeline}`"
    if preset and preset != StableDiffusion.name and preset in StableDiffusion().presets():
        named += f" (dmdctl preset `{preset}`)"
    return named


def model_card(
    source: str,
    teacher_sha256: str,
    train_config: dict | None,
    out: Path,
    steps: list,
    arch: str = "sd",
    scheduler: str = "LCMScheduler",
    load_kwargs: str = "",
    config: dict | None = None,
) -> str:
    cls = PIPELINE_CLASSES[arch]
    cfg = json.dumps(train_config or {}, indent=2, sort_keys=True)
    k = len(steps)
    what = "one network evaluation" if k == 1 else f"{k} network evaluations"
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [{TAGS[arch]}, distillation, dmd, {"one-step" if k == 1 else "few-step"}]
---

# {"One" if k == 1 else str(k)}-step text-to-image generator distilled with dmdctl (DMD)

Distilled from {teacher_named(source, train_config)} (pipeline identity sha256
`{teacher_sha256}`) with Distribution Matching Distillation (Yin et al., CVPR 2024; DMD2,
NeurIPS 2024). The network maps pure noise to an image in **{what}**,
{describe_steps(arch, steps, scheduler)}.

## Usage

```python
import torch
from diffusers import {cls}

pipe = {cls}.from_pretrained("{out}",{load_kwargs} torch_dtype=torch.float16).to("cuda")
image = pipe("a photo of a cat", {usage_call(steps, arch, config)}).images[0]
```

{guidance_note(config)}. `dmdctl sample --generator ...` gives the same images for the same
seeds (`generator=torch.Generator().manual_seed(seed)`, one prompt per call).

## Training configuration

```json
{cfg}
```
"""


def export_diffusers(
    denoiser: nn.Module,
    config: dict,
    teacher_sha256: str,
    out: Path,
    teacher_path: str | None = None,
    offline: bool = False,
    train_config: dict | None = None,
    timesteps: list | None = None,
) -> Path:
    """A folder that stock diffusers loads: the teacher's parts, the distilled network (UNet or
    transformer) and a scheduler that runs its steps (:func:`step_scheduler`)."""
    import diffusers

    folder = pipeline_folder_for(config, teacher_path, offline)
    out = check_export(folder, sdp.pipeline_identity(folder), teacher_sha256, out)
    arch = config.get("arch", "sd")
    cls = getattr(diffusers, PIPELINE_CLASSES[arch])
    pipe = load_pipeline(cls, folder, **no_t5_kwargs(config))
    if timesteps is None:
        timesteps = denoiser.step_values([denoiser.sigma_max])
    timesteps = list(timesteps)
    scheduler, scheduler_name = step_scheduler(arch, timesteps, pipe.scheduler.config)
    pipe.register_modules(**{NETWORK_PARTS[arch]: denoiser.network, "scheduler": scheduler})
    card = model_card(
        str(config["pipeline"]),
        teacher_sha256,
        train_config,
        out,
        timesteps,
        arch,
        scheduler_name,
        no_t5_text(config),
        config,
    )
    return save_pipeline_folder(pipe, card, out)


def check_export(folder: Path, folder_sha256: str, teacher_sha256: str, out) -> Path:
    """What ``export --format diffusers`` checks before it loads anything: the pipeline folder
    (sha256 ``folder_sha256``) is the generator's teacher, and ``out`` is new or an empty
    folder."""
    if folder_sha256 != teacher_sha256:
        raise UserError(
            f"{folder} is not the pipeline this generator was distilled from (its sha256 "
            "differs); pass --teacher-path with the teacher's pipeline"
        )
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose another --out")
    return out


def load_pipeline(cls, folder: Path, **kwargs):
    """The teacher's whole pipeline (diffusers class ``cls``) from safetensors, offline; one
    line when diffusers cannot load it."""
    sdp.quiet_loaders()
    try:
        return cls.from_pretrained(folder, use_safetensors=True, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the pipeline {folder}: {str(e).splitlines()[0]}") from None


def save_pipeline_folder(pipe, card: str, out: Path) -> Path:
    """``pipe`` (safetensors) and its model card ``card`` as README.md, written into
    ``out.tmp`` and renamed to ``out`` when complete: an interrupted export leaves no
    half-written ``out``."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "README.md").write_text(card)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def lcm_overrides(scheduler: str, arch: str) -> str:
    """What the LoRA model card's ``from_config`` call overrides (:func:`step_scheduler`)."""
    if scheduler != "FlowMatchLCMScheduler":
        return ""
    return ", shift=1.0" + (", use_dynamic_shifting=False" if arch == "flux" else "")


def lora_model_card(
    pipeline: str, teacher_sha256: str, train_config: dict | None, out, timesteps, spec, config
) -> str:
    """The README.md of ``export --format lora`` (``spec``: the run's ``training.lora.LoraSpec``)."""
    arch = config.get("arch", "sd")
    cls = PIPELINE_CLASSES[arch]
    scheduler = step_scheduler_name(arch, timesteps)
    net = "transformer" if arch in FLOW_ARCHS else "UNet"
    cfg = json.dumps(train_config or {}, indent=2, sort_keys=True)
    k = len(timesteps)
    return f"""---
library_name: diffusers
base_model: {pipeline}
tags: [lora, {TAGS[arch]}, distillation, dmd, {"one-step" if k == 1 else "few-step"}]
---

# LoRA for a {"one" if k == 1 else str(k)}-step generator distilled with dmdctl (DMD)

LoRA adapters (rank {spec.rank}, alpha {spec.alpha:g}) on the {net} of
{teacher_named(pipeline, train_config)} (pipeline identity sha256 `{teacher_sha256}`), trained
with Distribution Matching Distillation (Yin et al., CVPR 2024; DMD2, NeurIPS 2024). With them
the {net} maps pure noise to an image {describe_steps(arch, timesteps, scheduler)}.

## Usage

```python
import torch
from diffusers import {scheduler}, {cls}

pipe = {cls}.from_pretrained("{pipeline}",{no_t5_text(config)} torch_dtype=torch.float16).to("cuda")
pipe.scheduler = {scheduler}.from_config(pipe.scheduler.config{lcm_overrides(scheduler, arch)})
pipe.load_lora_weights("{out}")
image = pipe("a photo of a cat", {usage_call(list(timesteps), arch, config)}).images[0]
```

{guidance_note(config)}. `dmdctl sample` with this run's generator file gives the same images
for the same seeds (`generator=torch.Generator().manual_seed(seed)`, one prompt per call).

Target modules: {", ".join(spec.targets)}.

## Training configuration

```json
{cfg}
```
"""


def write_diffusers_lora(
    adapters: dict[str, torch.Tensor], spec, out: Path, card: str, arch: str = "sd"
) -> None:
    """``out/pytorch_lora_weights.safetensors`` (diffusers' own writer for the teacher's pipeline
    class, with the LoRA config (``spec``: a ``training.lora.LoraSpec``) as its metadata so
    ``load_lora_weights`` applies alpha/rank) and a README.md."""
    import inspect

    import diffusers

    pipeline_cls = getattr(diffusers, PIPELINE_CLASSES[arch])
    part = NETWORK_PARTS[arch]  # what the adapters are on
    if (
        f"{part}_lora_adapter_metadata"
        not in inspect.signature(pipeline_cls.save_lora_weights).parameters
    ):  # without it the file would not carry alpha (diffusers would assume = rank)
        raise UserError(
            "--format lora needs a newer diffusers (save_lora_weights with "
            "unet_lora_adapter_metadata): pip install -U diffusers"
        )
    meta = spec.peft_config().to_dict()
    pipeline_cls.save_lora_weights(
        str(out),
        **{f"{part}_lora_layers": adapters, f"{part}_lora_adapter_metadata": meta},
        safe_serialization=True,
    )
    (out / "README.md").write_text(card)
