"""Quality against training budget on digits: DMD, DMD2 one-step and DMD2 4-step, far past the demo.

Each run trains with the demo's settings (``dmdctl.settings.demo``) except the learning-rate
schedule, which is constant after the warm-up (ours: a checkpoint at step N is then what an
N-step run gives, and a run can be continued to a longer budget). Every ``--every`` steps the
run stops, its EMA generator is scored with the instrument of ``benchmarks.quality_ablation``
(KID, precision and recall against the 1,500 training images, with 95% bootstrap intervals), and
for GAN runs the head is diagnosed: its accuracy on the 297 held-out real digits against as many
fresh generated ones, per band of noise levels, and the mean logit gap (real - generated).
Results are kept per checkpoint in ``--out`` (an interrupted benchmark continues); the table
and a PNG of recall and KID against steps with the teacher's interval as a band are written at
the end.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.digits_curves --runs dmd2 --steps 3000 --every 250
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("DMDCTL_QUIET", "1")

import torch  # noqa: E402

from .common import finish, md_table, say  # noqa: E402
from .quality_ablation import RUNS, SEED_STRIDE, evaluate_rows  # noqa: E402

BANDS = 4  # noise-level bands of the head diagnosis (equal parts of the level grid, low to high)


def config(run: str, seed: int, steps: int, out: Path, pairs: Path, overrides: dict):
    from dmdctl.config import resolve
    from dmdctl.settings.demo import DEMO_DEFAULTS, DMD2_FAKE_UPDATES, distill_settings
    from dmdctl.settings.distill import DistillConfig
    from dmdctl.teachers.digits import TEACHER_FILE

    o = dict(distill_settings(DEMO_DEFAULTS["digits"]), **RUNS[run])
    if run.startswith("dmd2"):  # DMD2's two time-scale rule, as the demo runs it
        o["fake_updates"] = DMD2_FAKE_UPDATES["digits"]
    o.update(overrides)
    if o.get("reg_weight", 1.0) != 0:
        o.setdefault("pairs", str(pairs))
    return resolve(DistillConfig, teacher_path=str(TEACHER_FILE), out=str(out), steps=steps,
                   seed=seed, lr_schedule="constant", plot_samples=0, log_every=50, **o)  # fmt: skip


def head_diagnosis(cfg, checkpoint: Path) -> dict:
    """Accuracy of the GAN head (logit > 0: real) on held-out real digits against fresh
    generated ones, each band of the noise grid, with the run's trained fake score and head."""
    from dmdctl.core.gan import bottleneck_features
    from dmdctl.teachers.digits import digits_split
    from dmdctl.training.trainer import DMDTrainer

    tr = DMDTrainer(replace(cfg, resume=None))
    tr.resume(str(checkpoint))
    _, _, xh, yh = digits_split()
    n = len(xh)
    g = torch.Generator().manual_seed(12345)
    labels = torch.randint(0, 10, (n,), generator=g)
    fake_net, head = tr.acc.unwrap_model(tr.fake), tr.acc.unwrap_model(tr.head)
    out = {}
    with torch.no_grad():
        gen = tr.ema_generator()
        xg = gen.sample(list(range(7_000_000, 7_000_000 + n)), labels, tr.teacher.sample_shape,
                        "cpu")  # fmt: skip
        edges = torch.linspace(0, tr.levels, BANDS + 1).long()
        for b in range(BANDS):
            idx = torch.randint(int(edges[b]), int(edges[b + 1]), (2, n), generator=g)
            eps = torch.randn(2, n, *tr.teacher.sample_shape, generator=g)
            s_r, s_g = tr.grid[idx[0]], tr.grid[idx[1]]
            view = (-1, 1, 1, 1)
            lr_ = head(bottleneck_features(fake_net, xh + s_r.reshape(view) * eps[0], s_r, yh))
            lg = head(bottleneck_features(fake_net, xg + s_g.reshape(view) * eps[1], s_g, labels))
            acc = 0.5 * ((lr_ > 0).float().mean() + (lg <= 0).float().mean())
            lo, hi = float(tr.grid[int(edges[b])]), float(tr.grid[int(edges[b + 1]) - 1])
            out[f"{lo:.3g}-{hi:.3g}"] = {
                "accuracy": float(acc),
                "gap": float(lr_.mean() - lg.mean()),
            }
    return out


def score_checkpoint(run, seed, step, cfg, ckpt: Path, args) -> dict:
    from dmdctl.commands.export import export
    from dmdctl.generators import load_generator
    from dmdctl.settings.export import ExportConfig

    gfile = Path(cfg.out) / "curve" / f"step-{step:07d}.safetensors"
    if not gfile.is_file():
        export(ExportConfig(source=str(ckpt), out=str(gfile)))
    res = evaluate_rows("digits", seed, {run: load_generator(gfile)}, args.samples, args)[run]
    res.pop("versions", None)
    if cfg.gan_weight > 0:
        res["head"] = head_diagnosis(cfg, ckpt)
    return res


