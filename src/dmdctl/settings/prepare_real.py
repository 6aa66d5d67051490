"""``dmdctl prepare-real``: real images for DMD2's GAN, stored once as memory-mapped shards."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dmdctl.config import Settings
from dmdctl.errors import require
from dmdctl.options import option
from dmdctl.settings.common import (
    device_option,
    offline_option,
    teacher_option,
    teacher_path_option,
    video_size_option,
)


@dataclass
class PrepareRealConfig(Settings):
    """Settings of ``prepare-real``: which images, for which teacher, into which store."""

    source: str | None = option(
        None,
        "The real images: a folder with captions.jsonl (text-to-image), a plain image folder, "
        "an ADM/EDM-style .npz (arr_0 images, arr_1 labels), or Parquet file(s).",
        path=True,
        argument=True,
    )
    teacher: str | None = teacher_option()
    teacher_path: str | None = teacher_path_option()
    out: str = option(
        "runs/real",
        "Output folder: the store (shards and manifest.json).",
        path=True,
        panel="Output",
    )
    shard_size: int = option(
        4096, "Source records per shard (the unit of resume).", min=1, panel="Output"
    )
    batch_size: int = option(
        16,
        "Images per VAE encode batch (latent teachers).",
        min=1,
        panel="Device, precision and speed",
    )
    device: str = device_option()
    video_size: str | None = video_size_option()
    image_column: str = option(
        "image", "Parquet sources: the image column (struct with bytes, or binary).", panel="Inputs"
    )
    caption_column: str | None = option(
        None,
        "Parquet sources: the caption column (default: the first of caption, text, prompt "
        "that the files have).",
        panel="Inputs",
    )
    skip_bad_records: bool = option(
        False,
        "Skip images that fail to decode (each listed in the manifest) instead of stopping.",
        panel="Inputs",
    )
    offline: bool = offline_option()

    def check(self) -> None:
        from dmdctl.inputs import check_out_folder, check_teacher_path
        from dmdctl.runtime import check_device

        require(self.source is not None, "pass the real images (SOURCE) to prepare")
        check_device(self.device)
        check_teacher_path(self.teacher_path, self.teacher)
        check_out_folder(Path(self.out))


HELP = """Store real images once for DMD2's GAN loss (distill --real-data), read by row later.

SOURCE is a folder of images with captions.jsonl (one {"file": ..., "caption": ...} per line;
text-to-image teachers: the images are centre-cropped, resized to the teacher's resolution and
encoded by its VAE, stored as float16 latents with the caption text), a plain image folder
(unconditional pixel teachers; stored as uint8 pixels), an ADM/EDM-style .npz (arr_0 uint8
[N, H, W, C], arr_1 labels for class-conditional teachers; read in slices, never whole), or a
Parquet file or folder (an image column of encoded bytes, a caption column).

The store is a folder of Arrow IPC shards and manifest.json: every process of a run
memory-maps it and reads only the rows it draws. Re-running the same command after an
interruption makes only the missing shards; several processes split them:
[bold]torchrun --nproc_per_node 8 -m dmdctl prepare-real ...[/bold]

Example: [bold]dmdctl prepare-real data/laion --teacher sd15 --out runs/real[/bold]
"""


SETTINGS = PrepareRealConfig
