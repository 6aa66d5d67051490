"""The digits demo's training steps on this CPU: the step as it was, and each CPU lever, side by side.

Every variant is a real ``DMDTrainer`` with the demo's settings (digits, batch 64, 3 fake-score
updates; DMD2 without pairs, GAN weights of DMD2 ImageNet), built in this one process; their
steps are timed interleaved (medians of ``--repeats``), so the ratios hold on a shared machine.

- ``previous``: the GAN head's real examples run through the whole fake score in one batch with
  the generated ones, and the generator's GAN loss runs the whole fake score too (the step before
  :func:`dmdctl.core.gan.bottleneck_features`); reproduced here by a subclass;
- ``shipped``: the step as ``dmdctl distill`` runs it (those passes end at the bottleneck);
- ``+ bf16``: ``--mixed-precision bf16`` (autocast; AVX512-BF16 on this CPU);
- ``+ channels-last``: ``--channels-last``;
- ``+ compile``: ``--compile`` (regional torch.compile; with ``--compile`` only: slow to warm);
- ``2 threads``: the shipped step with 2 torch threads instead of ``--threads`` (wall clock only);
  ``previous, 2 threads``: the previous step so (torch's default thread count on this machine).

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.digits_step --runs dmd2 dmd2_4step dmd
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from .common import add_common_args, finish, fmt_s, interleaved, md_table, median, say, setup


def trainer_class(previous: bool):
    from dmdctl.core.gan import bottleneck_tap, classifier_gan_loss
    from dmdctl.core.losses import denoising_error
    from dmdctl.training.trainer import DMDTrainer

    if not previous:
        return DMDTrainer

    class Previous(DMDTrainer):
        """The step before the bottleneck-ended passes: whole passes for the head's inputs."""

        def _features(self, net, x, sigma, cond):
            with bottleneck_tap(net) as feats:
                net(x, sigma, cond)
            return feats[-1]

        def _fake_and_head_loss(self, x_fake, fidx, feps, c, gen, logs):
            B, shape = self.cfg.batch_size, self.teacher.sample_shape
            xr, cr = self._real_rows(B, gen)
            ridx = self._slice(torch.randint(0, self.levels, (B,), generator=gen))
            reps = self._slice(torch.randn(B, *shape, generator=gen))
            sf, sr = self.grid[fidx], self.grid[ridx]
            view = (-1, *([1] * len(shape)))
            noisy = torch.cat([x_fake + sf.reshape(view) * feps, xr + sr.reshape(view) * reps])
            cond = torch.cat([c, cr.to(c.dtype)]) if c is not None else None
            n = x_fake.shape[0]
            with bottleneck_tap(self.acc.unwrap_model(self.fake)) as feats:
                pred = self.fake(noisy, torch.cat([sf, sr]), cond)
            loss = denoising_error(pred[:n], x_fake, sf, self.sigma_data, self.loss_weight)
            logits = self.head(feats[-1])
            loss_cls = classifier_gan_loss(logits[n:], logits[:n])
            logs["loss_cls"] = loss_cls.detach()
            return loss + self.cfg.gan_classifier_weight * loss_cls

    return Previous


def make(run: str, folder: Path, batch: int, previous=False, **extra):
    from dmdctl.commands.make_pairs import make_pairs
    from dmdctl.config import resolve
    from dmdctl.settings.demo import DEMO_DEFAULTS, DMD2_4STEP_SIGMAS, DMD2_RUN, distill_settings
    from dmdctl.settings.distill import DistillConfig
    from dmdctl.settings.make_pairs import MakePairsConfig
    from dmdctl.teachers.digits import TEACHER_FILE

    d = dict(DEMO_DEFAULTS["digits"], batch_size=batch)
    pairs = folder / "pairs"
    if run == "dmd" and not (pairs / "manifest.json").is_file():
        make_pairs(MakePairsConfig(teacher_path=str(TEACHER_FILE), out=str(pairs),
                                   num_pairs=d["num_pairs"], batch_size=500))  # fmt: skip
    runs = {
        "dmd": dict(pairs=str(pairs)),
        "dmd2": dict(DMD2_RUN),
        "dmd2_4step": dict(DMD2_RUN, denoising_steps=DMD2_4STEP_SIGMAS),
    }
    cfg = resolve(DistillConfig, teacher_path=str(TEACHER_FILE), steps=10**6, plot_samples=0,
                  cpu=True, out=str(folder / f"{run}-{len(list(folder.iterdir()))}"),
                  **dict(distill_settings(d), **runs[run], **extra))  # fmt: skip
    return trainer_class(previous)(cfg)


