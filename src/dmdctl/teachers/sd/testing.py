"""Random-weight Stable Diffusion pipelines written to disk, for tests and benchmarks.

Nothing is downloaded: the tokenizer's vocabulary and merges are written here (lower-case
letters, a few merged words), the networks are built from configs with random weights, and the
folder is saved with diffusers' ``save_pretrained``, so loading it exercises the real code path.
``size="sd15"`` gives SD1.5's real network shapes (860M-parameter UNet, 64x64 latents).
:func:`build_xl_pipeline` writes SDXL-style pipelines (two text encoders, the second with a
projection; a UNet with the text-time added embedding; Euler scheduler), tiny or at SDXL base's
real shapes (``xl_unet_config("sdxl")``, a 2.6B-parameter UNet on 128x128 latents);
:func:`build_sd3_pipeline` and :func:`build_flux_pipeline` write SD3 and FLUX.1 pipelines.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

WORDS = ("cat", "dog", "red", "blue", "photo", "of", "a", "the", "on", "grass", "sky")


def write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """A small CLIP BPE vocabulary: every letter, and the WORDS above as merged tokens."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for c in letters:
        vocab[c] = len(vocab)
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for w in WORDS:  # merge left to right: c+a -> ca, ca+t</w> -> cat</w>
        prev = w[0]
        for i, c in enumerate(w[1:], 1):
            nxt = c + "</w>" if i == len(w) - 1 else c
            merges.append(f"{prev} {nxt}")
            prev = prev + nxt
            vocab.setdefault(prev, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def _configs(size: str, prediction_type: str) -> dict:
    if size == "tiny":
        return {
            "unet": dict(
                block_out_channels=(8, 16),
                layers_per_block=1,
                sample_size=8,
                in_channels=4,
                out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=16,
                attention_head_dim=2,
                norm_num_groups=4,
            ),
            "vae": dict(
                block_out_channels=(8, 16),
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2,
                latent_channels=4,
                norm_num_groups=4,
                sample_size=16,
            ),
            "text": dict(
                hidden_size=16,
                intermediate_size=32,
                num_attention_heads=2,
                num_hidden_layers=2,
                max_position_embeddings=16,
                projection_dim=16,
            ),
            "max_length": 16,
        }
    if size == "sd15":  # stable-diffusion-v1-5's configs (random weights)
        return {
            "unet": dict(
                block_out_channels=(320, 640, 1280, 1280),
                layers_per_block=2,
                sample_size=64,
                in_channels=4,
                out_channels=4,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768,
                attention_head_dim=8,
            ),
            "vae": dict(
                block_out_channels=(128, 256, 512, 512),
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4,
                layers_per_block=2,
                sample_size=512,
            ),
            "text": dict(
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                max_position_embeddings=77,
                projection_dim=768,
                hidden_act="quick_gelu",
            ),
            "max_length": 77,
        }
    raise ValueError(f"unknown size {size!r}")


def build_pipeline(
    folder: Path,
    size: str = "tiny",
    prediction_type: str = "epsilon",
    seed: int = 0,
    scheduler: str = "pndm",
) -> Path:
    """Write a random-weight SD pipeline folder (``model_index.json`` and components)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    cfg = _configs(size, prediction_type)
    with tempfile.TemporaryDirectory() as tmp:  # save_pretrained writes the tokenizer's own copy
        vocab, merges = write_tokenizer_files(Path(tmp))
        tok = CLIPTokenizer(str(vocab), str(merges), model_max_length=cfg["max_length"])
        vocab_size = len(json.loads(vocab.read_text()))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    text = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            vocab_size=vocab_size,
            **cfg["text"],
        )
    )
    common = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    if scheduler == "pndm":
        sched = PNDMScheduler(skip_prk_steps=True, **common)
    else:
        sched = DDIMScheduler(clip_sample=False, **common)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def xl_unet_config(size: str = "tiny") -> dict:
    """An SDXL-style UNet config: tiny, or stable-diffusion-xl-base-1.0's own shapes."""
    if size == "tiny":
        return dict(
            block_out_channels=(8, 16),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,  # the two encoders' hidden sizes, concatenated
            attention_head_dim=2,
            norm_num_groups=4,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 16,  # 6 time ids + the pooled width
            use_linear_projection=True,
        )
    if size == "sdxl":
        return dict(
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            sample_size=128,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            use_linear_projection=True,
        )
    raise ValueError(f"unknown size {size!r}")


def _xl_text_configs(size: str) -> tuple[dict, dict, int]:
    """The two text encoders' configs (and the tokenisers' length): tiny, or SDXL base's
    CLIP ViT-L and OpenCLIP ViT-bigG text towers."""
    if size == "tiny":
        text = _configs("tiny", "epsilon")["text"]
        return dict(text), dict(text), 16
    if size == "sdxl":
        one = _configs("sd15", "epsilon")["text"]
        two = dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_attention_heads=20,
            num_hidden_layers=32,
            max_position_embeddings=77,
            projection_dim=1280,
            hidden_act="gelu",
        )
        return dict(one), two, 77
    raise ValueError(f"unknown size {size!r}")


