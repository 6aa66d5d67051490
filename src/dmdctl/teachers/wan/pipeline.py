"""Wan 2.1 text-to-video pipelines (``WanPipeline`` folders in diffusers format): detection, the
teacher's config, prompt encoding, the video VAE and the network.

A folder holds ``transformer/`` (``WanTransformer3DModel``), ``vae/`` (``AutoencoderKLWan``),
``text_encoder/`` (UMT5), ``tokenizer/`` and ``scheduler/`` (``UniPCMultistepScheduler`` in flow
mode, ``flow_shift`` 3 for Wan 2.1 at 480p). It is read with the same loaders, offline rules and
safetensors-only policy as the Stable Diffusion pipelines (:mod:`dmdctl.teachers.sd.pipeline`).

What a Wan teacher adds to an image pipeline is the video's size: ``num_frames`` (4k + 1: the
VAE keeps the first frame and compresses the rest 4x in time), ``height`` and ``width``
(multiples of the VAE's 8x times the transformer's 2x2 patch). They are fixed per run
(``--video-size FRAMESxHEIGHTxWIDTH``, by default ``WanPipeline``'s 81x480x832) and recorded in
the teacher's config, so pairs, real data, generator files, ``sample`` and ``export`` all follow.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from dmdctl.errors import UserError
from dmdctl.files import sha256_file
from dmdctl.teachers.sd.pipeline import (
    _read_json,
    _weights_file,
    load_component,
    quiet_loaders,
    scheduler_config,
)
from dmdctl.teachers.wan.denoiser import WanDenoiser

WAN_T2V_13B_HUB_ID = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
WAN_TRANSFORMER = "WanTransformer3DModel"
# WanPipeline.__call__'s defaults: 81 frames at 480x832, UMT5 padded to 512 tokens
DEFAULT_VIDEO = (81, 480, 832)
MAX_SEQUENCE_LENGTH = 512
FPS = 16  # Wan 2.1's frame rate (its examples write their videos at 16 fps)
# The negative prompt of Wan 2.1's own sampler (wan/configs/shared_config.py, sample_neg_prompt),
# which the public Wan DMD recipes use as the real score's unconditional branch (CausVid's and
# Self-Forcing's configs, `negative_prompt`; FastVideo's Wan presets). WanPipeline itself
# defaults to "" when no negative prompt is passed: pass this one to compare with dmdctl.
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
COMPONENTS = ("transformer", "vae", "text_encoder")
VIDEO_SIZE = re.compile(r"^\s*(\d+)\s*[xX,]\s*(\d+)\s*[xX,]\s*(\d+)\s*$")


def is_wan_folder(path) -> bool:
    """Whether ``path`` is a diffusers pipeline folder whose transformer is Wan's."""
    cfg = Path(path) / "transformer" / "config.json"
    if not (Path(path) / "model_index.json").is_file() or not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("_class_name") == WAN_TRANSFORMER
    except (OSError, ValueError):
        return False


def parse_video_size(text: str | None) -> tuple[int, int, int]:
    """``--video-size`` as (frames, height, width); WanPipeline's default when not given."""
    if text is None:
        return DEFAULT_VIDEO
    m = VIDEO_SIZE.match(str(text))
    if not m:
        raise UserError(
            f"--video-size {text!r} is not FRAMESxHEIGHTxWIDTH (e.g. 81x480x832 for Wan at 480p)"
        )
    return tuple(int(g) for g in m.groups())  # type: ignore[return-value]


def check_video_size(size: tuple[int, int, int], temporal: int, spatial: int, patch) -> None:
    """The frame count must be ``temporal * k + 1`` and the sides multiples of the VAE's
    spatial factor times the transformer's patch (WanPipeline would silently round them)."""
    frames, height, width = size
    if frames < 1 or (frames - 1) % temporal:
        lo = (max(frames, 1) - 1) // temporal * temporal + 1
        raise UserError(
            f"--video-size: {frames} frames is not {temporal}k + 1 (the VAE compresses frames "
            f"{temporal}x in time after the first); use {lo} or {lo + temporal}"
        )
    step_h, step_w = spatial * int(patch[1]), spatial * int(patch[2])
    if height < step_h or width < step_w or height % step_h or width % step_w:
        raise UserError(
            f"--video-size: {height}x{width} pixels must be multiples of {step_h}x{step_w} (the "
            f"VAE's {spatial}x times the transformer's {patch[1]}x{patch[2]} patch)"
        )


