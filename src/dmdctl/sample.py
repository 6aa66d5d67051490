"""``dmdctl sample``: samples from a generator or from the teacher's sampler, as a file and a plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import write_config
from .errors import UserError, require
from .eval_fid import source_from
from .generator import generate
from .make_pairs import pick_device
from .ui import progress


@dataclass
class SampleConfig:
    generator: str | None = None
    teacher: str | None = None
    teacher_path: str | None = None
    steps: int = 18
    num: int = 2000
    seed: int = 0
    batch_size: int = 1000
    out: str = "samples"
    plot: bool = True
    class_label: int | None = None
    device: str = "auto"

    def validate(self) -> None:
        require(self.num > 0, f"--num must be positive, got {self.num}")
        require(self.steps > 0, f"--steps must be positive, got {self.steps}")
        require(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        require(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        require(
            self.generator is not None or self.teacher_path is not None or self.teacher is not None,
            "nothing to sample from: pass --generator FILE, or --teacher-path FILE with --steps N",
        )


def sample(cfg: SampleConfig) -> dict:
    source = source_from(cfg)
    labels = None
    if cfg.class_label is not None:
        k = source.num_classes
        if not 0 <= cfg.class_label < max(k, 1) or k == 0:
            raise UserError(
                f"--class {cfg.class_label} is out of range: this teacher has "
                + (f"classes 0..{k - 1}" if k else "no classes")
            )
        labels = torch.full((cfg.num,), cfg.class_label, dtype=torch.int64)
    device = pick_device(cfg.device)
    source.to(device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(cfg.seed, cfg.seed + cfg.num))
    with progress(transient=True) as bar:
        task = bar.add_task(f"sample {source.description}", total=cfg.num, info="")
        x, labels = generate(
            source,
            seeds,
            cfg.batch_size,
            labels,
            device=device,
            progress_cb=lambda n: bar.advance(task, n),
        )
    save_file(
        {"samples": x.contiguous(), "labels": labels, "seed": torch.tensor(seeds)},
        str(out / "samples.safetensors"),
        metadata={"source": source.description},
    )
    write_config(cfg, out)
    result = {
        "out": str(out / "samples.safetensors"),
        "num": cfg.num,
        "source": source.description,
        "nfe": source.nfe,
    }
    if cfg.plot:
        result["plot"] = str(
            source.kind.save_plot(
                [(source.description, x)], out / "samples.png", source.config, labels=labels
            )
        )
    return result