def build_xl_pipeline(
    folder: Path,
    prediction_type: str = "epsilon",
    seed: int = 0,
    projection: bool = True,
    size: str = "tiny",
) -> Path:
    """Write a random-weight SDXL pipeline folder, tiny or at SDXL base's shapes (``size``).
    ``projection=False`` (tiny only) gives the second text encoder an identity projection, so
    its pooled output is its hidden state's, as an encoder without a projection would give."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    folder = Path(folder)
    one, two, max_length = _xl_text_configs(size)
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = write_tokenizer_files(Path(tmp))
        toks = [CLIPTokenizer(str(vocab), str(merges), model_max_length=max_length)] * 2
        vocab_size = len(json.loads(vocab.read_text()))
    torch.manual_seed(seed)
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=vocab_size)
    enc1 = CLIPTextModel(CLIPTextConfig(**one, **ids))
    enc2 = CLIPTextModelWithProjection(CLIPTextConfig(**two, **ids))
    if not projection:  # an identity projection: the pooled output is the hidden state's
        w = enc2.text_projection.weight
        w.data.copy_(torch.eye(*w.shape))
    unet = UNet2DConditionModel(**xl_unet_config(size))
    vae_cfg = _configs("tiny" if size == "tiny" else "sd15", prediction_type)["vae"]
    vae = AutoencoderKL(**dict(vae_cfg, scaling_factor=0.13025, force_upcast=True))
    sched = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=enc1,
        text_encoder_2=enc2,
        tokenizer=toks[0],
        tokenizer_2=toks[1],
        scheduler=sched,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def write_t5_tokenizer(folder: Path):
    """A small T5 tokenizer (a Unigram vocabulary as T5's: <pad>=0, </s>=1, <unk>=2, the WORDS
    above as whole pieces, single letters for anything else), made locally and saved."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = T5TokenizerFast(vocab=vocab, extra_ids=0)
    tok.save_pretrained(str(folder))
    return tok


def sd3_transformer_config(size: str = "tiny") -> dict:
    """An SD3 transformer config: tiny, tiny with SD3.5's additions (``tiny-3.5``: RMS-normed
    queries and keys, a dual-attention block as in SD3.5 medium), or stable-diffusion-3-medium's
    own shapes (2B)."""
    if size == "tiny-3.5":
        return dict(sd3_transformer_config("tiny"), qk_norm="rms_norm", dual_attention_layers=(0,))
    if size == "tiny":
        return dict(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=48,  # = T5's width
            caption_projection_dim=16,
            pooled_projection_dim=16,  # the two CLIP projections, concatenated
            out_channels=4,
            pos_embed_max_size=16,
        )
    if size == "sd3-medium":
        return dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
        )
    raise ValueError(f"unknown size {size!r}")