def wan_config(folder: Path, source: str, video_size: str | None = None) -> dict:
    """Everything needed to rebuild the denoiser and run the pipeline's parts without the
    folder's weights (kept in generator files), with the video's size."""
    folder = Path(folder)
    tcfg = _read_json(folder / "transformer" / "config.json")
    sched = scheduler_config(folder)
    vae = _read_json(folder / "vae" / "config.json")
    if sched.get("use_dynamic_shifting"):
        raise UserError(
            f"{folder}: a scheduler with resolution-dependent shifting (use_dynamic_shifting) "
            "is not supported; Wan 2.1 uses a fixed flow_shift"
        )
    if tcfg.get("image_dim") is not None or tcfg.get("added_kv_proj_dim") is not None:
        raise UserError(
            f"{folder} is an image-to-video Wan pipeline (its transformer takes image "
            "embeddings); dmdctl distils Wan text-to-video pipelines"
        )
    temporal = int(vae.get("scale_factor_temporal") or 4)
    spatial = int(vae.get("scale_factor_spatial") or 8)
    patch = [int(p) for p in tcfg.get("patch_size", (1, 2, 2))]
    size = parse_video_size(video_size)
    check_video_size(size, temporal, spatial, patch)
    frames, height, width = size
    # UniPC keeps the shift as flow_shift; FlowMatchEuler-style schedulers as shift
    shift = sched.get("flow_shift", sched.get("shift", 1.0))
    z_dim = int(vae.get("z_dim", 16))
    mean, std = vae.get("latents_mean"), vae.get("latents_std")
    if mean is None or std is None or len(mean) != z_dim or len(std) != z_dim:
        raise UserError(f"{folder / 'vae'}: latents_mean/latents_std must list {z_dim} values")
    return {
        "pipeline": source,
        "arch": "wan",
        "transformer_config": tcfg,
        "scheduler_config": sched,
        "prediction_type": "flow",
        "shift": float(shift),
        "num_train_timesteps": int(sched.get("num_train_timesteps", 1000)),
        "latent_channels": int(tcfg.get("in_channels", 16)),
        "vae_scale": spatial,
        "vae_scale_temporal": temporal,
        "latents_mean": [float(v) for v in mean],
        "latents_std": [float(v) for v in std],
        "num_frames": frames,
        "height": height,
        "width": width,
        "text_dim": int(tcfg.get("text_dim", 4096)),
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "negative_prompt": NEGATIVE_PROMPT,
    }


def latent_shape(config: dict) -> tuple[int, int, int, int]:
    """One sample's latent ``[C, F, H, W]``, as WanPipeline.prepare_latents makes it."""
    f = (int(config["num_frames"]) - 1) // int(config["vae_scale_temporal"]) + 1
    s = int(config["vae_scale"])
    return int(config["latent_channels"]), f, int(config["height"]) // s, int(config["width"]) // s


def weight_files(folder: Path, component: str) -> list[Path]:
    """Every safetensors file of a component (large ones are sharded)."""
    _weights_file(folder, component)  # refuses a component without safetensors
    files = sorted(Path(folder, component).glob("*.safetensors"))
    return [f for f in files if "fp16" not in f.name]


def pipeline_identity(folder: Path) -> str:
    """sha256 over the weighted components' configs and weight files, and the scheduler."""
    files = [f for c in COMPONENTS for f in weight_files(folder, c)]
    stamp = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _identity(Path(folder).resolve(), stamp)


@functools.lru_cache(maxsize=8)
def _identity(folder: Path, stamp: tuple) -> str:
    h = hashlib.sha256()
    for comp in COMPONENTS:
        h.update(comp.encode())
        h.update(json.dumps(_read_json(folder / comp / "config.json"), sort_keys=True).encode())
        for f in weight_files(folder, comp):
            h.update(sha256_file(f).encode())
    h.update(json.dumps(scheduler_config(folder), sort_keys=True).encode())
    return h.hexdigest()


