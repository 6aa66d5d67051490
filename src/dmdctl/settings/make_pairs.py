"""``dmdctl make-pairs``: the teacher's deterministic sampler on seeded noise, stored as pairs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmdctl.config import Settings
from dmdctl.options import option
from dmdctl.settings.common import (
    device_option,
    no_t5_option,
    offline_option,
    prompt_column_option,
    prompts_option,
    teacher_option,
    teacher_path_option,
    video_size_option,
)

STORAGE_DTYPES = ("float32", "float16", "bfloat16")
SCHEDULERS = ("pndm", "ddim", "euler", "euler-trailing", "flow-euler", "unipc")


@dataclass
class MakePairsConfig(Settings):
    """Settings of ``make-pairs``: which teacher, how many pairs, which sampler, where."""

    teacher: str | None = teacher_option()
    teacher_path: str | None = teacher_path_option()
    out: str = option(
        "runs/pairs", "Output folder for shards and manifest.json.", path=True, panel="Output"
    )
    num_pairs: int = option(4096, "Number of noise→sample pairs.", min=1, panel="Sampling")
    seed: int = option(0, "First seed; pair i uses seed+i.", min=0, panel="Sampling")
    steps: int = option(
        0,
        "Sampler steps: Heun steps N (NFE = 2N-1) for image and toy teachers, scheduler steps "
        "for Stable Diffusion; 0: the teacher's own (18 Heun steps; 50 for Stable Diffusion).",
        min=0,
        panel="Sampling",
    )
    rho: float = option(
        7.0, "Karras schedule exponent of the Heun sampler.", above=0, cli=False, panel="Sampling"
    )
    shard_size: int = option(1024, "Pairs per shard (the unit of resume).", min=1, panel="Output")
    batch_size: int = option(1024, "Sampler batch size.", min=1, panel="Sampling")
    dtype: str = option(
        "float32", "Storage dtype of the targets.", choices=STORAGE_DTYPES, panel="Output"
    )
    device: str = device_option()
    prompts: str | None = prompts_option()
    prompt_column: str | None = prompt_column_option()
    scheduler: str = option(
        "pndm",
        "Text-to-image teachers: the sampler (diffusers' scheduler of that name, from the "
        "pipeline's scheduler config; euler-trailing: Euler with trailing timestep spacing, "
        "DMD2's SDXL pair sampler; flow-euler: SD3's and FLUX's FlowMatchEulerDiscreteScheduler; "
        "unipc: Wan's UniPCMultistepScheduler in flow mode). The "
        "teacher's pairs recipe sets it when not given.",
        choices=SCHEDULERS,
        panel="Sampling",
    )
    # None: no guidance, unless the teacher's pairs recipe (preset layer) sets it
    guidance: float | None = option(
        None,
        "Text-to-image teachers: CFG scale (1: none), by default the pairs recipe's (the DMD "
        "paper's, equal to its real score's guidance); FLUX.1-dev: the transformer's guidance "
        "input (one pass).",
        min=1,
        show_default="sd15 3.0, sd15-dmd 3.0, sdxl 8.0, sd3 7.0, flux-dev 3.5",
        panel="Sampling",
    )
    save_images: bool = option(
        False, "Text-to-image teachers: also store the decoded images (uint8).", panel="Output"
    )
    no_t5: bool = no_t5_option()
    video_size: str | None = video_size_option()
    offline: bool = offline_option()

    @staticmethod
    def preset_layer(values: dict[str, Any]) -> dict[str, Any]:
        """The pairs recipe of the named preset, or of the first preset of its kind that has one."""
        from dmdctl.teachers import preset_of

        found = preset_of(values.get("teacher"), values.get("teacher_path"))
        if found is None:
            return {}
        kind, name = found
        presets = kind.presets()
        arch = presets.get(name, {}).get("arch")
        for key in [name, *presets]:  # a sibling's recipe only for the same architecture
            if presets.get(key, {}).get("arch") != arch:
                continue
            pairs = presets.get(key, {}).get("pairs")
            if pairs is not None:
                return dict(pairs)
        return {}

    def check(self) -> None:
        from dmdctl.inputs import check_out_folder, check_teacher_path
        from dmdctl.runtime import check_device

        check_device(self.device)
        check_teacher_path(self.teacher_path, self.teacher)
        check_out_folder(Path(self.out))


HELP = """Run the teacher's deterministic ODE sampler on seeded noise and store the pairs.

--steps 0 (the default) uses the teacher's own default: 18 Heun steps (35 NFE) for the
built-in teachers, 50 scheduler steps for Stable Diffusion. For --teacher sd15 the pairs are
latents from the pipeline's scheduler with CFG; pair i uses prompt i mod the prompt count.

Re-running the same command after an interruption (Ctrl-C, SIGTERM, a crash) makes only the
missing shards. Several processes split the shards: [bold]accelerate launch --num_processes 8 -m dmdctl make-pairs ...[/bold]

Example: [bold]dmdctl make-pairs --teacher-path runs/teacher/teacher.safetensors --num-pairs 4096 --out runs/pairs[/bold]
"""


SETTINGS = MakePairsConfig
