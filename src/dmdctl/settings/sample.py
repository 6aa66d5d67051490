"""``dmdctl sample``: samples from a generator or from the teacher's sampler."""

from __future__ import annotations

from dataclasses import dataclass

from dmdctl.config import Settings
from dmdctl.errors import require
from dmdctl.options import option
from dmdctl.settings.common import (
    GENERATOR_HELP,
    check_guide_net,
    device_option,
    guidance_option,
    guide_mode_option,
    guide_net_option,
    offline_option,
    prompts_option,
    teacher_option,
    teacher_path_option,
)

DEFAULT_NUM = 2000  # samples when --num is not given (text-to-image: one per prompt)
# --num not given with a single --prompt: this many images, or videos (a video costs far more)
PROMPT_IMAGES = 4
PROMPT_VIDEOS = 2


@dataclass
class SampleConfig(Settings):
    """Settings of ``sample``: the source, how many samples from which seeds, and where."""

    generator: str | None = option(None, GENERATOR_HELP, path=True, panel="Inputs")
    teacher: str | None = teacher_option()
    teacher_path: str | None = teacher_path_option()
    steps: int = option(18, "Heun steps when sampling the teacher.", min=1, panel="Sampling")
    guide_net: str | None = guide_net_option()
    guide_mode: str = guide_mode_option()
    guidance: float = guidance_option()
    # None: DEFAULT_NUM, or for text-to-image and video one per prompt of a file (for a single
    # --prompt: PROMPT_IMAGES images or PROMPT_VIDEOS videos)
    num: int | None = option(
        None,
        "Number of samples.",
        min=1,
        show_default=f"{DEFAULT_NUM}; text-to-image and video: one per prompt of --prompts; for "
        f"--prompt {PROMPT_IMAGES} images or {PROMPT_VIDEOS} videos",
        panel="Sampling",
    )
    seed: int = option(0, "First seed; sample i uses seed+i.", min=0, panel="Sampling")
    batch_size: int = option(1000, "Batch size.", min=1, panel="Sampling")
    out: str = option(
        "samples", "Output folder (samples.safetensors, samples.png).", path=True, panel="Output"
    )
    plot: bool = option(True, "Write a PNG of the samples.", panel="Output")
    class_label: int | None = option(
        None,
        "Sample only this class (class-conditional teachers).",
        flags=("--class",),
        panel="Sampling",
    )
    device: str = device_option()
    prompt: str | None = option(
        None,
        "Text-to-image and video generators: one prompt for every image or video.",
        panel="Inputs",
    )
    prompts: str | None = prompts_option()
    offline: bool = offline_option()

    def check(self) -> None:
        check_guide_net(self)
        require(
            self.generator is not None or self.teacher_path is not None or self.teacher is not None,
            "nothing to sample from: pass --generator FILE, or --teacher-path FILE with --steps N",
        )


HELP = """Draw samples from a generator or from the teacher's sampler.

Example: [bold]dmdctl sample --generator runs/dmd/generator.safetensors --num 2000 --out samples[/bold]

Text-to-image: [bold]dmdctl sample --generator runs/sd/generator.safetensors --prompts prompts.txt --out imgs[/bold]
writes imgs/images/NNNNN.png (image i: prompt i, seed --seed+i) and imgs/images.jsonl.
"""


SETTINGS = SampleConfig
