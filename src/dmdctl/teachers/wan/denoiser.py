"""Wan 2.1's flow-matching video transformer as a denoiser ``D(x_sigma, sigma, c) -> x0``.

A Wan latent is 5-D, ``[N, C, F, H, W]`` (16 channels; F = (frames - 1) / 4 + 1 latent frames;
H, W the image's size / 8). Wan is trained as SD3 is, on ``x_t = (1 - t) x0 + t eps`` with the
velocity ``v = eps - x0`` as target and ``timestep = 1000 t``, so it is a
:class:`~dmdctl.core.denoiser.FlowDenoiser` whose network is ``WanTransformer3DModel`` and whose
condition is the UMT5 token embeddings ``[N, L, text_dim]`` (zero after each prompt's tokens, as
``WanPipeline.encode_prompt`` gives them). Nothing in the wrapper depends on the number of
dimensions of the latent beyond the transformer's own patching.
"""

from __future__ import annotations

import torch
from torch import nn

from dmdctl.core.denoiser import FlowDenoiser


class WanDenoiser(FlowDenoiser):
    """``WanTransformer3DModel`` as a flow denoiser: the velocity at ``timestep = 1000 t`` on
    ``x_t`` given the prompt's token embeddings. The DM loss's grid is the scheduler's shifted
    training times (``shift``: the pipeline scheduler's ``flow_shift``, or a recipe's)."""

    # the GAN head reads the middle block's output: the video's tokens, [N, F'*H'*W', dim]
    bottleneck_output = 0

    def __init__(self, transformer: nn.Module, shift: float, levels: int = 1000):
        super().__init__(None, time_scale=levels, shift=shift, levels=levels)
        self.transformer = transformer

    @property
    def network(self) -> nn.Module:
        """The diffusers model inside (what LoRA adapters go on, what an export writes)."""
        return self.transformer

    def bottleneck(self) -> nn.Module:
        blocks = self.transformer.blocks
        return blocks[len(blocks) // 2]

    def token_grid(self, sample_shape) -> tuple[int, int, int]:
        """How the transformer's tokens of one sample ``[C, F, H, W]`` lie: (frames, rows,
        columns) after its patching, in the row-major order it flattens them in."""
        p_t, p_h, p_w = (int(p) for p in self.transformer.config.patch_size)
        _, f, h, w = (int(s) for s in sample_shape)
        return f // p_t, h // p_h, w // p_w

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def unet_output(self, x_t: torch.Tensor, timestep, cond=None) -> torch.Tensor:
        """The transformer's velocity (float32) on ``x_t`` at the pipeline's ``timestep``
        (1000 t), called as ``WanPipeline`` calls it."""
        if cond is None:
            raise ValueError("a Wan transformer needs a condition (the prompt's token embeddings)")
        dtype = next(self.transformer.parameters()).dtype
        t = torch.as_tensor(timestep, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        out = self.transformer(
            hidden_states=x_t.to(dtype), timestep=t, encoder_hidden_states=cond.to(dtype)
        )
        return out.sample.float()

    def velocity_at(self, x_t: torch.Tensor, t, cond=None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        return self.unet_output(x_t, t * self.time_scale, cond)