def run_curve(run: str, seed: int, args, tag: str = "") -> dict:
    """Train ``run`` to each multiple of ``--every`` in turn, scoring each checkpoint once."""
    from dmdctl.commands.make_pairs import make_pairs
    from dmdctl.settings.demo import DEMO_DEFAULTS
    from dmdctl.settings.make_pairs import MakePairsConfig
    from dmdctl.teachers.digits import TEACHER_FILE
    from dmdctl.training.loop import distill

    root = args.out / f"seed{seed}"
    n_pairs = args.num_pairs or DEMO_DEFAULTS["digits"]["num_pairs"]
    pairs = root / f"pairs-{n_pairs}"
    out = root / (run + (f"-{tag}" if tag else ""))
    results_file = out / "curve.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if args.report:  # the tables of what was scored, nothing trained
        return results
    if RUNS[run].get("reg_weight", 1.0) != 0 or "reg_weight" in args.overrides:
        make_pairs(MakePairsConfig(teacher_path=str(TEACHER_FILE), out=str(pairs),
                                   num_pairs=n_pairs, seed=seed * SEED_STRIDE, batch_size=500))  # fmt: skip
    steps = [s for s in range(args.every, args.steps + 1, args.every) if s not in args.skip]
    for step in steps:
        ckpt = out / "checkpoints" / f"step-{step:07d}"
        cfg = config(run, seed, step, out, pairs, args.overrides)
        if str(step) in results:
            continue
        if not ckpt.is_dir():
            t0 = time.time()
            has = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
            # a continued run resumes its own checkpoint (--init-from only starts one)
            init = None if has else cfg.init_from
            distill(replace(cfg, checkpoint_every=args.every, resume="latest" if has else None,
                            init_from=init))  # fmt: skip
            say(
                f"digits_curves: {run} seed {seed}: trained to step {step} ({time.time() - t0:.0f} s)"
            )
        results[str(step)] = score_checkpoint(run, seed, step, cfg, ckpt, args)
        r = results[str(step)]
        say(f"digits_curves: {run} seed {seed} step {step}: KID {r['kid']:.4f} "
            f"P {r['precision']:.3f} R {r['recall']:.3f} {r['recall_interval']}"
            + (f" head {json.dumps(r['head'])}" if "head" in r else ""))  # fmt: skip
        results_file.write_text(json.dumps(results, indent=1) + "\n")
    return results


def teacher_row(seed: int, args) -> dict:
    from dmdctl.generators import teacher_source
    from dmdctl.teachers import load_teacher
    from dmdctl.teachers.digits import TEACHER_FILE

    path = args.out / f"seed{seed}" / "teacher_35nfe.json"
    if path.is_file():
        return json.loads(path.read_text())
    src = teacher_source(load_teacher(TEACHER_FILE), 18)
    res = evaluate_rows("digits", seed, {"teacher_35nfe": src}, args.samples, args)["teacher_35nfe"]
    res.pop("versions", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    return res


def plot(curves: dict, teacher: dict, path: Path) -> Path:
    """Recall and KID against steps, one line per run, the teacher's interval as a grey band."""
    from PIL import Image, ImageDraw

    from dmdctl.plots import draw_title

    W, H, pad = 520, 360, 48
    img = Image.new("RGB", (2 * W, H), "white")
    d = ImageDraw.Draw(img)
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    xmax = max(int(s) for c in curves.values() for s in c)
    for p, key in enumerate(("recall", "kid")):
        ox = p * W
        vals = [r[key] for c in curves.values() for r in c.values()] + list(
            teacher[f"{key}_interval"]
        )
        lo, hi = min(vals), max(vals)
        lo, hi = lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9)

        def xy(step, v, ox=ox, lo=lo, hi=hi):
            return (
                ox + pad + (W - 2 * pad) * step / xmax,
                H - pad - (H - 2 * pad) * (v - lo) / (hi - lo),
            )

        t_lo, t_hi = teacher[f"{key}_interval"]
        d.rectangle([xy(0, t_hi), xy(xmax, t_lo)], fill="#dddddd")
        d.rectangle([ox + pad, pad, ox + W - pad, H - pad], outline="black")
        for i, (name, c) in enumerate(curves.items()):
            pts = [xy(int(s), r[key]) for s, r in sorted(c.items(), key=lambda kv: int(kv[0]))]
            d.line(pts, fill=colours[i % len(colours)], width=2)
            for q in pts:
                d.ellipse([q[0] - 2, q[1] - 2, q[0] + 2, q[1] + 2], fill=colours[i % len(colours)])
            d.text((ox + pad + 6, pad + 6 + 14 * i), name, fill=colours[i % len(colours)])
        draw_title(
            d, (ox + pad, 8), f"{key} vs generator steps (grey: teacher 35 NFE, 95% interval)"
        )
        d.text((ox + pad, H - pad + 6), "0", fill="black")
        d.text((ox + W - pad - 24, H - pad + 6), str(xmax), fill="black")
        d.text((ox + 4, pad), f"{hi:.3g}", fill="black")
        d.text((ox + 4, H - pad - 10), f"{lo:.3g}", fill="black")
    img.save(path)
    return path


