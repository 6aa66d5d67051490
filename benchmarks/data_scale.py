"""Do distill, make-pairs and prepare-real stay flat as the prompt and real-image sets grow?

Issue 25: with a tiny random SD1.5-style pipeline, ``distill`` and ``make-pairs`` run on prompt
files of 1,000 / 100,000 / 1,000,000 lines and ``distill --gan-weight`` on stores of 1,000 /
100,000 real images (``prepare-real``; that part is skipped with a note where the command does
not exist yet). Targets: peak RSS at the largest size within 64 MB of the smallest, time to the
first step at most 2x the smallest, step time unchanged within noise.

Every command runs as its own process, started by a small stdlib-only wrapper process:

- peak RSS = ``ru_maxrss`` of the rusage ``os.wait4`` returns for that one child. (Not
  ``RUSAGE_CHILDREN`` of this process, and not a child of this process directly: Linux records
  the parent's peak RSS in a child's maxrss when it execs, so a child of a process holding torch
  reports at least that process's size. The wrapper holds ~10 MB.)
- time to the first step = from starting the process to the first row of its run folder's
  ``log.jsonl`` (``--log-every 1``; polled every 5 ms); it holds imports, loading the teacher,
  indexing the prompts file (and the real store), the first encode and the first step.
- step time = the median of ``batch / samples_per_s`` over the log rows of steps 2..S (the loop's
  own rate: the time between consecutive log rows). "Within noise" = the ratio of the medians
  is within 1 +- max(10%, half the smallest size's per-step range over its median).

The distill rows use ``--prompt-cache off`` so that every size runs the streamed path (auto would
cache the smaller sets, see the "auto would" column); one extra row runs ``--prompt-cache on`` at
the smallest size. Data rates are measured in this process: random rows of the largest prompts
file, prompts encoded by the tiny pipeline's encoder and by a CLIP-L-sized random encoder
(12 layers, 768 wide, 77 tokens) at 1 and 2 threads, and random rows of the largest real store.

Generated inputs (prompt files, captioned 16x16 PNG folders, the pipeline, the CLIP-L encoder)
are kept in ``--work`` and reused; each is written in a loop, memory-flat.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.data_scale            # full sizes (long)
    python -m benchmarks.data_scale --prompts 1000 20000 --images 1000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from .common import finish, md_table, say

REPO = Path(__file__).resolve().parent.parent
RSS_TARGET_MB = 64
FIRST_STEP_TARGET = 2.0
STEP_TOLERANCE = 0.10  # step time "unchanged within noise": at least +-10%
PARTS = ("make-pairs", "cache-on", "real", "rates", "clip-l")

# run by `python -c`: one command, its peak RSS from wait4, its wall time and when the first
# row of a log file appeared; stdlib only, so that this process stays small (see the docstring)
WATCH = r"""
import json, os, subprocess, sys, time
job = json.loads(sys.argv[1])
log = job.get("log")
t0 = time.perf_counter()
with open(job["output"], "w") as out:
    p = subprocess.Popen(job["cmd"], cwd=job["cwd"], env=job["env"], stdout=out,
                         stderr=subprocess.STDOUT)
first, status, ru, killed = None, 0, None, False
while True:
    pid, status, ru = os.wait4(p.pid, os.WNOHANG)
    if pid:
        break
    now = time.perf_counter()
    if log and first is None:
        try:
            if os.stat(log).st_size > 0:
                first = now - t0
        except OSError:
            pass
    if now - t0 > job["timeout"] and not killed:
        p.kill()
        killed = True
    time.sleep(0.005)
wall = time.perf_counter() - t0
p.returncode = os.waitstatus_to_exitcode(status)
print(json.dumps({"rc": p.returncode, "wall": wall, "first_row": first, "killed": killed,
                  "maxrss_kb": ru.ru_maxrss, "cpu": ru.ru_utime + ru.ru_stime}))
