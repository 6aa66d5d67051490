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


def sample_text_to_image(cfg: SampleConfig, source) -> dict:
    """PNG files (and a grid) from a one-step Stable Diffusion generator, written batch by
    batch: memory does not grow with the number of prompts or images."""
    from PIL import Image

    from dmdctl.data.prompts import PromptFile
    from dmdctl.plots import image_grid_panels
    from dmdctl.teachers.sd.generate import pipeline_folder_for, text_to_image_batches

    require(
        (cfg.prompt is None) != (cfg.prompts is None),
        "a text-to-image generator needs --prompt TEXT or --prompts FILE (one of them)",
    )
    require(cfg.class_label is None, "--class is for class-conditional generators")
    rows = [cfg.prompt] if cfg.prompt is not None else PromptFile(cfg.prompts)
    # --num defaults to one image per prompt of a file (PROMPT_IMAGES for a single --prompt)
    num = cfg.num
    if num is None:  # not given
        num = len(rows) if cfg.prompts is not None else PROMPT_IMAGES
    folder = pipeline_folder_for(source.config, cfg.teacher_path, cfg.offline)
    device = pick_device(cfg.device)
    seeds = list(range(cfg.seed, cfg.seed + num))
    prompts = _Cycled(rows)
    out = Path(cfg.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    grid = []
    index = out / "images.jsonl"
    tmp = index.with_name(index.name + ".tmp")
    with progress(transient=True) as bar, open(tmp, "w", encoding="utf-8") as lines:
        task = bar.add_task(f"sample {source.description}", total=num, info="")
        batches = text_to_image_batches(
            source.fn, folder, source.config, prompts, seeds, device, min(cfg.batch_size, 16)
        )
        i = 0
        for images in batches:
            for img in images:
                name = f"images/{i:05d}.png"
                arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                Image.fromarray(arr).save(out / name)
                row = {"file": name, "seed": seeds[i], "prompt": prompts[i]}
                lines.write(json.dumps(row) + "\n")
                if len(grid) < 16:
                    grid.append(img)
                i += 1
            bar.advance(task, images.shape[0])
    tmp.replace(index)
    write_config(cfg, out)
    result = {
        "out": str(out / "images"),
        "num": num,
        "source": source.description,
        "nfe": source.nfe,
        "index": str(index),
    }
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
    from dmdctl.data.prompts import PromptFile
    from dmdctl.teachers.sd.generate import pipeline_folder_for
    from dmdctl.teachers.wan.generate import (
        check_mp4_writer,
        save_video_grid,
        text_to_video_batches,
        write_mp4,
        write_strip,
    )

    require(
        (cfg.prompt is None) != (cfg.prompts is None),
        "a text-to-video generator needs --prompt TEXT or --prompts FILE (one of them)",
    )
    require(cfg.class_label is None, "--class is for class-conditional generators")
    check_mp4_writer()
    rows = [cfg.prompt] if cfg.prompt is not None else PromptFile(cfg.prompts)
    num = cfg.num
    if num is None:  # not given: one video per prompt of a file, PROMPT_VIDEOS for a --prompt
        num = len(rows) if cfg.prompts is not None else PROMPT_VIDEOS
    folder = pipeline_folder_for(source.config, cfg.teacher_path, cfg.offline)
    device = pick_device(cfg.device)
    seeds = list(range(cfg.seed, cfg.seed + num))
    prompts = _Cycled(rows)
    out = Path(cfg.out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    grid = []
    index = out / "videos.jsonl"
    tmp = index.with_name(index.name + ".tmp")
    with progress(transient=True) as bar, open(tmp, "w", encoding="utf-8") as lines:
        task = bar.add_task(f"sample {source.description}", total=num, info="")
        batches = text_to_video_batches(
            source.fn, folder, source.config, prompts, seeds, device, min(cfg.batch_size, 4)
        )
        i = 0
        for videos in batches:
            for video in videos:
                name = f"videos/{i:05d}"
                write_mp4(video, out / f"{name}.mp4")
                frames = write_strip(video, out / f"{name}.png")
                row = {"file": f"{name}.mp4", "strip": f"{name}.png", "strip_frames": frames,
                       "seed": seeds[i], "prompt": prompts[i]}  # fmt: skip
                lines.write(json.dumps(row) + "\n")
                if len(grid) < 8:
                    grid.append(video)
                i += 1
            bar.advance(task, videos.shape[0])
    tmp.replace(index)
    write_config(cfg, out)
    result = {
        "out": str(out / "videos"),
        "num": num,
        "source": source.description,
        "nfe": source.nfe,
        "index": str(index),
    }
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