def build_sd3_pipeline(
    folder: Path, seed: int = 0, t5: bool = True, shift: float = 3.0, size: str = "tiny"
) -> Path:
    """Write a random-weight SD3 pipeline folder: two CLIP text encoders with projections,
    a T5 encoder (left out with ``t5=False``, as diffusers allows), an ``SD3Transformer2DModel``,
    a VAE with SD3's shift and scaling factors and ``FlowMatchEulerDiscreteScheduler``. Tiny, or
    (``size="sd3-medium"``, for benchmarks) SD3 medium's transformer, CLIP encoders and VAE;
    T5-XXL is then left out (a training step never runs it: its tokens are cached, and without
    it they are zeros of the same shape)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
    )

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = write_tokenizer_files(Path(tmp))
        max_length = 16 if size.startswith("tiny") else 77
        toks = [CLIPTokenizer(str(vocab), str(merges), model_max_length=max_length)] * 2
        vocab_size = len(json.loads(vocab.read_text()))
        tok3 = write_t5_tokenizer(Path(tmp) / "t5")
    torch.manual_seed(seed)
    real = not size.startswith("tiny")
    t5 = t5 and not real
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=vocab_size)
    if real:  # CLIP ViT-L and OpenCLIP bigG text towers, with their projections
        one, two, _ = _xl_text_configs("sdxl")
        one = dict(one, projection_dim=768)
    else:
        one = two = dict(_configs("tiny", "epsilon")["text"], projection_dim=8)
    enc1 = CLIPTextModelWithProjection(CLIPTextConfig(**one, **ids))
    enc2 = CLIPTextModelWithProjection(CLIPTextConfig(**two, **ids))
    enc3 = T5EncoderModel(
        T5Config(
            vocab_size=len(tok3),
            d_model=48,  # T5's width = the transformer's joint attention width
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    transformer = SD3Transformer2DModel(**sd3_transformer_config(size))
    vae_cfg = _configs("sd15" if real else "tiny", "epsilon")["vae"]
    if real:
        vae_cfg = dict(vae_cfg, latent_channels=16, sample_size=1024)
    vae = AutoencoderKL(**dict(vae_cfg, scaling_factor=1.5305, shift_factor=0.0609))
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=sched,
        vae=vae,
        text_encoder=enc1,
        tokenizer=toks[0],
        text_encoder_2=enc2,
        tokenizer_2=toks[1],
        text_encoder_3=enc3 if t5 else None,
        tokenizer_3=tok3 if t5 else None,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def flux_transformer_config(size: str = "tiny", blocks: tuple[int, int] | None = None) -> dict:
    """A FLUX.1 transformer config: tiny (one double- and one single-stream block), or
    FLUX.1-dev's own shapes (``"flux-dev"``: 19 double- and 38 single-stream blocks of width 3072,
    12B parameters). ``blocks`` = (double, single) overrides the depth (a slice of the real
    model for measuring per-block cost)."""
    if size == "tiny":
        cfg = dict(
            patch_size=1,
            in_channels=16,  # 4 latent channels x a 2x2 patch
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=48,  # = T5's width
            pooled_projection_dim=16,  # = CLIP's width (its pooled output, no projection)
            guidance_embeds=True,
            axes_dims_rope=(2, 2, 4),  # sums to attention_head_dim
        )
    elif size == "flux-dev":
        cfg = dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
    else:
        raise ValueError(f"unknown size {size!r}")
    if blocks is not None:
        cfg.update(num_layers=int(blocks[0]), num_single_layers=int(blocks[1]))
    return cfg


def build_flux_pipeline(
    folder: Path,
    seed: int = 0,
    size: str = "tiny",
    schnell: bool = False,
    blocks: tuple[int, int] | None = None,
) -> Path:
    """Write a random-weight FLUX.1 pipeline folder: CLIP (its pooled output), T5, a
    ``FluxTransformer2DModel`` with the guidance input (FLUX.1-dev), a VAE with FLUX's shift and
    scaling factors and the resolution-dependent ``FlowMatchEulerDiscreteScheduler`` of
    FLUX.1-dev. ``schnell=True``: FLUX.1-schnell's set-up instead (no guidance input, a fixed
    shift of 1). Tiny (32 px: 16x16 latents, 64 image tokens), or ``size="flux-dev"`` (for
    benchmarks) FLUX.1-dev's transformer, CLIP ViT-L and VAE at 1024 px with the transformer
    made and saved in bf16 (24 GB instead of 48); T5-XXL is then a one-layer encoder of its width, 4096 (a
    step on cached prompts never runs T5; its tokens have the same shape)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    folder = Path(folder)
    real = size != "tiny"
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = write_tokenizer_files(Path(tmp))
        tok = CLIPTokenizer(str(vocab), str(merges), model_max_length=77 if real else 16)
        vocab_size = len(json.loads(vocab.read_text()))
        tok2 = write_t5_tokenizer(Path(tmp) / "t5")
    torch.manual_seed(seed)
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=vocab_size)
    text = _configs("sd15" if real else "tiny", "epsilon")["text"]
    clip = CLIPTextModel(CLIPTextConfig(**text, **ids))
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tok2),
            d_model=4096 if real else 48,  # = the transformer's joint attention width
            d_kv=64 if real else 8,
            d_ff=256 if real else 64,
            num_layers=1,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    tcfg = flux_transformer_config(size, blocks)
    if schnell:
        tcfg["guidance_embeds"] = False
    default = torch.get_default_dtype()
    try:  # at the real size, made in bf16 directly: 24 GB of host memory instead of 48
        torch.set_default_dtype(torch.bfloat16 if real else default)
        transformer = FluxTransformer2DModel(**tcfg)
    finally:
        torch.set_default_dtype(default)
    vae_cfg = _configs("sd15" if real else "tiny", "epsilon")["vae"]
    vae_cfg = dict(
        vae_cfg,
        latent_channels=16 if real else 4,
        sample_size=1024 if real else 32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae = AutoencoderKL(**vae_cfg)
    if schnell:  # FLUX.1-schnell's scheduler: a fixed shift of 1
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    else:  # FLUX.1-dev's: the shift follows the resolution
        sched = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    pipe = FluxPipeline(
        scheduler=sched,
        vae=vae,
        text_encoder=clip,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=tok2,
        transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
