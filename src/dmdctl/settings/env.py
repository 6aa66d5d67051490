"""``dmdctl env``: the versions, devices and folders a bug report needs."""

from __future__ import annotations

from dataclasses import dataclass

from dmdctl.config import Settings
from dmdctl.options import option


@dataclass
class EnvConfig(Settings):
    """Settings of ``env``: only how the report is printed."""

    json: bool = option(False, "Print the report as one JSON object.", panel="Output")


HELP = """Print the versions, devices and folders a bug report needs.

dmdctl, Python and the libraries it runs on, the platform, the devices torch sees and their
memory, the Accelerate config found, the cache folders and whether offline mode is on
(HF_HUB_OFFLINE). Touches no network and needs no GPU.

Example: [bold]dmdctl env[/bold] (paste its lines into the issue), or [bold]dmdctl env --json[/bold]
"""


SETTINGS = EnvConfig
