"""Stable Diffusion pipelines in diffusers format: loading, prompts, the VAE and the pair sampler.

A teacher is a pipeline folder (``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``; SDXL adds ``text_encoder_2/`` and ``tokenizer_2/``) given as a
local path or a Hugging Face hub id. Four architectures are told apart by the folder: SD1.x/2.x
(``arch = "sd"``), SDXL (``"sdxl"``: a UNet with a ``text_time`` added embedding), SD3/SD3.5
(``"sd3"``: a flow-matching ``transformer/``, two CLIP encoders with projections and an optional
T5 encoder in ``text_encoder_3/``) and FLUX.1 (``"flux"``: a ``FluxTransformer2DModel``, CLIP's
pooled embedding and T5's tokens; ``teachers/sd/flux.py``). Only safetensors weights are read. Offline (``--offline`` or
``HF_HUB_OFFLINE=1``) nothing touches the network: a hub id must already be in the local cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from dmdctl.errors import UserError
from dmdctl.files import sha256_file
from dmdctl.teachers.sd.denoiser import (
    SD3Denoiser,
    SDDenoiser,
    SDXLDenoiser,
    alphas_cumprod,
    pack_sdxl_condition,
)

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
SD3_HUB_ID = "stabilityai/stable-diffusion-3-medium-diffusers"
SD3_MAX_SEQUENCE_LENGTH = 256  # T5 tokens: StableDiffusion3Pipeline's default
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED = ("unet", "vae", "text_encoder")
ARCH_NAMES = {"sd": "SD1.x/2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX.1"}


def a_pipeline(arch: str) -> str:
    """An architecture's pipeline with its article, for messages ("an SD3 pipeline")."""
    name = ARCH_NAMES[arch]
    return f"{'a' if name.startswith('FLUX') else 'an'} {name} pipeline"


