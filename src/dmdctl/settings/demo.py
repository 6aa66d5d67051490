"""``dmdctl demo``: the whole method end to end on a built-in teacher, in minutes on a CPU."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dmdctl.config import Settings
from dmdctl.options import option

# each demo's settings (the preset layer of DemoConfig); the runs it makes are in dmdctl.commands.demo
DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    "toy2d": dict(
        teacher_steps=8000,
        num_pairs=128,
        distill_steps=2000,
        lr=1e-3,
        eval_samples=10000,
        batch_size=512,
        reg_loss="l2",
        reg_weight=0.25,
        fake_updates=1,
        warmup=100,
    ),
    "digits": dict(
        teacher_steps=0,
        num_pairs=10000,
        distill_steps=200,
        lr=1e-4,
        fake_updates=3,
        warmup=20,
        eval_samples=1000,
        batch_size=64,
        reg_loss="l2",
        reg_weight=4.0,
    ),
}


def distill_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``DistillConfig`` settings that a demo's values give each of its runs (the runs'
    own overrides aside); the digits benchmarks train with the same ones."""
    v = values
    return dict(lr=v["lr"], fake_lr=v["lr"], batch_size=v["batch_size"],
                pair_batch_size=v["batch_size"], reg_loss=v["reg_loss"],
                reg_weight=v["reg_weight"], fake_updates=v["fake_updates"], warmup=v["warmup"])  # fmt: skip


def run_settings(base: Any, name: str, overrides: Mapping[str, Any], folder: Path) -> Any:
    """``base`` (a ``DistillConfig``) with run ``name``'s overrides, its output ``folder/name``.

    ``init_from_run`` names an earlier run in ``folder`` whose generator this run starts from
    (``--init-from``: DMD2's two-stage recipes); a run without the regression loss is not handed
    the pairs (distill would warn that they go unused)."""
    o = dict(overrides)
    first = o.pop("init_from_run", None)
    if first is not None:
        o["init_from"] = str(folder / first)
    if o.get("reg_weight", base.reg_weight) == 0:
        o.setdefault("pairs", None)
    return replace(base, out=str(folder / name), **o)


# DMD2 on the built-in teachers (docs/RECIPES.md, "Built-in teachers: DMD2"): no regression;
# DMD2 ImageNet-64's GAN weights; fake-score updates per generator update: DMD2 ImageNet's 5 on
# toy2d, the digits demo's 3 on digits (5 would lengthen the demo further); the 4-step generator's
# sigmas are those of DMD2's SD timesteps 999/749/499/249 in units of the data's std (ours)
DMD2_RUN = dict(reg_weight=0.0, gan_weight=3e-3, gan_classifier_weight=1e-2)
# DMD2's one-step SDXL recipe starts the generator from a regression-pretrained one (docs/
# RECIPES.md, "sdxl-1step"); on digits: the regression-only run on the same pairs (ours, issue 26)
DMD2_FROM_REGRESSION = dict(DMD2_RUN, init_from_run="dmd_reg_only")
DMD2_FAKE_UPDATES = {"toy2d": 5, "digits": 3}
DMD2_4STEP_SIGMAS = "80,2,0.8,0.35"


def per_demo(name: str) -> str:
    """A setting's value for each demo, as ``--help`` shows it: ``toy2d 2000, digits 200``."""
    return ", ".join(f"{demo} {values[name]:g}" if isinstance(values[name], float)
                     else f"{demo} {values[name]}" for demo, values in DEMO_DEFAULTS.items())  # fmt: skip


@dataclass
class DemoConfig(Settings):
    """Settings of ``demo``; None means the chosen demo's own value (:data:`DEMO_DEFAULTS`)."""

    teacher: str = option(
        "digits",
        "Which demo: digits (8x8 images, about 4 min) or toy2d (2-D points, about 2 min).",
        choices=tuple(DEMO_DEFAULTS),
        argument=True,
    )
    out: str = option("dmdctl-demo", "Output folder.", path=True, panel="Output")
    teacher_steps: int | None = option(
        None,
        "Teacher training steps; 0 uses the shipped teacher.",
        min=0,
        show_default=per_demo("teacher_steps"),
        panel="Training",
    )
    num_pairs: int | None = option(
        None, "Regression pairs.", min=1, show_default=per_demo("num_pairs"), panel="Training"
    )
    distill_steps: int | None = option(
        None,
        "Steps of each distillation run.",
        min=1,
        show_default=per_demo("distill_steps"),
        panel="Training",
    )
    lr: float | None = option(
        None,
        "Learning rate of the generator and the fake score.",
        above=0,
        show_default=per_demo("lr"),
        panel="Training",
    )
    batch_size: int | None = option(
        None,
        "Generator and pair batch size.",
        min=1,
        cli=False,
        show_default=per_demo("batch_size"),
        panel="Training",
    )
    reg_loss: str | None = option(
        None, "Regression loss.", cli=False, show_default=per_demo("reg_loss"), panel="Training"
    )
    reg_weight: float | None = option(
        None,
        "Weight of the regression loss in the DMD run.",
        min=0,
        cli=False,
        show_default=per_demo("reg_weight"),
        panel="Training",
    )
    fake_updates: int | None = option(
        None,
        "Fake-score updates per step.",
        min=1,
        cli=False,
        show_default=per_demo("fake_updates"),
        panel="Training",
    )
    warmup: int | None = option(
        None,
        "Learning-rate warm-up steps.",
        min=0,
        cli=False,
        show_default=per_demo("warmup"),
        panel="Training",
    )
    eval_samples: int | None = option(
        None,
        "Samples per evaluation.",
        min=1,
        show_default=per_demo("eval_samples"),
        panel="Evaluation",
    )
    seed: int = option(0, "Random seed.", min=0, panel="Training")
    all_runs: bool = option(
        False,
        "Digits: also distil the DMD2 4-step generator (a third run, a few minutes more).",
        panel="Training",
    )

    @staticmethod
    def preset_layer(values: dict[str, Any]) -> dict[str, Any]:
        return dict(DEMO_DEFAULTS.get(values.get("teacher", DemoConfig.teacher), {}))


HELP = """The whole method end to end in minutes on a CPU: teacher → pairs → DMD → evaluation → export.

Example: [bold]dmdctl demo --out dmdctl-demo[/bold]
"""


SETTINGS = DemoConfig
