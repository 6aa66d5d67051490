"""What several commands' settings share: the teacher, device, prompt, network and tracker options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dmdctl.errors import require
from dmdctl.options import option

TEACHER_HELP = "Teacher kind or preset (e.g. toy2d, sd15); checked against the file."
TEACHER_PATH_HELP = (
    "Teacher weights: a dmdctl teacher .safetensors; for --teacher sd15 a diffusers pipeline "
    "folder or hub id (sd15: stable-diffusion-v1-5/stable-diffusion-v1-5)."
)
PROMPTS_HELP = (
    "Text-to-image teachers: prompts file, one per line, JSONL with a 'caption' field, or an "
    "Arrow/Parquet file with a text column; indexed, never read whole."
)
PROMPT_COLUMN_HELP = (
    "The text column of an Arrow/Parquet prompts file (default: caption, prompt or text)."
)
OFFLINE_HELP = "Never touch the network (as HF_HUB_OFFLINE=1): hub ids must be in the local cache."
DEVICE_HELP = "Device: auto, cpu, cuda, cuda:1 …"
GENERATOR_HELP = "Generator file (export) or distill run folder."
REPORT_TO_HELP = (
    "Also report to tensorboard (event files in OUT/trackers/) or wandb: the logged values, "
    "distill's sample plots, the config."
)
REPORT_TO = ("none", "tensorboard", "wandb")
DEVICE_PANEL = "Device, precision and speed"


def teacher_option() -> Any:
    return option(None, TEACHER_HELP, panel="Inputs")


def teacher_path_option() -> Any:
    return option(None, TEACHER_PATH_HELP, path=True, panel="Inputs")


GUIDE_NET_HELP = (
    "EDM2 teachers: sample the teacher guided by this second network (a converted EDM2 "
    "teacher file), D_g + w (D - D_g) with w = --guidance: an unconditional net gives "
    "classifier-free guidance, a smaller or less-trained conditional one autoguidance."
)
GUIDE_MODE_HELP = (
    "EDM2 teachers: cfg (the guiding net is unconditional and gets no labels), autoguidance "
    "(it is conditional and gets the labels), or auto (by its classes)."
)


GUIDANCE_HELP = (
    "EDM2 teachers: the guidance scale w with --guide-net (1: the teacher alone; EDM2's "
    "published settings: docs/guide/edm.md)."
)


def guide_net_option(help: str = GUIDE_NET_HELP, panel: str = "Sampling") -> Any:
    return option(None, help, path=True, panel=panel)


def guidance_option() -> Any:
    return option(1.0, GUIDANCE_HELP, min=1, panel="Sampling")


def check_guide_net(cfg) -> None:
    """What sampling the teacher guided by ``--guide-net`` needs (``sample``, ``eval-fid``):
    the teacher's sampler, a guidance scale only with a guiding net, and its file."""
    require(
        cfg.guide_net is None or cfg.generator is None,
        "--guide-net guides the teacher's sampler: pass --teacher-path, not --generator",
    )
    require(
        cfg.guidance == 1.0 or cfg.guide_net is not None,
        f"--guidance {cfg.guidance:g} needs --guide-net FILE (the guiding EDM2 network)",
    )
    require(
        cfg.guide_net is None or Path(cfg.guide_net).is_file(),
        f"--guide-net {cfg.guide_net}: no such file (pass a teacher file from convert-edm)",
    )


def guide_mode_option(help: str = GUIDE_MODE_HELP, panel: str = "Sampling") -> Any:
    return option("auto", help, choices=("auto", "cfg", "autoguidance"), panel=panel)


def prompts_option() -> Any:
    return option(None, PROMPTS_HELP, path=True, panel="Inputs")


def prompt_column_option() -> Any:
    return option(None, PROMPT_COLUMN_HELP, panel="Inputs")


def offline_option(help: str = OFFLINE_HELP) -> Any:
    return option(False, help, panel="Inputs")


NO_T5_HELP = (
    "SD3 teachers: leave out the T5 text encoder (the largest of the three), as diffusers' "
    "pipeline does with text_encoder_3=None: T5's tokens are zeros; sample and export follow."
)


def no_t5_option() -> Any:
    return option(False, NO_T5_HELP, panel="Inputs")


VIDEO_SIZE_HELP = (
    "Video teachers (Wan): FRAMESxHEIGHTxWIDTH of the videos (frames 4k+1, sides multiples of "
    "16); recorded with the run, pairs and real data. Default: WanPipeline's 81x480x832."
)


def video_size_option() -> Any:
    return option(None, VIDEO_SIZE_HELP, panel="Inputs")


def device_option() -> Any:
    return option("auto", DEVICE_HELP, panel=DEVICE_PANEL)


def report_to_option(panel: str = "Checkpoints and logging") -> Any:
    return option("none", REPORT_TO_HELP, choices=REPORT_TO, panel=panel)
