"""Does ``make-pairs`` run at the speed of the teacher's sampler, or does storage cost extra?

For each built-in teacher, interleaved in one process: the real ``make_pairs`` code path
(teacher file loading and hashing, seeded noise, Heun sampling, shards written and hashed,
manifest; a fresh output folder each time) against bare ``heun_sample`` calls on the same
seeds, batches and device with the teacher already loaded. Overhead = make-pairs / bare - 1
(target: at most 5%).

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.make_pairs_speed
    python -m benchmarks.make_pairs_speed --device cuda
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from .common import (
    add_common_args,
    finish,
    fmt_s,
    interleaved,
    md_table,
    median,
    say,
    setup,
    skip_note,
    teacher_file,
)

# pairs, shard size, batch
CPU_SETTINGS = {"toy2d": (16384, 8192, 4096), "digits": (256, 256, 128)}
CUDA_SETTINGS = {"toy2d": (65536, 65536, 65536), "digits": (8192, 4096, 2048)}
TARGET = 0.05


def measure(name: str, settings, steps: int, repeats: int, device, folder: Path) -> list:
    from dmdctl.commands.make_pairs import make_pairs
    from dmdctl.core.sampling import class_labels, heun_sample, karras_sigmas, seeded_noise
    from dmdctl.settings.make_pairs import MakePairsConfig
    from dmdctl.teachers import resolve_teacher

    n, shard, batch = settings
    tfile = teacher_file(name, folder)
    teacher = resolve_teacher(name, tfile)
    den = teacher.denoiser.to(device)
    sigmas = karras_sigmas(steps, teacher.sigma_min, teacher.sigma_max)
    seeds = list(range(n))
    noise = seeded_noise(seeds, teacher.sample_shape)
    cond = class_labels(seeds, 0, teacher.num_classes)
    count = [0]

    def real():
        out = folder / f"pairs-{name}-{count[0]}"
        count[0] += 1
        make_pairs(
            MakePairsConfig(
                teacher_path=str(tfile),
                out=str(out),
                num_pairs=n,
                steps=steps,
                shard_size=shard,
                batch_size=batch,
                device=str(device),
            )
        )
        shutil.rmtree(out)

    def bare():
        for i in range(0, n, batch):
            z = noise[i : i + batch].to(device)
            c = cond[i : i + batch].to(device) if teacher.num_classes else None
            heun_sample(den, z, sigmas, c).cpu()

    say(f"make_pairs_speed: {name} {n} pairs, {steps} steps, batch {batch}")
    times = interleaved({"make-pairs": real, "bare": bare}, repeats, device)
    tr, tb = median(times["make-pairs"]), median(times["bare"])
    over = tr / tb - 1
    return [
        name,
        f"{n} / {shard} / {batch}",
        f"{fmt_s(tr)} ({n / tr:,.0f} pairs/s)",
        f"{fmt_s(tb)} ({n / tb:,.0f} pairs/s)",
        f"**{over:+.1%}**",
    ]


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, repeats=3)
    ap.add_argument("--steps", type=int, default=18, help="Heun steps (2N-1 NFE per pair)")
    ap.add_argument("--teachers", nargs="+", default=["toy2d", "digits"])
    ap.add_argument(
        "--settings", nargs="*", help="NAME=PAIRS,SHARD,BATCH overrides, e.g. digits=256,256,128"
    )
    args = ap.parse_args(argv)
    device = setup(args)
    settings = dict(CUDA_SETTINGS if device.type == "cuda" else CPU_SETTINGS)
    for item in args.settings or []:
        name, _, v = item.partition("=")
        settings[name] = tuple(int(x) for x in v.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.teachers:
            note = skip_note(name)
            if note:
                rows.append([name, "", note, "", ""])
                continue
            rows.append(measure(name, settings[name], args.steps, args.repeats, device, Path(tmp)))
    body = (
        f"Device {device}, Heun {args.steps} steps ({2 * args.steps - 1} NFE per pair), float32 "
        f"targets, medians of {args.repeats} interleaved repetitions. Overhead = make-pairs / "
        f"bare sampler - 1 (target <= {TARGET:.0%}).\n\n"
        + md_table(
            [
                "teacher",
                "pairs / shard / batch",
                "make-pairs (whole command path)",
                "bare heun_sample",
                "overhead",
            ],
            rows,
        )
    )
    return finish(
        args, "Speed: make-pairs vs the bare teacher sampler", body, "benchmarks.make_pairs_speed"
    )


if __name__ == "__main__":
    main()