def load_transformer(folder: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    from diffusers import WanTransformer3DModel

    return load_component(WanTransformer3DModel, Path(folder), "transformer", dtype)


def load_vae(folder: Path) -> nn.Module:
    """The video VAE in float32 (as WanPipeline's examples load it)."""
    from diffusers import AutoencoderKLWan

    return load_component(AutoencoderKLWan, Path(folder), "vae").eval().requires_grad_(False)


def build_denoiser(config: dict, transformer: nn.Module | None = None) -> WanDenoiser:
    if transformer is None:
        from diffusers import WanTransformer3DModel

        cfg = {k: v for k, v in config["transformer_config"].items() if not k.startswith("_")}
        transformer = WanTransformer3DModel.from_config(cfg)
    return WanDenoiser(transformer, config["shift"], config["num_train_timesteps"])


class WanPromptEncoder:
    """Prompts -> ``[N, max_sequence_length, text_dim]`` float32, as ``WanPipeline.encode_prompt``
    computes them: each prompt cleaned by the pipeline's own ``prompt_clean``, tokenised to
    ``max_sequence_length`` (512) with its attention mask, UMT5's last hidden state, and zeros
    after each prompt's own tokens. ``uncond`` encodes the teacher's negative prompt."""

    def __init__(self, folder: Path, config: dict):
        quiet_loaders()
        from transformers import AutoTokenizer, UMT5EncoderModel

        folder = Path(folder)
        _weights_file(folder, "text_encoder")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                folder, subfolder="tokenizer", local_files_only=True
            )
            enc = UMT5EncoderModel.from_pretrained(
                folder, subfolder="text_encoder", use_safetensors=True, local_files_only=True
            )
        except (OSError, ValueError) as e:
            raise UserError(
                f"could not load the text encoder {folder / 'text_encoder'}: "
                f"{str(e).splitlines()[0]}"
            ) from None
        self.encoder = enc.eval().requires_grad_(False)
        self.max_length = int(config.get("max_sequence_length", MAX_SEQUENCE_LENGTH))
        self.negative_prompt = str(config.get("negative_prompt", ""))

    def to(self, device, dtype: torch.dtype | None = None) -> WanPromptEncoder:
        self.encoder.to(device, dtype)
        return self

    @torch.no_grad()
    def __call__(self, prompts: list[str], device="cpu", batch_size: int = 64) -> torch.Tensor:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        self.encoder.to(device)
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = [prompt_clean(p) for p in prompts[i : i + batch_size]]
            tok = self.tokenizer(
                chunk,
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                add_special_tokens=True,
                return_attention_mask=True,
                return_tensors="pt",
            )
            mask = tok.attention_mask.to(device)
            emb = self.encoder(tok.input_ids.to(device), mask).last_hidden_state.float()
            lengths = mask.gt(0).sum(dim=1)
            keep = torch.arange(emb.shape[1], device=device)[None] < lengths[:, None]
            out.append(emb * keep[..., None])
        return torch.cat(out) if len(out) > 1 else out[0]

    def uncond(self, device="cpu") -> torch.Tensor:
        """The unconditional branch of the real score's guidance: the negative prompt, encoded."""
        return self([self.negative_prompt], device)


class WanVAECodec:
    """Normalised latents ``[N, 16, F, H/8, W/8]`` <-> videos ``[N, 3, frames, H, W]`` in
    [-1, 1]: latents are ``(z - latents_mean) / latents_std`` per channel, undone before the
    decoder exactly as ``WanPipeline`` does (``z / (1 / std) + mean``). The VAE runs in
    float32."""

    latent = True

    def __init__(self, vae: nn.Module, config: dict):
        self.vae = vae
        c = len(config["latents_mean"])
        self.mean = torch.tensor(config["latents_mean"]).view(1, c, 1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(config["latents_std"]).view(1, c, 1, 1, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        z = z.float() / self.inv_std.to(z.device) + self.mean.to(z.device)
        return self.vae.decode(z.to(dtype)).sample.float()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        z = self.vae.encode(x.to(dtype)).latent_dist.mean.float()
        return (z - self.mean.to(z.device)) * self.inv_std.to(z.device)