"""

COLOURS = ("red", "blue", "green", "amber", "violet", "grey", "teal", "ochre", "white", "black")
THINGS = ("cat", "dog", "photo", "house", "boat", "tree", "lamp", "chair", "bird", "cup", "car")
PLACES = ("grass", "sky", "beach", "table", "street", "snow", "river", "shelf")


def prompt_text(i: int) -> str:
    return (
        f"a photo of {THINGS[i % len(THINGS)]} {i} in {COLOURS[(i // 7) % len(COLOURS)]} "
        f"on the {PLACES[(i // 13) % len(PLACES)]}"
    )


def make_prompts(work: Path, n: int) -> Path:
    path = work / f"prompts-{n}.txt"
    if path.is_file():
        return path
    say(f"data_scale: writing {n:,} prompts to {path}")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for i in range(n):
            f.write(prompt_text(i) + "\n")
    tmp.replace(path)
    return path


def make_images(work: Path, n: int, side: int = 16) -> Path:
    """A captioned folder of ``n`` random-colour PNGs (``captions.jsonl`` written last)."""
    import numpy as np
    from PIL import Image

    folder = work / f"images-{n}"
    if (folder / "captions.jsonl").is_file():
        return folder
    say(f"data_scale: writing {n:,} {side}x{side} images to {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    tmp = folder / "captions.jsonl.tmp"
    with open(tmp, "w") as f:
        for i in range(n):
            base = rng.integers(0, 256, 3)
            noise = rng.integers(-24, 25, (side, side, 3))
            a = np.clip(base + noise, 0, 255).astype(np.uint8)
            name = f"{i:07d}.png"
            Image.fromarray(a).save(folder / name)
            f.write(json.dumps({"file": name, "caption": prompt_text(i)}) + "\n")
    tmp.replace(folder / "captions.jsonl")
    return folder


def make_pipeline(work: Path) -> Path:
    folder = work / "pipe"
    if not (folder / "model_index.json").is_file():
        from dmdctl.teachers.sd.testing import build_pipeline

        say(f"data_scale: writing the tiny SD pipeline to {folder}")
        shutil.rmtree(folder, ignore_errors=True)
        build_pipeline(folder)
    return folder


def make_clip_l(work: Path, pipe: Path) -> Path:
    """A folder with a CLIP-L-sized random text encoder (SD1.5's config: 12 layers, 768 wide,
    77 positions) and the tiny pipeline's tokenizer padding to 77 tokens."""
    folder = work / "clip-l"
    if (folder / "text_encoder" / "config.json").is_file():
        return folder
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dmdctl.teachers.sd.testing import _configs

    say(f"data_scale: writing a CLIP-L-sized random text encoder to {folder}")
    tok = CLIPTokenizer.from_pretrained(pipe, subfolder="tokenizer", model_max_length=77)
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        vocab_size=len(tok),
        **_configs("sd15", "epsilon")["text"],
    )
    tok.save_pretrained(folder / "tokenizer")
    CLIPTextModel(cfg).save_pretrained(folder / "text_encoder", safe_serialization=True)
    return folder


