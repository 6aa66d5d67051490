"""Is one-step generation as much faster than the teacher's sampler as the NFE ratio says?

For each built-in teacher, on the same device and batch, interleaved: the distilled one-step
generator as ``dmdctl sample``/``eval-fid`` run it (a generator ``Source``), the bare denoiser
forward it wraps, and the teacher's Heun sampler at N steps (2N-1 NFE, the ``Source`` that
``eval-fid --teacher-path --steps N`` uses). The speed-up of one step over the sampler is
bounded by the NFE ratio; the table gives speed-up / NFE ratio (target >= 0.8). Networks have
the teacher's architecture; the generator starts as a copy of the teacher (its weights do not
change the speed).

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.one_step
    python -m benchmarks.one_step --device cuda --batch toy2d=65536 digits=2048
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

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

CPU_BATCH = {"toy2d": 4096, "digits": 128}
CUDA_BATCH = {"toy2d": 65536, "digits": 2048}
TARGET = 0.8


def parse_batches(items: list[str] | None, default: dict[str, int]) -> dict[str, int]:
    out = dict(default)
    for item in items or []:
        name, _, value = item.partition("=")
        out[name] = int(value)
    return out


def measure(name: str, batch: int, steps: int, repeats: int, device, folder: Path) -> list:
    from dmdctl.core.denoiser import OneStepGenerator
    from dmdctl.core.sampling import heun_nfe
    from dmdctl.generators import Source, teacher_source
    from dmdctl.teachers import resolve_teacher

    teacher = resolve_teacher(name, teacher_file(name, folder))
    teacher.denoiser.to(device)
    gen = OneStepGenerator(copy.deepcopy(teacher.denoiser), teacher.sigma_max).eval()
    one = Source(teacher.kind, teacher.config, "one step", 1, gen.requires_grad_(False))
    sampler = teacher_source(teacher, steps)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, *teacher.sample_shape, generator=g).to(device)
    c = torch.randint(0, teacher.num_classes, (batch,)).to(device) if teacher.num_classes else None
    den = gen.denoiser

    def bare():
        with torch.no_grad():
            den(z * gen.sigma_max, gen.sigma_max, c)

    times = interleaved(
        {"one": lambda: one(z, c), "bare": bare, "teacher": lambda: sampler(z, c)},
        repeats,
        device,
    )
    t1, tb, tt = (median(times[k]) for k in ("one", "bare", "teacher"))
    nfe = heun_nfe(steps)
    speedup = tt / t1
    return [
        name,
        batch,
        f"{batch / t1:,.0f}/s ({fmt_s(t1)})",
        f"{fmt_s(tb)} ({t1 / tb:.2f}x)",
        f"{batch / tt:,.1f}/s ({fmt_s(tt)})",
        nfe,
        f"{speedup:.1f}x",
        f"**{speedup / nfe:.2f}**",
    ]


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, repeats=5)
    ap.add_argument("--steps", type=int, default=18, help="teacher Heun steps N (2N-1 NFE)")
    ap.add_argument("--teachers", nargs="+", default=["toy2d", "digits"])
    ap.add_argument("--batch", nargs="*", help="NAME=BATCH overrides, e.g. digits=256")
    args = ap.parse_args(argv)
    device = setup(args)
    batches = parse_batches(args.batch, CUDA_BATCH if device.type == "cuda" else CPU_BATCH)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.teachers:
            note = skip_note(name)
            if note:
                rows.append([name, batches[name], note, "", "", "", "", ""])
                continue
            say(f"one_step: {name} batch {batches[name]}, teacher {args.steps} steps")
            rows.append(measure(name, batches[name], args.steps, args.repeats, device, Path(tmp)))
    body = (
        f"Device {device}, medians of {args.repeats} interleaved repetitions. Speed-up = teacher "
        f"sampler time / one-step time; its limit is the NFE ratio; target speed-up / NFE ratio "
        f">= {TARGET}.\n\n"
        + md_table(
            [
                "teacher",
                "batch",
                "one-step generator",
                "bare denoiser forward (one-step / bare)",
                f"teacher Heun {args.steps} steps",
                "NFE ratio",
                "speed-up",
                "speed-up / NFE ratio",
            ],
            rows,
        )
    )
    return finish(
        args, "Speed: one-step generation vs the teacher's sampler", body, "benchmarks.one_step"
    )


if __name__ == "__main__":
    main()