# the diffusers class of each architecture's transformer (the UNet architectures have none)
TRANSFORMERS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
# files a pipeline needs (weights as safetensors only), for hub downloads
ALLOW_PATTERNS = ["model_index.json", "*/config.json", "*/*.safetensors", "*/*.json", "*/*.txt"]
IGNORE_PATTERNS = ["*.ckpt", "*.bin", "*.pt", "*.pth", "*.msgpack", "*.onnx", "*fp16*", "*non_ema*"]
IGNORE_PATTERNS += ["vae_1_0/*", "vae_decoder/*", "vae_encoder/*"]  # SDXL base's extra VAEs
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def quiet_loaders() -> None:
    """diffusers/transformers print a progress bar per component load: dmdctl shows its own."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def offline_mode(flag: bool = False) -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return flag or env in ("1", "true", "yes", "on")


def is_pipeline_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(str(name))) and not Path(name).exists()


def resolve_pipeline_folder(name: str, offline: bool = False) -> Path:
    """A local pipeline folder for a path or hub id (downloading only when online)."""
    p = Path(name).expanduser()
    if p.exists():
        if not is_pipeline_folder(p):
            raise UserError(
                f"{p} is not a diffusers pipeline folder (no model_index.json); pass the folder "
                "that holds model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/"
            )
        return p
    if not looks_like_hub_id(name):
        raise UserError(f"teacher pipeline not found: {name} (not a folder, not a hub id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = offline_mode(offline)
    try:
        folder = snapshot_download(
            name,
            allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
            local_files_only=offline,
        )
    except LocalEntryNotFoundError:
        how = (
            "offline mode (--offline / HF_HUB_OFFLINE=1) reads only the local cache"
            if offline
            else "it is not in the local cache and the hub could not be reached"
        )
        raise UserError(
            f"{name} is not available: {how}. Download it on a machine with internet "
            f"(`hf download {name}`) into the same HF_HOME, or pass --teacher-path DIR"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise UserError(f"could not fetch {name} from the hub: {str(e).splitlines()[0]}") from None
    folder = Path(folder)
    if not is_pipeline_folder(folder):
        raise UserError(f"{name} is not a diffusers pipeline (no model_index.json)")
    return folder


def _weights_file(folder: Path, component: str) -> Path:
    files = sorted((folder / component).glob("*.safetensors"))
    files = [f for f in files if "fp16" not in f.name and "non_ema" not in f.name]
    if not files:
        present = sorted(p.name for p in (folder / component).glob("*")) or ["nothing"]
        raise UserError(
            f"{folder / component} has no .safetensors weights ({', '.join(present)}); "
            "dmdctl reads safetensors only (convert .bin/.ckpt files with diffusers first)"
        )
    return files[0]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the pipeline folder is incomplete") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e})") from None


def pipeline_arch(folder: Path) -> str:
    """The architecture: "sd3" or "flux" for a flow-matching transformer pipeline (by the
    transformer's class), "sdxl" for a UNet with SDXL's added text-time embedding, else "sd"."""
    folder = Path(folder)
    if (folder / "transformer" / "config.json").is_file():
        cls = _read_json(folder / "transformer" / "config.json").get("_class_name", "")
        if cls not in TRANSFORMERS:
            raise UserError(
                f"{folder} holds a {cls or 'transformer'} pipeline; dmdctl distils SD1.x/2.x, "
                "SDXL, SD3 and FLUX.1 pipelines"
            )
        return TRANSFORMERS[cls]
    unet = _read_json(folder / "unet" / "config.json")
    return "sdxl" if unet.get("addition_embed_type") == "text_time" else "sd"


def weighted_components(folder: Path) -> tuple[str, ...]:
    arch = pipeline_arch(folder)
    if arch == "sd3":
        t5 = ("text_encoder_3",) if has_t5(folder) else ()
        return ("transformer", "vae", "text_encoder", "text_encoder_2", *t5)
    if arch == "flux":
        return ("transformer", "vae", "text_encoder", "text_encoder_2")
    return WEIGHTED + (("text_encoder_2",) if arch == "sdxl" else ())


def has_t5(folder: Path) -> bool:
    """SD3's T5 encoder is optional (diffusers then gives zeros for its tokens)."""
    return (Path(folder) / "text_encoder_3" / "config.json").is_file()


def pipeline_identity(folder: Path) -> str:
    """sha256 over the component configs and weight files (what a teacher "is")."""
    comps = weighted_components(folder)
    files = [_weights_file(folder, c) for c in comps]
    stamp = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _identity(Path(folder).resolve(), comps, stamp)


@functools.lru_cache(maxsize=8)
def _identity(folder: Path, comps: tuple, stamp: tuple) -> str:
    # hashing SD1.5's 4 GB takes seconds: once per process per unchanged set of files
    h = hashlib.sha256()
    for comp in comps:
        h.update(comp.encode())
        h.update(json.dumps(_read_json(folder / comp / "config.json"), sort_keys=True).encode())
        h.update(sha256_file(_weights_file(folder, comp)).encode())
    h.update(json.dumps(scheduler_config(folder), sort_keys=True).encode())
    return h.hexdigest()


def scheduler_config(folder: Path) -> dict:
    return _read_json(folder / "scheduler" / "scheduler_config.json")


def load_component(cls, folder: Path, sub: str, dtype: torch.dtype = torch.float32):
    """A diffusers model of a pipeline folder (its subfolder ``sub``) from safetensors only, in
    ``dtype``; a folder without its weights, or that diffusers cannot load, refused in one line."""
    quiet_loaders()
    _weights_file(folder, sub)
    try:
        return cls.from_pretrained(
            folder, subfolder=sub, use_safetensors=True, local_files_only=True, torch_dtype=dtype
        )
    except (OSError, ValueError) as e:
        raise UserError(f"could not load {folder / sub}: {str(e).splitlines()[0]}") from None


def load_unet(folder: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The pipeline's denoising network: its UNet, or SD3's or FLUX's transformer."""
    quiet_loaders()
    import diffusers

    sub, cls = ("unet", diffusers.UNet2DConditionModel)
    arch = pipeline_arch(folder)
    if arch in ("sd3", "flux"):
        name = next(k for k, v in TRANSFORMERS.items() if v == arch)
        sub, cls = ("transformer", getattr(diffusers, name))
    return load_component(cls, folder, sub, dtype)


def load_vae(folder: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    quiet_loaders()
    from diffusers import AutoencoderKL

    return load_component(AutoencoderKL, folder, "vae", dtype).eval().requires_grad_(False)


def _load_text_model(folder: Path, tokenizer: str, encoder: str, with_projection: bool, t5=False):
    """A tokenizer and a frozen text encoder of the pipeline: CLIP (with or without its
    projection) or, ``t5``, SD3's or FLUX's T5 encoder."""
    quiet_loaders()
    from transformers import (
        AutoTokenizer,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
    )

    _weights_file(folder, encoder)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    cls, tok_cls = (T5EncoderModel, AutoTokenizer) if t5 else (cls, CLIPTokenizer)
    try:
        tok = tok_cls.from_pretrained(folder, subfolder=tokenizer, local_files_only=True)
        enc = cls.from_pretrained(
            folder, subfolder=encoder, use_safetensors=True, local_files_only=True
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load the text encoder {folder / encoder}: {str(e).splitlines()[0]}"
        ) from None
    return tok, enc.eval().requires_grad_(False)


def _tokens(tokenizer, prompts: list[str], device, max_length: int | None = None) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


class PromptEncoder:
    """Prompts -> the condition tensor the teacher's denoiser takes, as diffusers' pipeline
    encodes them: SD, the text encoder's last hidden state; SDXL, both encoders' penultimate
    hidden states concatenated and the second one's pooled (projected) embedding; SD3, the two
    CLIP encoders' penultimate hidden states concatenated and zero-padded to T5's width, then T5's
    tokens after them, and both CLIP pooled embeddings concatenated; FLUX.1, T5's tokens and CLIP's
    pooled output (``FluxPipeline.encode_prompt``). The pooled embedding is packed as
    :func:`~dmdctl.teachers.sd.denoiser.pack_sdxl_condition` describes."""

    def __init__(self, folder: Path, arch: str, config: dict | None = None):
        self.arch = arch
        self.config = config or {}
        self.t5 = None  # SD3's or FLUX's (tokenizer, encoder), when it is used
        if arch == "flux":  # CLIP without projection (its pooled output), then T5
            self.parts = [_load_text_model(folder, "tokenizer", "text_encoder", False)]
            self.t5 = _load_text_model(folder, "tokenizer_2", "text_encoder_2", False, t5=True)
            return
        if arch == "sd3":
            self.parts = [
                _load_text_model(folder, "tokenizer", "text_encoder", True),
                _load_text_model(folder, "tokenizer_2", "text_encoder_2", True),
            ]
            if self.config.get("t5", has_t5(folder)):
                self.t5 = _load_text_model(folder, "tokenizer_3", "text_encoder_3", False, t5=True)
            return
        self.parts = [_load_text_model(folder, "tokenizer", "text_encoder", False)]
        if arch == "sdxl":
            self.parts.append(_load_text_model(folder, "tokenizer_2", "text_encoder_2", True))

    def to(self, device, dtype: torch.dtype | None = None) -> PromptEncoder:
        """Move the encoders (in ``dtype``: a training run keeps them in its compute dtype)."""
        for _, enc in self.parts + ([self.t5] if self.t5 else []):
            enc.to(device, dtype)
        return self

    @torch.no_grad()
    def __call__(self, prompts: list[str], device="cpu", batch_size: int = 64) -> torch.Tensor:
        """Conditions for ``prompts``, float32 on ``device`` (the encoders move there)."""
        out = []
        for _, enc in self.parts + ([self.t5] if self.t5 else []):
            enc.to(device)
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            if self.arch == "sd3":
                out.append(self._sd3(chunk, device))
                continue
            if self.arch == "flux":
                out.append(self._flux(chunk, device))
                continue
            if self.arch == "sd":
                tok, enc = self.parts[0]
                out.append(enc(_tokens(tok, chunk, device))[0].float())
                continue
            hidden, pooled = [], None
            for tok, enc in self.parts:
                res = enc(_tokens(tok, chunk, device), output_hidden_states=True)
                hidden.append(res.hidden_states[-2].float())
                pooled = res[0].float()  # the last encoder's projected pooled output
            out.append(pack_sdxl_condition(torch.cat(hidden, dim=-1), pooled))
        return torch.cat(out) if len(out) > 1 else out[0]

    def _sd3(self, prompts: list[str], device) -> torch.Tensor:
        hidden, pooled = [], []
        for tok, enc in self.parts:
            res = enc(_tokens(tok, prompts, device), output_hidden_states=True)
            hidden.append(res.hidden_states[-2].float())
            pooled.append(res[0].float())
        clip = torch.cat(hidden, dim=-1)
        width = int(self.config["joint_attention_dim"])
        n_t5 = int(self.config.get("max_sequence_length", SD3_MAX_SEQUENCE_LENGTH))
        if self.t5 is None:  # as the pipeline without text_encoder_3: zeros for T5's tokens
            t5 = clip.new_zeros(len(prompts), n_t5, width)
        else:
            tok, enc = self.t5
            t5 = enc(_tokens(tok, prompts, device, n_t5))[0].float()
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        return pack_sdxl_condition(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))

    def _flux(self, prompts: list[str], device) -> torch.Tensor:
        from dmdctl.teachers.sd.flux import FLUX_MAX_SEQUENCE_LENGTH

        tok, enc = self.parts[0]
        pooled = enc(_tokens(tok, prompts, device)).pooler_output.float()
        tok, enc = self.t5
        n_t5 = int(self.config.get("max_sequence_length", FLUX_MAX_SEQUENCE_LENGTH))
        tokens = enc(_tokens(tok, prompts, device, n_t5))[0].float()
        return pack_sdxl_condition(tokens, pooled)

    def uncond(self, device="cpu") -> torch.Tensor:
        """The unconditional branch of the real score's guidance. SD, SD3 and FLUX: the empty
        prompt, encoded (SD3's pipeline encodes "" with all three encoders; FLUX's two-pass CFG,
        ``true_cfg_scale``, takes it as ``negative_prompt=""``; FLUX.1-dev's guidance is an
        input of its transformer instead, teachers/sd/flux.py). SDXL: zeros for the token
        and the pooled embeddings, as DMD2's SDXL code and diffusers' SDXL pipeline
        (``force_zeros_for_empty_prompt``, true for SDXL base) both build it."""
        empty = self([""], device)
        return torch.zeros_like(empty) if self.arch == "sdxl" else empty


def load_text_encoder(folder: Path, config: dict | None = None) -> PromptEncoder:
    """The prompt encoder of a pipeline folder; ``config`` (the teacher's or a generator's)
    says whether SD3's T5 is used (``--no-t5`` leaves it out)."""
    arch = pipeline_arch(folder)
    if arch in ("sd3", "flux") and config is None:
        config = sd_config(folder, str(folder))
    return PromptEncoder(folder, arch, config)


def sd_config(folder: Path, source: str, no_t5: bool = False) -> dict:
    """Everything needed to rebuild the denoiser without the folder (kept in generator files).
    ``no_t5``: an SD3 teacher without its T5 encoder (zeros for T5's tokens)."""
    arch = pipeline_arch(folder)
    if arch == "sd3":
        config = sd3_config(folder, source)
        config["t5"] = config["t5"] and not no_t5
        return config
    if no_t5:
        raise UserError("--no-t5 is for SD3 teachers (their third text encoder is T5)")
    if arch == "flux":
        from dmdctl.teachers.sd.flux import flux_config

        return flux_config(
            Path(folder),
            source,
            _read_json(Path(folder) / "transformer" / "config.json"),
            scheduler_config(folder),
            _read_json(Path(folder) / "vae" / "config.json"),
        )
    unet_cfg = {k: v for k, v in _read_json(folder / "unet" / "config.json").items()}
    sched = scheduler_config(folder)
    vae_cfg = _read_json(folder / "vae" / "config.json")
    vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    resolution = int(unet_cfg.get("sample_size", 64)) * vae_scale
    config = {
        "pipeline": source,
        "arch": arch,
        "unet_config": unet_cfg,
        "scheduler_config": sched,
        "prediction_type": sched.get("prediction_type", "epsilon"),
        "latent_channels": int(unet_cfg.get("in_channels", 4)),
        "vae_scale": vae_scale,
        "scaling_factor": float(vae_cfg.get("scaling_factor", 0.18215)),
        "resolution": resolution,
    }
    for k in ("latents_mean", "latents_std"):  # some SDXL-style VAEs normalise per channel
        if vae_cfg.get(k) is not None:
            config[k] = [float(v) for v in vae_cfg[k]]
    if config["arch"] == "sdxl":
        enc2 = _read_json(folder / "text_encoder_2" / "config.json")
        config["pooled_dim"] = int(enc2.get("projection_dim") or enc2["hidden_size"])
        # diffusers' default micro-conditioning: original size = target size, crop at (0, 0)
        config["time_ids"] = [resolution, resolution, 0, 0, resolution, resolution]
    return config


def sd3_config(folder: Path, source: str) -> dict:
    tcfg = _read_json(folder / "transformer" / "config.json")
    sched = scheduler_config(folder)
    vae_cfg = _read_json(folder / "vae" / "config.json")
    vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    if sched.get("use_dynamic_shifting"):
        raise UserError(
            f"{folder}: a scheduler with resolution-dependent shifting (use_dynamic_shifting) "
            "is not supported; SD3 and SD3.5 use a fixed shift"
        )
    return {
        "pipeline": source,
        "arch": "sd3",
        "transformer_config": tcfg,
        "scheduler_config": sched,
        "prediction_type": "flow",
        "shift": float(sched.get("shift", 1.0)),
        "num_train_timesteps": int(sched.get("num_train_timesteps", 1000)),
        "latent_channels": int(tcfg.get("in_channels", 16)),
        "vae_scale": vae_scale,
        "scaling_factor": float(vae_cfg.get("scaling_factor", 1.5305)),
        "shift_factor": float(vae_cfg.get("shift_factor") or 0.0),
        "resolution": int(tcfg.get("sample_size", 128)) * vae_scale,
        "pooled_dim": int(tcfg.get("pooled_projection_dim", 2048)),
        "joint_attention_dim": int(tcfg.get("joint_attention_dim", 4096)),
        "max_sequence_length": SD3_MAX_SEQUENCE_LENGTH,
        "t5": has_t5(folder),
    }


def build_denoiser(config: dict, unet: nn.Module | None = None) -> SDDenoiser | SD3Denoiser:
    if config.get("arch") == "flux":
        from dmdctl.teachers.sd.flux import build_flux_denoiser

        return build_flux_denoiser(config, unet)
    if config.get("arch") == "sd3":
        if unet is None:
            from diffusers import SD3Transformer2DModel

            cfg = {k: v for k, v in config["transformer_config"].items() if not k.startswith("_")}
            unet = SD3Transformer2DModel.from_config(cfg)
        return SD3Denoiser(
            unet, config["shift"], config["pooled_dim"], config["num_train_timesteps"]
        )
    if unet is None:
        from diffusers import UNet2DConditionModel

        cfg = {k: v for k, v in config["unet_config"].items() if not k.startswith("_")}
        unet = UNet2DConditionModel.from_config(cfg)
    abar = alphas_cumprod(config["scheduler_config"])
    pred = config.get("prediction_type", "epsilon")
    if config.get("arch", "sd") == "sdxl":
        return SDXLDenoiser(unet, abar, pred, config["pooled_dim"], config["time_ids"])
    return SDDenoiser(unet, abar, pred)


# --- prompts -------------------------------------------------------------------------------
# prompt files, their index and their encoding in the step: dmdctl.data.prompts
def read_prompts(path: Path) -> list[str]:
    """Every prompt of a file, in memory (for commands that take few: ``clip-score``)."""
    from dmdctl.data.prompts import read_prompts as read

    return read(path)


# --- the VAE ----------------------------------------------------------------------------------
class VAECodec:
    """Latents (scaled by the VAE's scaling_factor, and shifted by per-channel latents_mean /
    latents_std where the VAE config has them, as diffusers' SDXL pipeline does) <-> images in
    [-1, 1]. dmdctl loads the VAE in float32: SDXL's VAE overflows in float16 (its config says
    ``force_upcast``), and the decode is a small part of a training step's cost."""

    latent = True

    def __init__(self, vae: nn.Module, scaling_factor: float, config: dict | None = None):
        self.vae = vae
        self.scaling_factor = float(scaling_factor)
        config = config or {}
        self.shift_factor = float(config.get("shift_factor") or 0.0)  # SD3's VAE
        self.mean = self.std = None
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            self.mean = torch.tensor(config["latents_mean"]).view(1, -1, 1, 1)
            self.std = torch.tensor(config["latents_std"]).view(1, -1, 1, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        z = z.float()
        if self.mean is not None:
            z = z * self.std.to(z.device) / self.scaling_factor + self.mean.to(z.device)
        else:
            z = z / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(dtype)).sample.float()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        z = self.vae.encode(x.to(dtype)).latent_dist.mean.float()
        if self.mean is not None:
            return (z - self.mean.to(z.device)) * self.scaling_factor / self.std.to(z.device)
        return (z - self.shift_factor) * self.scaling_factor


# --- the teacher's own sampler for make-pairs -------------------------------------------------
# name -> (diffusers class, config overrides); euler-trailing is DMD2's SDXL pair sampler,
# flow-euler SD3's own sampler
SCHEDULERS = {
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "unipc": ("UniPCMultistepScheduler", {}),  # Wan's own (flow mode, from its config)
}


class SchedulerSampler:
    """The pipeline's deterministic sampler: a diffusers scheduler with classifier-free guidance.

    ``z`` is the unscaled noise (the scheduler multiplies it by ``init_noise_sigma``), ``cond`` the
    prompt embeddings; returns the final latent (before the VAE), as the pipeline computes it.
    ``denoiser`` is the teacher's :class:`SDDenoiser`, whose ``unet_output`` feeds the UNet what
    its architecture needs (SDXL: the pooled embedding and time ids). A guidance-distilled FLUX
    transformer takes ``guidance`` as its input (one pass, as FluxPipeline runs it), and its
    times are FluxPipeline's (``linspace(1, 1/steps, steps)``, shifted by the teacher's ``mu``).
    """

    def __init__(
        self, denoiser: SDDenoiser, config: dict, name: str, steps: int, guidance: float, uncond
    ):
        import diffusers

        if name not in SCHEDULERS:
            raise UserError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
        cls, overrides = SCHEDULERS[name]
        self.cls = getattr(diffusers, cls)
        self.config = dict(config, **overrides)
        self.denoiser = denoiser
        self.steps = steps
        self.guidance = float(guidance)
        self.uncond = uncond
        self.cfg = self.guidance  # two-pass classifier-free guidance
        if getattr(denoiser, "guidance_embeds", False):  # FLUX.1-dev: an input, one pass
            denoiser.guidance, self.cfg = self.guidance, 1.0
        self.nfe = steps * (2 if self.cfg != 1.0 else 1)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        sched = self.cls.from_config(self.config)  # fresh: PNDM keeps state across steps
        kwargs = getattr(self.denoiser, "scheduler_kwargs", lambda n: {})(self.steps)
        sched.set_timesteps(self.steps, device=z.device, **kwargs)
        lat = z.float() * getattr(sched, "init_noise_sigma", 1.0)  # flow: x_1 is the noise
        guided = self.cfg != 1.0
        emb = cond
        if guided:
            u = self.uncond.to(cond).expand(cond.shape[0], -1, -1)
            emb = torch.cat([u, cond])
        for t in sched.timesteps:
            inp = torch.cat([lat, lat]) if guided else lat
            if hasattr(sched, "scale_model_input"):  # not for flow-matching schedulers
                inp = sched.scale_model_input(inp, t)
            out = self.denoiser.unet_output(inp, t.expand(inp.shape[0]), emb)
            if guided:
                o_u, o_c = out.chunk(2)
                out = o_u + self.cfg * (o_c - o_u)
            lat = sched.step(out, t, lat).prev_sample
        return lat