def measure(run: str, args, device, folder: Path) -> list[list[str]]:
    base = args.threads
    variants = {
        "previous": make(run, folder, args.batch_size, previous=True),
        "shipped": make(run, folder, args.batch_size),
    }
    if run == "dmd":  # no GAN: nothing differs from the previous step
        variants.pop("previous")
    variants["+ bf16"] = make(run, folder, args.batch_size, mixed_precision="bf16")
    variants["+ channels-last"] = make(run, folder, args.batch_size, channels_last=True)
    if args.compile:
        variants["+ compile"] = make(run, folder, args.batch_size, compile=True)

    def stepper(tr, threads):
        def step():
            torch.set_num_threads(threads)
            tr.train_step()
            torch.set_num_threads(base)

        return step

    same = ""
    if "previous" in variants:  # the reference must be the same step: one step each, compared
        a, b = variants["previous"].train_step(), variants["shipped"].train_step()
        diff = max(float((a[k] - b[k]).abs() / b[k].abs().clamp_min(1e-12)) for k in a)
        same = f" (first step's losses, previous vs shipped: max relative difference {diff:.1e})"
        say(f"digits_step: {run}{same}")
        if diff > 1e-4:
            raise SystemExit(f"the previous and shipped steps differ ({diff:.1e}): not comparable")
    calls = {name: stepper(tr, base) for name, tr in variants.items()}
    if base != 2 and args.clock == "wall":  # CPU seconds of two threads say nothing of speed
        calls["2 threads"] = stepper(variants["shipped"], 2)
        if "previous" in variants:  # what distill ran before on this machine (torch's default)
            calls["previous, 2 threads"] = stepper(variants["previous"], 2)
    say(f"digits_step: {run}: {', '.join(calls)}")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = interleaved(calls, args.repeats, device, warmup=3 if args.compile else 2, clock=clock)
    med = {k: median(v) for k, v in times.items()}
    ref = med.get("previous", med["shipped"])
    rows = []
    for name, t in med.items():
        rows.append(
            [run, name + (same if name == "shipped" else ""), fmt_s(t), f"**{ref / t:.2f}x**"]
        )
        say("digits_step: " + " | ".join(rows[-1]))
    return rows


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, repeats=15)
    ap.add_argument("--runs", nargs="+", default=["dmd2", "dmd2_4step", "dmd"],
                    choices=["dmd", "dmd2", "dmd2_4step"])  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=64, help="the demo's 64 (smaller: tests)")
    ap.add_argument("--compile", action="store_true", help="also time --compile (slow to warm)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: CPU seconds of the process (one thread, on a machine busy with "
                         "other work: what a step computes, not what it waits)")  # fmt: skip
    args = ap.parse_args(argv)
    device = setup(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            folder = Path(tmp) / run
            folder.mkdir()
            rows += measure(run, args, device, folder)
    body = (
        md_table(
            [
                "run",
                "variant",
                f"step (median, {args.clock} time)",
                "speed-up over the previous step",
            ],
            rows,
        )  # fmt: skip
        + f"\n\nDigits demo settings (batch {args.batch_size}, 3 fake-score updates), {args.repeats} interleaved "
        f"repetitions, {args.threads} torch thread(s) unless the row says otherwise; DMD has no "
        "GAN, so its reference is the shipped step.\n"
    )
    return finish(args, "digits step on this CPU (issue 26)", body, "benchmarks.digits_step")


if __name__ == "__main__":
    main()
