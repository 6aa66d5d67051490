"""``dmdctl clip-score``: CLIP score of a folder of images against their prompts."""

from __future__ import annotations

from dataclasses import dataclass

from dmdctl.config import Settings
from dmdctl.errors import require
from dmdctl.options import option
from dmdctl.settings.common import device_option, offline_option


@dataclass
class ClipScoreConfig(Settings):
    """Settings of ``clip-score``: the images, their prompts, the CLIP model and its input size."""

    images: str | None = option(
        None, "Folder of images to score (searched recursively).", path=True, panel="Inputs"
    )
    prompts: str | None = option(
        None,
        "The images.jsonl `dmdctl sample --prompts` wrote (each image with its prompt), or one "
        "prompt per line for the folder's images in sorted order.",
        path=True,
        panel="Inputs",
    )
    clip_model: str | None = option(
        None,
        "A transformers CLIPModel folder or hub id, with its processor (e.g. "
        "laion/CLIP-ViT-g-14-laion2B-s12B-b42K, the OpenCLIP model GigaGAN and DMD2 use).",
        panel="Evaluation",
    )
    prefix: str = option(
        "", 'Text put before every prompt (GigaGAN/DMD2: "A photo depicts ").', panel="Evaluation"
    )
    resize: int = option(
        0, "Centre-crop and LANCZOS-resize to this size first (0: none).", min=0, panel="Evaluation"
    )
    batch_size: int = option(64, "Batch size.", min=1, panel="Device, precision and speed")
    device: str = device_option()
    offline: bool = offline_option()
    json: str | None = option(None, "Write the result as JSON here.", path=True, panel="Output")

    def check(self) -> None:
        require(self.images is not None, "pass --images FOLDER (the images to score)")
        require(
            self.prompts is not None,
            "pass --prompts FILE (one prompt per line, or the images.jsonl of `dmdctl sample`)",
        )
        require(
            self.clip_model is not None,
            "pass --clip-model PATH_OR_HUB_ID (a transformers CLIPModel with its processor)",
        )


HELP = """CLIP score (mean image-prompt cosine similarity) of a folder of images.

Example: [bold]dmdctl sample --generator sd-gen.safetensors --prompts captions.txt --out imgs &&
dmdctl clip-score --images imgs/images --prompts imgs/images.jsonl --clip-model CLIP_DIR[/bold]
"""


SETTINGS = ClipScoreConfig
