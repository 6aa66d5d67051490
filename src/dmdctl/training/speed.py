"""Speed levers of the training step, each a distill option (benchmarks/sd_step.py measures them
side by side on a GPU): the scaled-dot-product-attention backend, channels-last memory layout,
and regional torch.compile (each repeated block of a UNet compiled once, so compilation stays
short and a graph break in one block does not undo the rest)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

# the compiler backend of --compile; tests switch it to "eager" (same graphs, no code generation)
COMPILE_BACKEND = "inductor"


def attention_backend(name: str):
    """A context in which F.scaled_dot_product_attention uses only the named kernel."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return sdpa_kernel(backend)


def repeated_blocks(net: nn.Module) -> list[nn.Module]:
    """The blocks a UNet repeats: diffusers' down/mid/up blocks, the EDM networks' encoder and
    decoder blocks; empty for networks without them (small MLPs are compiled whole)."""
    blocks: list[nn.Module] = []
    for m in net.modules():
        if hasattr(m, "down_blocks") and hasattr(m, "up_blocks"):  # diffusers UNet2DConditionModel
            blocks += [
                *m.down_blocks,
                *([m.mid_block] if m.mid_block is not None else []),
                *m.up_blocks,
            ]
            return blocks
        if isinstance(getattr(m, "enc", None), nn.ModuleDict):  # EDM DhariwalUNet / SongUNet
            return [*m.enc.values(), *m.dec.values()]
    return blocks


def compile_regions(net: nn.Module) -> int:
    """Compile ``net``'s repeated blocks in place (state-dict keys unchanged); returns how many
    regions were compiled (1: the whole network, for networks without repeated blocks)."""
    blocks = repeated_blocks(net)
    for b in blocks or [net]:
        b.compile(backend=COMPILE_BACKEND, dynamic=False)
    return len(blocks) or 1


def apply_layout_and_compile(nets: list[nn.Module], channels_last: bool, compile: bool) -> None:
    for net in nets:
        if channels_last:
            net.to(memory_format=torch.channels_last)
        if compile:
            compile_regions(net)
