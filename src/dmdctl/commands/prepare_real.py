"""``dmdctl prepare-real``: real images for DMD2's GAN, stored once (:mod:`dmdctl.data.real_store`).

Every input is checked before anything is written (a refused run leaves no folder). Several
processes (``torchrun`` / ``accelerate launch``) split the missing shards between them
(process r makes every world-th missing shard); the main process keeps manifest.json. SIGTERM
or SIGINT stops at the next batch: the unfinished shard is dropped, the complete ones are
recorded, and running the same command again makes only what is missing.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dmdctl.commands import report
from dmdctl.data.real_store import (
    RealWriter,
    image_mode,
    image_resolution,
    open_source,
    store_identity,
    store_kind,
    teacher_conditioning,
    to_unit_range,
)
from dmdctl.errors import UserError
from dmdctl.runtime import StopRequested, claim_output, holds_output, pick_device, process_state
from dmdctl.settings.prepare_real import PrepareRealConfig
from dmdctl.teachers import resolve_teacher
from dmdctl.ui import progress


@torch.no_grad()
def _encode(teacher, images: np.ndarray, device) -> np.ndarray:
    """uint8 ``[n, H, W, C]`` -> the stored rows: float16 latents (the VAE in float32) or uint8
    ``[n, C, H, W]`` pixels."""
    if not teacher.codec.latent:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    z = teacher.codec.encode(to_unit_range(images).to(device))
    return z.float().cpu().to(torch.float16).numpy()


@holds_output
def prepare_real(cfg: PrepareRealConfig) -> dict:
    cfg.validate()
    teacher = resolve_teacher(
        cfg.teacher,
        Path(cfg.teacher_path) if cfg.teacher_path else None,
        cfg.offline,
        video_size=cfg.video_size,
    )
    source = open_source(cfg.source, teacher, cfg.image_column, cfg.caption_column)
    shape = [int(s) for s in teacher.sample_shape]
    mode = image_mode(3 if teacher.codec.latent else shape[0])
    if teacher.kind.video:  # videos: their first frames at the teacher's size
        from dmdctl.teachers.wan.generate import check_mp4_writer

        check_mp4_writer()  # clips are read with imageio's ffmpeg plugin
        size = tuple(int(teacher.config[k]) for k in ("num_frames", "height", "width"))
    else:
        size = image_resolution(teacher) if teacher.codec.latent else shape[-1]
    kind, dtype = store_kind(teacher)
    conditioning = teacher_conditioning(teacher)
    settings = {
        "sample_shape": shape,
        "dtype": dtype,
        "kind": kind,
        "identity": store_identity(teacher),
        "conditioning": conditioning,
        "num_classes": int(teacher.num_classes or 0),
        "source": source.describe(),
        "records": source.records,
        "shard_size": cfg.shard_size,
    }
    state = process_state(cpu=cfg.device == "cpu")
    main, rank, world = state.is_main_process, state.process_index, state.num_processes
    device = pick_device(cfg.device, state)
    out = Path(cfg.out)
    claim_output(out, "prepare-real", state)  # one writer per folder, until this returns
    # the main process checks the folder, verifies its shards and merges what a killed run left;
    # the others read the result, and nobody writes a shard before everybody has read it
    writer = RealWriter(out, settings, main=main)
    state.wait_for_everyone()
    if not main:
        writer.reload()
    todo = writer.missing()
    done_before = sum(len(writer.shard_records(i)) for i in writer.shards)
    state.wait_for_everyone()
    mine = todo[rank::world]
    if teacher.codec.latent:
        teacher.codec.vae.to(device)
    t0 = time.perf_counter()
    made = 0
    stopped = None
    with StopRequested() as stop, progress(disable=None if main else True) as bar:
        task = bar.add_task("prepare-real", total=source.records, completed=done_before, info="")
        for index in mine:
            records = writer.shard_records(index)
            parts: dict[str, list] = {"x": [], "caption": [], "label": [], "record": [], "name": []}
            skipped: list[dict] = []
            for first in range(records.start, records.stop, cfg.batch_size):
                if stop.signal is not None:
                    break  # drop the unfinished shard: a re-run makes it again
                count = min(cfg.batch_size, records.stop - first)
                good = []
                for r in source.read(first, count, mode, size):
                    if r.image is None:
                        if not cfg.skip_bad_records:
                            raise UserError(
                                f"could not read image {r.name} ({r.where}): {r.why}; fix or "
                                "remove it and run the same command again (the complete shards "
                                "are kept), or pass --skip-bad-records"
                            )
                        skipped.append({"record": r.record, "why": r.why})
                        continue
                    good.append(r)
                if good:
                    parts["x"].append(_encode(teacher, np.stack([r.image for r in good]), device))
                    parts["caption"] += [r.caption for r in good]
                    parts["label"] += [r.label for r in good]
                    parts["record"] += [r.record for r in good]
                    parts["name"] += [r.name for r in good]
                bar.advance(task, count * world)
            if stop.signal is not None:
                stopped = stop.name
                break
            x = (
                np.concatenate(parts["x"])
                if parts["x"]
                else np.empty((0, *shape), dtype=np.dtype(dtype))
            )
            writer.write_shard(index, {**parts, "x": x, "skipped": skipped})
            made += len(records)
            bar.update(task, info=f"shard {index + 1}/{writer.num_shards}")
    close = getattr(source, "close", None)
    if close is not None:
        close()
    elapsed = time.perf_counter() - t0
    state.wait_for_everyone()  # every process's shards are on disk (or dropped)
    if main:
        writer.merge()
    result = {
        "out": str(out),
        "source": f"{cfg.source} ({source.kind})",
        "records": source.records,
        "rows": writer.rows if main else "-",
        "skipped": writer.skipped if main else "-",
        "made_now": (
            sum(len(writer.shard_records(i)) for i in writer.shards) - done_before if main else made
        ),
        "resumed_after_shard": (todo[0] if todo else writer.num_shards) if done_before else "-",
        "shards": writer.num_shards,
        "complete": (len(writer.shards) == writer.num_shards) if main else "-",
        "processes": world,
        "images_per_s": round(made * world / elapsed, 1) if made else "-",
    }
    if writer.remade:
        result["remade_shards"] = len(writer.remade)
    if stopped is not None:
        result["interrupted"] = stopped
    return result


def run(cfg: PrepareRealConfig) -> int | None:
    """Run the command on resolved settings (its help: :data:`dmdctl.settings.prepare_real.HELP`)."""
    return report(
        "prepare-real",
        prepare_real(cfg),
        f": the complete shards are recorded in {Path(cfg.out) / 'manifest.json'} and the "
        "unfinished one was dropped. Resume by running the same command again",
    )
