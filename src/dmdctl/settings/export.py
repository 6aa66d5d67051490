"""``dmdctl export``: the generator of a run, checkpoint or file as safetensors or a diffusers folder."""

from __future__ import annotations

from dataclasses import dataclass

from dmdctl.config import Settings
from dmdctl.errors import require
from dmdctl.options import option
from dmdctl.settings.common import offline_option

FORMATS = ("safetensors", "diffusers", "lora")


@dataclass
class ExportConfig(Settings):
    """Settings of ``export``: which weights (EMA or raw) of what, in which format, where."""

    source: str | None = option(
        None, "Distill run folder, checkpoint folder, or generator file.", path=True, argument=True
    )
    out: str = option(
        "generator.safetensors",
        "Output file (--format diffusers / lora: an empty or new folder).",
        path=True,
        flags=("--out", "-o"),
        panel="Output",
    )
    ema: bool = option(True, "Export the EMA weights.", panel="Inputs")
    format: str = option(
        "safetensors",
        "safetensors (one file), diffusers (Stable Diffusion: a pipeline folder), or lora (a "
        "--lora-rank run: a folder with pytorch_lora_weights.safetensors for "
        "pipe.load_lora_weights).",
        choices=FORMATS,
        panel="Output",
    )
    # --format diffusers: the teacher pipeline to take the VAE/text encoder from
    teacher_path: str | None = option(
        None,
        "--format diffusers: the teacher pipeline (folder or hub id) to take the VAE, text "
        "encoder and tokenizer from (by default the one the generator records); also the base "
        "weights of a LoRA run's checkpoint.",
        path=True,
        panel="Inputs",
    )
    offline: bool = offline_option()

    def check(self) -> None:
        require(
            self.source is not None,
            "pass the run folder, checkpoint folder or generator file to export",
        )


HELP = """Export the distilled generator as one safetensors file (config in its metadata).

Example: [bold]dmdctl export runs/dmd -o generator.safetensors[/bold]

Stable Diffusion: [bold]dmdctl export runs/sd --format diffusers -o sd-dmd[/bold] writes a folder
that runs as StableDiffusionPipeline.from_pretrained("sd-dmd")(prompt, num_inference_steps=1,
guidance_scale=0).

LoRA runs (--lora-rank): [bold]dmdctl export runs/sd-lora --format lora -o sd-lora[/bold] writes
pytorch_lora_weights.safetensors for pipe.load_lora_weights("sd-lora") on the teacher's pipeline
(with LCMScheduler and the generator's timesteps: see the README.md written with it).
"""


SETTINGS = ExportConfig
