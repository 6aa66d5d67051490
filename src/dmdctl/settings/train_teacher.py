"""``dmdctl train-teacher``: train a built-in teacher from its own data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dmdctl.config import Settings
from dmdctl.options import option
from dmdctl.settings.common import report_to_option


@dataclass
class TrainTeacherConfig(Settings):
    """Settings of ``train-teacher``: EDM denoising score matching on a built-in data set."""

    teacher: str = option(
        "toy2d", "Built-in teacher preset: toy2d, toy2d-unbalanced or digits.", argument=True
    )
    out: str = option(
        "runs/teacher",
        "Output folder (teacher.safetensors, config.toml).",
        path=True,
        panel="Output",
    )
    # None until the preset layer fills in the teacher kind's own value
    steps: int | None = option(
        None, "Training steps.", min=1, show_default="toy2d 8000, digits 5000", panel="Training"
    )
    batch_size: int | None = option(
        None, "Batch size.", min=1, show_default="toy2d 512, digits 128", panel="Training"
    )
    lr: float | None = option(
        None, "Peak learning rate (Adam, cosine decay).", above=0,
        show_default="toy2d 0.002, digits 0.0005", panel="Training",
    )  # fmt: skip
    warmup: int = option(
        200, "Linear learning-rate warm-up, in steps.", min=0, cli=False, panel="Training"
    )
    ema_decay: float = option(
        0.999, "EMA decay of the saved weights.", min=0, below=1, panel="Training"
    )
    p_mean: float = option(
        -1.2, "Mean of log sigma of the training noise (EDM).", cli=False, panel="Training"
    )
    p_std: float = option(
        1.2, "Std of log sigma of the training noise (EDM).", above=0, cli=False, panel="Training"
    )
    seed: int = option(0, "Random seed.", min=0, panel="Training")
    report_to: str = report_to_option()

    @staticmethod
    def preset_layer(values: dict[str, Any]) -> dict[str, Any]:
        """The teacher kind's training defaults (``TeacherKind.train_defaults``)."""
        from dmdctl.errors import UserError
        from dmdctl.teachers import get_kind

        try:
            kind = get_kind(str(values.get("teacher", TrainTeacherConfig.teacher)))
        except UserError:
            return {}  # reported, with the known names, when the command runs
        return dict(kind.train_defaults)

    def check(self) -> None:
        from dmdctl.training.trackers import check_report_to

        check_report_to(self.report_to)


HELP = """Train a built-in teacher (EDM denoiser) from its own data.

Example: [bold]dmdctl train-teacher toy2d --out runs/teacher[/bold]
"""


SETTINGS = TrainTeacherConfig
