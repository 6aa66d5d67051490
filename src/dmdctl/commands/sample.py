"""``dmdctl sample``: samples from a generator or from the teacher's sampler, as a file and a plot."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from dmdctl.commands import show
from dmdctl.config import write_config
from dmdctl.errors import UserError, require
from dmdctl.generators import generate, source_from
from dmdctl.runtime import is_main_launch_process, pick_device
from dmdctl.settings.sample import DEFAULT_NUM, PROMPT_IMAGES, PROMPT_VIDEOS, SampleConfig
from dmdctl.ui import progress


def sample(cfg: SampleConfig, source=None) -> dict:
    """``source``: the generator or sampler ``cfg`` names, when the caller has loaded it."""
    if not is_main_launch_process():
        # several processes launched (torchrun, accelerate launch): sample does not split its
        # work, so the main one draws every sample alone and the others leave its files alone
        return {}
    if cfg.generator is None and cfg.teacher is not None:
        from dmdctl.teachers import get_kind

        require(
            not get_kind(cfg.teacher).text_to_image,
            "sampling a text-to-image teacher itself is left to its pipeline; pass --generator",
        )
    source = source or source_from(cfg)
    if source.kind.video:
        return sample_text_to_video(cfg, source)
    if source.kind.text_to_image:
        return sample_text_to_image(cfg, source)
    require(
        cfg.prompt is None and cfg.prompts is None,
        "--prompt/--prompts are for text-to-image generators",
    )
    if cfg.num is None:  # not given
        cfg = replace(cfg, num=DEFAULT_NUM)
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


class _Cycled:
    """Prompt i of a run of ``num`` images: row ``i % len(rows)`` (read when needed)."""

    def __init__(self, rows):
        self.rows = rows

    def __getitem__(self, i: int) -> str:
        return self.rows[i % len(self.rows)]


def _check_prompt_flags(cfg: SampleConfig, what: str) -> None:
    """A prompted (text-to-image or video) generator takes one of --prompt and --prompts."""
    require(
        (cfg.prompt is None) != (cfg.prompts is None),
        f"a {what} generator needs --prompt TEXT or --prompts FILE (one of them)",
    )
    require(cfg.class_label is None, "--class is for class-conditional generators")


def _prompt_plan(cfg: SampleConfig, single: int) -> tuple[_Cycled, int, list[int]]:
    """(prompt of sample i, how many samples, seed of sample i): --num defaults to one sample
    per prompt of a --prompts file, ``single`` for a --prompt."""
    from dmdctl.data.prompts import PromptFile

    rows = [cfg.prompt] if cfg.prompt is not None else PromptFile(cfg.prompts)
    num = cfg.num
    if num is None:  # not given
        num = len(rows) if cfg.prompts is not None else single
    return _Cycled(rows), num, list(range(cfg.seed, cfg.seed + num))


def _write_indexed(cfg: SampleConfig, source, sub: str, num: int, batches, save, keep: int):
    """Runs ``batches`` under a progress bar: ``save(i, item)`` writes sample i under
    ``OUT/sub/`` and returns its row of ``OUT/sub.jsonl`` (written as .tmp, renamed when
    complete), then the run's config. Returns the command's result and the first ``keep``
    samples (for the plot)."""
    out = Path(cfg.out)
    (out / sub).mkdir(parents=True, exist_ok=True)
    kept = []
    index = out / f"{sub}.jsonl"
    tmp = index.with_name(index.name + ".tmp")
    with progress(transient=True) as bar, open(tmp, "w", encoding="utf-8") as lines:
        task = bar.add_task(f"sample {source.description}", total=num, info="")
        i = 0
        for batch in batches:
            for item in batch:
                lines.write(json.dumps(save(i, item)) + "\n")
                if len(kept) < keep:
                    kept.append(item)
                i += 1
            bar.advance(task, batch.shape[0])
    tmp.replace(index)
    write_config(cfg, out)
    result = {
        "out": str(out / sub),
        "num": num,
        "source": source.description,
        "nfe": source.nfe,
        "index": str(index),
    }
    return result, kept


def sample_text_to_image(cfg: SampleConfig, source) -> dict:
    """PNG files (and a grid) from a one-step Stable Diffusion generator, written batch by
    batch: memory does not grow with the number of prompts or images."""
    from PIL import Image

    from dmdctl.plots import image_grid_panels
    from dmdctl.teachers.sd.generate import pipeline_folder_for, text_to_image_batches

    _check_prompt_flags(cfg, "text-to-image")
    prompts, num, seeds = _prompt_plan(cfg, PROMPT_IMAGES)
    folder = pipeline_folder_for(source.config, cfg.teacher_path, cfg.offline)
    device = pick_device(cfg.device)
    out = Path(cfg.out)

    def save(i: int, img: torch.Tensor) -> dict:
        name = f"images/{i:05d}.png"
        arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(out / name)
        return {"file": name, "seed": seeds[i], "prompt": prompts[i]}

    batches = text_to_image_batches(
        source.fn, folder, source.config, prompts, seeds, device, min(cfg.batch_size, 16)
    )
    result, grid = _write_indexed(cfg, source, "images", num, batches, save, keep=16)
    if cfg.plot:
        result["plot"] = str(
            image_grid_panels(
                [(source.description, torch.stack(grid) * 2 - 1)],
                out / "samples.png",
                None,
                per_row=8,
                scale=1,
            )
        )
    return result


def sample_text_to_video(cfg: SampleConfig, source) -> dict:
    """Videos from a Wan generator: per video an mp4 and a PNG strip of its frames, written one
    batch at a time; ``videos.jsonl`` indexes them with their seeds and prompts."""
    from dmdctl.teachers.sd.generate import pipeline_folder_for
    from dmdctl.teachers.wan.generate import (
        check_mp4_writer,
        save_video_grid,
        text_to_video_batches,
        write_mp4,
        write_strip,
    )

    _check_prompt_flags(cfg, "text-to-video")
    check_mp4_writer()
    prompts, num, seeds = _prompt_plan(cfg, PROMPT_VIDEOS)
    folder = pipeline_folder_for(source.config, cfg.teacher_path, cfg.offline)
    device = pick_device(cfg.device)
    out = Path(cfg.out)

    def save(i: int, video: torch.Tensor) -> dict:
        name = f"videos/{i:05d}"
        write_mp4(video, out / f"{name}.mp4")
        frames = write_strip(video, out / f"{name}.png")
        return {"file": f"{name}.mp4", "strip": f"{name}.png", "strip_frames": frames,
                "seed": seeds[i], "prompt": prompts[i]}  # fmt: skip

    batches = text_to_video_batches(
        source.fn, folder, source.config, prompts, seeds, device, min(cfg.batch_size, 4)
    )
    result, grid = _write_indexed(cfg, source, "videos", num, batches, save, keep=8)
    if cfg.plot:
        panel = [(source.description, torch.stack(grid) * 2 - 1)]
        result["plot"] = str(save_video_grid(panel, out / "samples.png"))
    return result


def run(cfg: SampleConfig) -> int | None:
    """Run the command on resolved settings (its help: :data:`dmdctl.settings.sample.HELP`)."""

    result = sample(cfg)
    if result:  # the other processes of a launch print nothing
        show("sample", result)
    return None
