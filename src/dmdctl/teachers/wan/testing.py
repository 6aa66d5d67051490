"""Random-weight Wan 2.1 text-to-video pipelines written to disk, for tests and benchmarks.

Nothing is downloaded: the tokenizer is the small Unigram vocabulary of
:func:`dmdctl.teachers.sd.testing.write_t5_tokenizer` (UMT5 uses T5's tokenizer), the networks
are built from configs with random weights (a UMT5 encoder, ``WanTransformer3DModel``,
``AutoencoderKLWan`` with Wan's own latents mean/std), and the folder is saved with diffusers'
``save_pretrained``, so loading it exercises the real code path. ``size="wan-1.3b"`` gives Wan
2.1 T2V 1.3B's transformer shapes (for the benchmark step; its UMT5-XXL encoder is replaced by a
small one of the same width, which a training step with cached prompts never runs).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def wan_transformer_config(size: str = "tiny") -> dict:
    """A ``WanTransformer3DModel`` config: tiny, or Wan2.1-T2V-1.3B's own shapes (1.3B)."""
    if size == "tiny":
        return dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=16,
            out_channels=16,
            text_dim=32,  # = the text encoder's width
            freq_dim=32,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
    if size == "wan-1.3b":  # Wan2.1-T2V-1.3B: dim 1536 (12 heads of 128), 30 blocks
        return dict(
            patch_size=(1, 2, 2),
            num_attention_heads=12,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=8960,
            num_layers=30,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024,
        )
    raise ValueError(f"unknown size {size!r}")


def build_wan_pipeline(
    folder: Path, seed: int = 0, flow_shift: float = 3.0, size: str = "tiny"
) -> Path:
    """Write a random-weight ``WanPipeline`` folder: UMT5 text encoder and tokenizer, a
    ``WanTransformer3DModel``, ``AutoencoderKLWan`` (the 4x temporal, 8x spatial compression of
    Wan 2.1's VAE at a few channels; its default latents mean/std, Wan 2.1's) and the pipeline's
    own scheduler, ``UniPCMultistepScheduler`` in flow mode with ``flow_shift``."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    from dmdctl.teachers.sd.testing import write_t5_tokenizer

    folder = Path(folder)
    tcfg = wan_transformer_config(size)
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_t5_tokenizer(Path(tmp) / "t5")
    torch.manual_seed(seed)
    text = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tok),
            d_model=int(tcfg["text_dim"]),
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    transformer = WanTransformer3DModel(**tcfg)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    sched = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=flow_shift,
    )
    pipe = WanPipeline(
        tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer, scheduler=sched
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