# ------------------------------------------------------------------ running the CLI


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_WAIT_POLICY="PASSIVE",
        DMDCTL_THREADS=str(threads),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        DMDCTL_QUIET="1",
    )
    paths = [str(REPO / "src"), str(REPO), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    return env


def run_cli(args: list, out: Path, threads: int, timeout: float, log: Path | None = None) -> dict:
    """``python -m dmdctl ARGS`` measured by the wrapper; raises if it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    job = {
        "cmd": [sys.executable, "-m", "dmdctl", *[str(a) for a in args]],
        "cwd": str(REPO),
        "env": child_env(threads),
        "output": str(out),
        "log": str(log) if log else None,
        "timeout": timeout,
    }
    res = subprocess.run(
        [sys.executable, "-c", WATCH, json.dumps(job)], capture_output=True, text=True
    )
    if res.returncode != 0:
        raise RuntimeError(f"the measuring wrapper failed: {res.stderr.strip()[-2000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    if r["rc"] != 0:
        tail = out.read_text(errors="replace")[-3000:] if out.is_file() else ""
        why = "timed out" if r["killed"] else f"exit code {r['rc']}"
        raise RuntimeError(f"dmdctl {args[0]} {why}:\n{tail}")
    r["rss_mb"] = r["maxrss_kb"] / 1024
    return r


def has_command(name: str) -> bool:
    res = subprocess.run(
        [sys.executable, "-m", "dmdctl", name, "--help"],
        cwd=REPO,
        env=child_env(1),
        capture_output=True,
        text=True,
    )
    return res.returncode == 0


def log_steps(log: Path, batch: int) -> list[float]:
    """Seconds of steps 2.. from the loop's own rate in each log row."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "samples_per_s" in r and r["step"] >= 2]
    return [batch / r["samples_per_s"] for r in rows if r["samples_per_s"]]


def prompts_line(output: Path) -> str:
    for line in output.read_text(errors="replace").splitlines():
        if line.strip().startswith("prompts:"):
            return line.strip()
    return ""


def distill_run(args, pipe: Path, prompts: Path, name: str, cache: str, extra=()) -> dict:
    run = args.work / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    log = run / "log.jsonl"
    cmd = ["distill", "--teacher-path", pipe, "--prompts", prompts, "--reg-weight", "0",
           "--batch-size", args.batch_size, "--fake-updates", args.fake_updates,
           "--plot-samples", "0", "--cpu", "--mixed-precision", "no", "--steps", args.steps,
           "--log-every", "1", "--checkpoint-every", "1000", "--prompt-cache", cache,
           "--out", run, *extra]  # fmt: skip
    say(f"data_scale: distill {name}")
    r = run_cli(cmd, args.work / "logs" / f"{name}.txt", args.threads, args.timeout, log)
    steps = log_steps(log, args.batch_size)
    r.update(
        step_s=statistics.median(steps) if steps else None,
        step_min=min(steps, default=None),
        step_max=max(steps, default=None),
        steps_s=steps,
        mode=prompts_line(args.work / "logs" / f"{name}.txt"),
    )
    if not args.keep_runs:
        shutil.rmtree(run, ignore_errors=True)
    return r


def combine(runs: list[dict]) -> dict:
    """Repeats of one measurement: median first step and wall, step times pooled (median and
    range), the largest peak RSS; each repeat kept under "repeats"."""
    steps = [t for r in runs for t in r["steps_s"]]
    out = dict(runs[0])
    out.update(
        first_row=statistics.median(r["first_row"] for r in runs),
        wall=statistics.median(r["wall"] for r in runs),
        rss_mb=max(r["rss_mb"] for r in runs),
        step_s=statistics.median(steps) if steps else None,
        step_min=min(steps, default=None),
        step_max=max(steps, default=None),
        steps_s=steps,
        repeats=runs,
    )
    return out


def auto_caches(pipe: Path, n: int) -> bool:
    """Whether ``--prompt-cache auto`` would cache ``n`` prompts of this pipeline."""
    from dmdctl.data.prompts import AUTO_CACHE_BYTES, embedding_bytes
    from dmdctl.teachers import resolve_teacher

    return n * embedding_bytes(resolve_teacher(None, pipe)) <= AUTO_CACHE_BYTES


# ------------------------------------------------------------------ data rates (in-process)


def rate(fn, items_per_call: int, min_seconds: float, min_calls: int = 3) -> float:
    fn()  # warm-up
    calls, t0 = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - t0 < min_seconds:
        fn()
        calls += 1
    return calls * items_per_call / (time.perf_counter() - t0)


def data_rates(args, pipe: Path, prompts: Path, store: Path | None) -> dict:
    import torch

    from dmdctl.data.prompts import PromptFile
    from dmdctl.teachers.sd.pipeline import PromptEncoder

    out: dict = {}
    B = args.rate_batch
    t0 = time.perf_counter()
    pf = PromptFile(prompts)
    out["prompt_index_s"] = time.perf_counter() - t0
    out["prompt_rows"] = len(pf)
    gen = torch.Generator().manual_seed(0)

    def rows():
        pf.texts(torch.randint(0, len(pf), (B,), generator=gen).tolist())

    say(f"data_scale: prompt rows/s on {prompts.name}")
    out["prompt_rows_per_s"] = rate(rows, B, args.rate_seconds)
    texts = [prompt_text(i) for i in range(B)]
    encoders = {"tiny": (pipe, 16)}
    if "clip-l" not in args.skip:
        encoders["CLIP-L-sized"] = (make_clip_l(args.work, pipe), 77)
    out["encode_per_s"] = {}
    for name, (folder, tokens) in encoders.items():
        enc = PromptEncoder(folder, "sd")
        for t in args.rate_threads:
            torch.set_num_threads(t)
            say(f"data_scale: {name} encoder, {t} thread(s)")
            out["encode_per_s"][f"{name}, {t} thread(s)"] = {
                "tokens": tokens,
                "threads": t,
                "per_s": rate(partial(enc, texts, "cpu", batch_size=B), B, args.rate_seconds),
            }
    torch.set_num_threads(max(1, args.threads))
    if store is not None:
        from dmdctl.data.real import open_real_store
        from dmdctl.teachers import resolve_teacher

        rs = open_real_store(store, resolve_teacher(None, pipe))
        say(f"data_scale: real rows/s from {store.name}")
        out["real_rows"] = len(rs)
        out["real_rows_per_s"] = rate(
            lambda: rs.rows(torch.randint(0, len(rs), (B,), generator=gen)), B, args.rate_seconds
        )
    return out


# ------------------------------------------------------------------ the report


def mb(x: float) -> str:
    return f"{x:,.0f}"


def scaling_rows(label: str, runs: list[tuple[int, dict]], first_key: str | None) -> list[list]:
    base = runs[0][1]
    rows = []
    for n, r in runs:
        first = r.get(first_key) if first_key else None
        step = r.get("step_s")
        rows.append([
            label,
            f"{n:,}",
            f"{first:.2f}" if first is not None else "-",
            f"{first / base[first_key]:.2f}x" if first is not None else "-",
            f"{step * 1e3:.0f} ({r['step_min'] * 1e3:.0f}-{r['step_max'] * 1e3:.0f})"
            if step is not None else "-",
            f"{step / base['step_s']:.2f}x" if step is not None else "-",
            f"{r['wall']:.2f}",
            mb(r["rss_mb"]),
            f"{r['rss_mb'] - base['rss_mb']:+,.0f}",
        ])  # fmt: skip
    return rows


def targets(label: str, runs: list[tuple[int, dict]], first_key: str | None) -> list[list]:
    if len(runs) < 2:
        return []
    (n0, a), (n1, b) = runs[0], runs[-1]
    what = f"{label}, {n1:,} vs {n0:,}"
    out = [
        [what, f"peak RSS within {RSS_TARGET_MB} MB",
         f"{b['rss_mb'] - a['rss_mb']:+,.0f} MB",
         "met" if b["rss_mb"] - a["rss_mb"] <= RSS_TARGET_MB else "**not met**"],
    ]  # fmt: skip
    if first_key:
        ratio = b[first_key] / a[first_key]
        out.append([what, f"time to first step <= {FIRST_STEP_TARGET:.0f}x", f"{ratio:.2f}x",
                    "met" if ratio <= FIRST_STEP_TARGET else "**not met**"])  # fmt: skip
    if a.get("step_s") and b.get("step_s"):
        tol = max(STEP_TOLERANCE, (a["step_max"] - a["step_min"]) / (2 * a["step_s"]))
        ok = abs(b["step_s"] / a["step_s"] - 1) <= tol
        out.append([what, f"step time within noise (ratio within 1 +- {tol:.2f})",
                    f"{b['step_s'] / a['step_s']:.2f}x",
                    "met" if ok else "**not met**"])  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "data-scale",
                    help="folder of the generated inputs (reused between runs)")  # fmt: skip
    ap.add_argument("--prompts", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    ap.add_argument("--images", type=int, nargs="*", default=[1000, 100_000])
    ap.add_argument("--steps", type=int, default=11, help="distill steps per run (>= 2)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--fake-updates", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=64, help="make-pairs --num-pairs")
    ap.add_argument("--repeats", type=int, default=1,
                    help="distill runs per prompts size, interleaved (medians; max of the RSS)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds a process may take")
    ap.add_argument("--skip", nargs="*", default=[], choices=PARTS,
                    help="parts left out: make-pairs, cache-on (the --prompt-cache on row), real "
                    "(prepare-real and distill with the GAN), rates (in-process data rates), "
                    "clip-l (the CLIP-L-sized encoder's rate: builds a 123M-parameter model)")  # fmt: skip
    ap.add_argument("--rate-threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rate-batch", type=int, default=64)
    ap.add_argument("--rate-seconds", type=float, default=3.0, help="time per rate measured")
    ap.add_argument("--keep-runs", action="store_true", help="keep the run folders")
    ap.add_argument("--json", type=Path, help="write every number to this file")
    ap.add_argument("--record", action="store_true", help="append the tables to BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be at least 2 (step time is measured from steps 2..S)")
    args.prompts, args.images = sorted(set(args.prompts)), sorted(set(args.images))
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(max(1, args.threads))
    pipe = make_pipeline(args.work)
    prompt_files = {n: make_prompts(args.work, n) for n in args.prompts}
    results: dict = {"settings": {k: str(v) if isinstance(v, Path) else v
                                  for k, v in vars(args).items()}}  # fmt: skip
    notes = []

    # distill on each prompts file, streamed; one row with the cache at the smallest size
    # --repeats rounds, interleaved (the order flips each round), summarised per size
    tries: dict[int, list[dict]] = {n: [] for n in args.prompts}
    for k in range(args.repeats):
        for n in args.prompts if k % 2 == 0 else args.prompts[::-1]:
            tries[n].append(distill_run(args, pipe, prompt_files[n], f"distill-{n}", "off"))
    distill = [(n, dict(combine(tries[n]), auto_caches=auto_caches(pipe, n))) for n in args.prompts]
    n0 = args.prompts[0]
    results["distill"] = {str(n): r for n, r in distill}
    cached = None
    if "cache-on" not in args.skip:
        cached = distill_run(args, pipe, prompt_files[n0], f"distill-{n0}-cache-on", "on")
        results["distill_cache_on"] = {str(n0): cached}

    pairs = []
    if "make-pairs" not in args.skip:
        for n in args.prompts:
            out = args.work / "runs" / f"pairs-{n}"
            shutil.rmtree(out, ignore_errors=True)
            say(f"data_scale: make-pairs on {n:,} prompts")
            r = run_cli(["make-pairs", "--teacher-path", pipe, "--prompts", prompt_files[n],
                         "--num-pairs", args.pairs, "--batch-size", 16, "--steps", 2,
                         "--device", "cpu", "--out", out],
                        args.work / "logs" / f"pairs-{n}.txt", args.threads, args.timeout)  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)
            pairs.append((n, r))
        results["make_pairs"] = {str(n): r for n, r in pairs}

    # real images: prepare-real, then distill with the GAN reading the store
    prep, gan, store = [], [], None
    if "real" in args.skip:
        pass
    elif args.images and not has_command("prepare-real"):
        notes.append(
            "Real images: skipped, `dmdctl prepare-real` is not a command in this checkout "
            "(it comes with the real-store branch); run this again once it is merged."
        )
    elif args.images:
        for n in args.images:
            images = make_images(args.work, n)
            store = args.work / "stores" / f"real-{n}"
            shutil.rmtree(store, ignore_errors=True)
            say(f"data_scale: prepare-real on {n:,} images")
            r = run_cli(["prepare-real", images, "--teacher-path", pipe, "--out", store,
                         "--batch-size", 64, "--device", "cpu"],
                        args.work / "logs" / f"prepare-real-{n}.txt", args.threads,
                        args.timeout)  # fmt: skip
            r["images_per_s"] = n / r["wall"]
            prep.append((n, r))
            g = distill_run(args, pipe, prompt_files[n0], f"distill-gan-{n}", "off",
                            ["--gan-weight", "0.01", "--real-data", store])  # fmt: skip
            gan.append((n, g))
        results["prepare_real"] = {str(n): r for n, r in prep}
        results["distill_gan"] = {str(n): r for n, r in gan}

    rates = None
    if "rates" not in args.skip:
        rates = data_rates(args, pipe, prompt_files[args.prompts[-1]], store)
        results["rates"] = rates

    # ---- tables
    headers = ["run", "size", "first step (s)", "vs smallest", "step (ms, range)",
               "vs smallest", "wall (s)", "peak RSS (MB)", "RSS vs smallest (MB)"]  # fmt: skip
    rows = scaling_rows("distill, prompts streamed (--prompt-cache off)", distill, "first_row")
    if cached is not None:  # compared with the streamed row of the same size
        rows += scaling_rows("distill, --prompt-cache on", [(n0, cached)], "first_row")
        rows[-1][3] = f"{cached['first_row'] / distill[0][1]['first_row']:.2f}x vs off"
        rows[-1][5] = f"{cached['step_s'] / distill[0][1]['step_s']:.2f}x vs off"
        rows[-1][8] = f"{cached['rss_mb'] - distill[0][1]['rss_mb']:+,.0f} vs off"
    if pairs:
        rows += scaling_rows(f"make-pairs, {args.pairs} pairs", pairs, None)
    if prep:
        rows += scaling_rows("prepare-real", prep, None)
        rows += scaling_rows(f"distill + GAN, {n0:,} prompts, real store", gan, "first_row")
    checks = targets("distill, prompts", distill, "first_row")
    if pairs:
        checks += targets("make-pairs, prompts", pairs, None)
    if prep:
        checks += targets("prepare-real, images", prep, None)
        checks += targets("distill + GAN, real images", gan, "first_row")
    autos = ", ".join(f"{n:,}: {'cache' if r['auto_caches'] else 'encode'}" for n, r in distill)
    B, F = args.batch_size, args.fake_updates
    step0 = distill[0][1]["step_s"]
    body = (
        f"Tiny random SD1.5-style pipeline (16 px images, 8x8 latents, a 2-layer 16-wide CLIP "
        f"text encoder, 16 tokens), CPU, {args.threads} torch "
        f"thread(s) per process, float32. distill: --batch-size {B} --fake-updates {F} "
        f"--reg-weight 0 --steps {args.steps} --log-every 1, {args.repeats} run(s) per prompts size "
        "(interleaved; medians, the largest RSS); make-pairs: --num-pairs "
        f"{args.pairs} --batch-size 16 --steps 2. Peak RSS = ru_maxrss of the process from "
        "os.wait4 in a small wrapper process; first step = process start to the first "
        "log.jsonl row; step = median over steps 2.. of the loop's own rate (range in "
        "brackets). The distill rows stream every size (--prompt-cache off); --prompt-cache "
        f"auto would have chosen {autos}.\n\n" + md_table(headers, rows)
    )
    if prep:
        (na, ra), (nb, rb) = prep[0], prep[-1]
        marginal = (
            f"; between the sizes {(nb - na) / (rb['wall'] - ra['wall']):,.0f} images/s"
            if nb > na and rb["wall"] > ra["wall"]
            else ""
        )
        body += (
            "\n\nprepare-real: "
            + ", ".join(
                f"{n:,} images in {r['wall']:.1f} s ({r['images_per_s']:,.0f} images/s, start-up "
                "included)"
                for n, r in prep
            )
            + marginal
        )
    if checks:
        body += "\n\n" + md_table(["sizes", "target", "measured", "verdict"], checks)
    if rates:
        per_step_prompts = B * F
        rrows = [
            [f"prompt rows ({rates['prompt_rows']:,}-row file, random, batch {args.rate_batch})",
             f"{rates['prompt_rows_per_s']:,.0f} rows/s",
             f"{per_step_prompts / step0:,.0f} prompts/s" if step0 else "-"],
        ]  # fmt: skip
        for name, e in rates["encode_per_s"].items():
            rrows.append([f"prompts encoded, {name} ({e['tokens']} tokens, fp32)",
                          f"{e['per_s']:,.0f} prompts/s",
                          f"{per_step_prompts / step0:,.0f} prompts/s" if step0 else "-"])  # fmt: skip
        if "real_rows_per_s" in rates:
            g0 = gan[0][1]["step_s"] if gan else None
            rrows.append([f"real latents ({rates['real_rows']:,}-row store, random, batch "
                          f"{args.rate_batch})", f"{rates['real_rows_per_s']:,.0f} rows/s",
                          f"{B * F / g0:,.0f} rows/s" if g0 else "-"])  # fmt: skip
        body += (
            f"\n\nData rates in one process (indexing the {rates['prompt_rows']:,}-row prompts "
            f"file took {rates['prompt_index_s']:.2f} s). One generator step with F fake "
            "updates consumes B*F prompts encoded (B for the generator, reused by the first "
            "fake update, B fresh for each further one), plus P pair prompts with "
            "--reg-weight > 0 and pairs; with the GAN also B*F real rows and their B*F captions "
            f"encoded. Here B={B}, F={F}: {B * F} prompts per step at the measured "
            f"{step0 * 1e3:.0f} ms a step (the right column).\n\n"
            + md_table(["source", "a process sustains", "one distill step here consumes"], rrows)
        )
    for note in notes:
        body += f"\n\n{note}"
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return finish(
        args,
        "Data scale: distill and make-pairs on 10^3..10^6 prompts and 10^3..10^5 real images",
        body,
        "benchmarks.data_scale",
    )


if __name__ == "__main__":
    main()
