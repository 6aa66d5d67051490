"""``--report-to tensorboard|wandb``: the run's numbers in the tools users already watch.

Through Accelerate's trackers (``Accelerator(log_with=...)``, ``init_trackers``, ``log``,
``end_training``), as the diffusers and accelerate training scripts do. ``log.jsonl`` stays the
record of the run: the trackers get a copy of each of its rows (the numeric values), the sample
plots written at each checkpoint as images, and the resolved config as hyper-parameters. With
``--report-to none`` (the default) nothing is imported or contacted; TensorBoard writes local
files only; wandb is contacted only when asked, and runs offline with ``WANDB_MODE=offline``.
Only the main process reports.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from dmdctl.errors import UserError
from dmdctl.settings.common import REPORT_TO  # the choices of --report-to, declared once

FOLDER = "trackers"  # under the run folder: <out>/trackers/<project>/ (TensorBoard event files)


def check_report_to(value: str) -> None:
    if value not in REPORT_TO:
        raise UserError(f"--report-to must be one of {', '.join(REPORT_TO)}, got '{value}'")
    if value == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise UserError(
            "--report-to tensorboard needs the tensorboard package: pip install tensorboard"
        )
    if value == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UserError("--report-to wandb needs the wandb package: pip install wandb")


def accelerator_kwargs(report_to: str, out: Path) -> dict:
    """What ``Accelerator(...)`` needs to build the trackers (nothing for ``none``)."""
    if report_to == "none":
        return {}
    return {"log_with": report_to, "project_dir": str(Path(out) / FOLDER)}


def hyperparameters(config: dict) -> dict:
    """TensorBoard's hparams accept numbers, strings and booleans only."""
    flat = {}
    for k, v in config.items():
        if v is None:
            flat[k] = "none"
        elif isinstance(v, (bool, int, float, str)):
            flat[k] = v
        else:
            flat[k] = str(v)
    return flat


def scalars(row: dict) -> dict:
    """The numeric values of a log.jsonl row (not its step, warnings or non-finite values)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step"
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


class RunTrackers:
    """The trackers of one run: ``log(row)`` beside every log.jsonl row, ``image(path, step)``
    beside every sample plot, :meth:`release` at the end (``end_training``)."""

    def __init__(self, accelerator, report_to: str, project: str, config: dict, out: Path):
        self.acc = accelerator
        self.on = report_to != "none"
        if not self.on:
            return
        init_kwargs = {"wandb": {"dir": str(Path(out)), "name": Path(out).name}}
        accelerator.init_trackers(project, config=hyperparameters(config), init_kwargs=init_kwargs)

    def log(self, row: dict) -> None:
        if self.on and "step" in row:
            values = scalars(row)
            if values:
                self.acc.log(values, step=int(row["step"]))

    def image(self, path: Path | None, step: int, name: str = "samples") -> None:
        if not self.on or path is None or not Path(path).is_file():
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({name: pixels[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({name: [pixels]}, step=step)

    def release(self) -> None:
        if self.on:
            self.on = False
            self.acc.end_training()


def standalone(report_to: str, project: str, config: dict, out: Path) -> RunTrackers:
    """Trackers for a command that trains without an Accelerator of its own (train-teacher):
    one is made for the trackers only when asked."""
    if report_to == "none":
        return RunTrackers(None, "none", project, config, out)
    from accelerate import Accelerator

    acc = Accelerator(**accelerator_kwargs(report_to, out))
    return RunTrackers(acc, report_to, project, config, out)