CURVE_RUNS = ("dmd", "dmd2", "dmd2_4step", "dmd_no_reg", "dmd_reg_only")


def run_spec(text: str) -> str:
    if text.partition(":")[0] not in CURVE_RUNS:
        raise argparse.ArgumentTypeError(f"{text!r}: a run is one of {', '.join(CURVE_RUNS)}")
    return text


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=["dmd", "dmd2", "dmd2_4step"], type=run_spec,
                    help=f"runs of {', '.join(CURVE_RUNS)}; RUN:TAG reads and writes the variant "
                         "folder RUN-TAG (several variants side by side in one table and plot)")  # fmt: skip
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=250, help="score every N generator steps")
    ap.add_argument("--skip", type=int, nargs="*", default=[],
                    help="steps not scored (end points only, for extra seeds)")  # fmt: skip
    ap.add_argument(
        "--samples", type=int, default=10000, help="samples per score (the instrument's)"
    )
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                    help="distill settings over the demo's (a tagged variant, e.g. gan_weight=0.03)")  # fmt: skip
    ap.add_argument("--num-pairs", type=int, default=None, help="default: the demo's 100")
    ap.add_argument("--tag", default="", help="name of the variant's run folders")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/digits_curves"))
    ap.add_argument("--plot", type=Path, default=None, help="write the PNG here")
    ap.add_argument("--title", default="digits: quality against budget (issue 26)",
                    help="the section's heading in BENCHMARKS.md")  # fmt: skip
    ap.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    ap.add_argument("--report", action="store_true",
                    help="only tabulate the steps already scored in --out (nothing is trained)")  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    args.skip = set(args.skip)
    teacher = teacher_row(args.seeds[0], args)
    curves = {}
    rows = []
    for seed in args.seeds:
        for run in args.runs:
            run, _, tag = run.partition(":")  # RUN:TAG, a variant's folder (else --tag)
            tag = tag or args.tag
            name = run + (f" ({tag})" if tag else "")
            res = run_curve(run, seed, args, tag)
            curves[f"{name}, seed {seed}"] = res
            for step, r in sorted(res.items(), key=lambda kv: int(kv[0])):
                head = r.get("head")
                rows.append([name, seed, step, f"{r['kid']:.4f} [{r['kid_interval'][0]:.4f}, {r['kid_interval'][1]:.4f}]",
                             f"{r['precision']:.3f} [{r['precision_interval'][0]:.3f}, {r['precision_interval'][1]:.3f}]",
                             f"{r['recall']:.3f} [{r['recall_interval'][0]:.3f}, {r['recall_interval'][1]:.3f}]",
                             " / ".join(f"{v['accuracy']:.2f}" for v in head.values()) if head else "-"])  # fmt: skip
    t = teacher
    rows.insert(0, ["teacher 35 NFE", args.seeds[0], "-", f"{t['kid']:.4f} [{t['kid_interval'][0]:.4f}, {t['kid_interval'][1]:.4f}]",
                    f"{t['precision']:.3f} [{t['precision_interval'][0]:.3f}, {t['precision_interval'][1]:.3f}]",
                    f"{t['recall']:.3f} [{t['recall_interval'][0]:.3f}, {t['recall_interval'][1]:.3f}]", "-"])  # fmt: skip
    bands = next((list(r["head"]) for c in curves.values() for r in c.values() if "head" in r), [])
    body = md_table(["run", "seed", "step", "KID [95%]", "precision [95%]", "recall [95%]",
                     "head accuracy per noise band" + (f" ({', '.join(bands)})" if bands else "")], rows)  # fmt: skip
    body += (f"\n\n{args.samples} samples per score against the 1,500 training images (classifier "
             f"features), {args.bootstrap} bootstrap rounds; the demo's settings with a constant "
             f"learning rate after the warm-up{'; variant: ' + json.dumps(args.overrides) if args.overrides else ''}. "
             "Head accuracy: the GAN head on the 297 held-out real digits against as many generated "
             "ones, per band of the noise grid (0.5 is chance).\n")  # fmt: skip
    if args.plot:
        # a relative path is from the repository's root, where BENCHMARKS.md is
        where = args.plot.name if args.plot.is_absolute() else args.plot.as_posix()
        body += f"\n![recall and KID against steps]({where})\n"
        plot(curves, teacher, args.plot)
    return finish(args, args.title, body, "benchmarks.digits_curves")


if __name__ == "__main__":
    main()
