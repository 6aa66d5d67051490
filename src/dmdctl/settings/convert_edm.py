"""``dmdctl convert-edm``: an NVlabs EDM or EDM2 pickle -> a dmdctl teacher safetensors file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dmdctl.config import Settings
from dmdctl.errors import require
from dmdctl.options import option


@dataclass
class ConvertEdmConfig(Settings):
    """Settings of ``convert-edm``: the pickle, the entry to read, the teacher file to write."""

    source: str | None = option(
        None,
        "NVlabs EDM or EDM2 network pickle, e.g. edm-imagenet-64x64-cond-adm.pkl, "
        "edm2-img512-s-2147483-0.070.pkl.",
        path=True,
        argument=True,
    )
    out: str = option(
        "teacher.safetensors",
        "Teacher file to write.",
        path=True,
        flags=("--out", "-o"),
        panel="Output",
    )
    entry: str = option("ema", "Which network of the pickle to convert.", panel="Inputs")
    vae: str | None = option(
        None,
        "EDM2 ImageNet-512 (latent) networks: the VAE to record instead of the pickle's "
        "(stabilityai/sd-vae-ft-mse): a local AutoencoderKL folder, a pipeline folder with "
        "vae/, or a hub id.",
        panel="Inputs",
    )

    def check(self) -> None:
        require(self.source is not None, "pass the EDM checkpoint (.pkl) to convert")
        require(
            Path(self.out).suffix == ".safetensors",
            f"-o {self.out}: the teacher is written as safetensors; name it *.safetensors",
        )
        require(not Path(self.out).is_dir(), f"-o {self.out} is a folder; give a file name in it")


HELP = """Convert an NVlabs EDM or EDM2 checkpoint into a dmdctl teacher (safetensors), without running its code.

The pickle is read as data by a restricted unpickler: its embedded Python source is never
executed, and anything outside the EDM or EDM2 network format is refused. An EDM2 pickle
becomes an edm2 teacher with its encoder (the VAE and latent scaling of ImageNet-512 nets).

Example: [bold]dmdctl convert-edm edm-imagenet-64x64-cond-adm.pkl -o teacher.safetensors[/bold]
"""


SETTINGS = ConvertEdmConfig
