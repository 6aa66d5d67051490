"""The speed suite at tiny sizes: every part runs, prints its ratio columns, records only when
asked, and skips a row cleanly when a package is missing. (Speed itself is checked by running
the benchmarks, never by timing assertions here.)"""

import re

import pytest
from benchmarks import all as suite
from benchmarks import common, one_step


@pytest.fixture
def bench_root(tmp_path, monkeypatch):
    """BENCHMARKS.md goes to a temporary folder, never the repository's."""
    monkeypatch.setattr(common, "ROOT", tmp_path)
    return tmp_path


@pytest.mark.slow  # ~18 s: every part of the speed suite at tiny sizes
def test_quick_suite_prints_ratios_and_records(bench_root, capsys):
    assert suite.main(["--device", "cpu", "--quick", "--record"]) == 0
    out = capsys.readouterr().out
    for column in (
        "speed-up / NFE ratio",  # one_step
        "overhead vs passes",  # train_step
        "bare heun_sample",  # make_pairs_speed
        "ratio / agreement",  # fid_speed
        "step peak above the built trainer",  # memory
    ):
        assert column in out, column
    # every ratio cell holds a number
    one = out[out.index("speed-up / NFE ratio |") :].split("\n\n")[0]
    assert len(re.findall(r"\| \*\*\d+\.\d\d\*\* \|", one)) == 2, one
    step = out[out.index("overhead vs passes |") :].split("\n\n")[0]
    assert len(re.findall(r"\*\*[+-]\d+\.\d%\*\*", step)) == 2, step
    assert "skipped on CPU" in out  # the real-size rows need a GPU
    for variant in (
        "fused AdamW",
        "channels-last",
        "batched (vmap)",
        "bf16 autocast",
        "inference_mode",
    ):
        assert re.search(rf"\| digits \| [^|]*{re.escape(variant)}[^|]* \| ", out), variant
    md = (bench_root / "BENCHMARKS.md").read_text()
    assert md.count("\n## ") == 5
    assert md.count("python -m benchmarks.all --device cpu --quick --record") == 5
    assert "this part: `python -m benchmarks.train_step" in md
    assert md.count("- machine: ") == 5 and md.count("- date: ") == 5


def test_no_record_without_the_flag(bench_root):
    body = one_step.main(["--device", "cpu", "--repeats", "1", "--steps", "1",
                          "--teachers", "toy2d", "--batch", "toy2d=16"])  # fmt: skip
    assert "speed-up / NFE ratio" in body
    assert not (bench_root / "BENCHMARKS.md").exists()


def test_missing_package_skips_the_row(bench_root, monkeypatch):
    monkeypatch.setitem(common.TEACHER_PACKAGES, "digits", ("no_such_package_dmdctl",))
    body = one_step.main(["--device", "cpu", "--repeats", "1", "--teachers", "digits"])
    assert "skipped: needs no_such_package_dmdctl (not installed)" in body


@pytest.mark.parametrize(
    "size, recipe", [("tiny-xl", "sdxl"), ("tiny-sd3", "sd3"), ("tiny-flux", "flux-dev")]
)
def test_sdxl_sd3_and_flux_step_benchmark_runs_at_tiny_size(
    size, recipe, bench_root, monkeypatch, capsys, hf_offline
):
    """The prepared SDXL-, SD3- and FLUX.1-dev-shaped step benchmark (for real shapes on a GPU)
    works end to end at tiny sizes: DMD2's SDXL recipe (5 fake updates, GAN, 4 steps), the sd3
    recipe (5 fake updates, 4 flow steps), the flux-dev recipe (4 fake updates, GAN, 4 flow
    steps, with checkpointing, and LoRA on the fake score too), full and LoRA side by side."""
    import sys

    from benchmarks import sd_step

    flux = recipe == "flux-dev"
    ckpt = ["on"] if flux else ["off"]
    argv = ["sd_step", "--size", size, "--recipe", recipe, "--device", "cpu",
            "--batch-sizes", "2", "--checkpointing", *ckpt, "--steps", "1", "--warmup", "1",
            "--precision", "no", "--lora-ranks", "0", "4", "--prompt-cache", "off"]  # fmt: skip
    if flux:
        argv += ["--fake-lora-rank", "4"]
    monkeypatch.setattr(sys, "argv", argv)
    sd_step.main()
    out = capsys.readouterr().out
    assert "encoded in each step" in out  # the step of a large prompt set, encoders in it
    fakes = 4 if flux else 5
    for what in ("full", "LoRA 4"):  # full fine-tuning and LoRA side by side
        what += ", fake LoRA 4" if flux else ""
        for c in ckpt:
            row = re.search(rf"\| base \| {what} \| {c} \| 2 \| {fakes} \| (\d+\.\d+) \|", out)
            assert row and float(row.group(1)) > 0, out
    assert '"generator_steps": 4' in out
    assert f'"gan": {"true" if recipe != "sd3" else "false"}' in out
    monkeypatch.setattr(sys, "argv", ["sd_step", "--size", size, "--recipe", "sd15"])
    with pytest.raises(SystemExit):
        sd_step.main()


def data_scale_at_tiny_sizes(tmp_path, capsys, skip: list[str]) -> tuple[str, dict]:
    import json

    from benchmarks import data_scale

    out = tmp_path / "numbers.json"
    body = data_scale.main(["--work", str(tmp_path / "work"), "--prompts", "50", "200",
                            "--images", "20", "--steps", "2", "--rate-threads", "1",
                            "--rate-seconds", "0.2", "--json", str(out), "--skip", *skip])  # fmt: skip
    assert body in capsys.readouterr().out
    for n in ("50", "200"):
        row = re.search(
            rf"\| distill, prompts streamed \(--prompt-cache off\) \| {n} \| (\d+\.\d\d) \| "
            r"\d+\.\d\dx \| (\d+) \(\d+-\d+\) \| \d+\.\d\dx \| \d+\.\d\d \| ([\d,]+) \|",
            body,
        )
        assert row and float(row.group(1)) > 0 and int(row.group(3).replace(",", "")) > 0, body
    assert re.search(r"peak RSS within 64 MB \| [+-]\d+ MB \| (met|\*\*not met\*\*) \|", body)
    assert "time to first step <= 2x" in body
    assert re.search(r"prompts encoded, tiny, 1 thread\(s\) \(16 tokens, fp32\) \| [\d,]+ ", body)
    numbers = json.loads(out.read_text())
    assert set(numbers["distill"]) == {"50", "200"}
    assert numbers["distill"]["50"]["rss_mb"] > 0 and numbers["distill"]["50"]["step_s"] > 0
    if "prepare_real" in numbers:
        assert re.search(r"\| prepare-real \| 20 \|", body), body
        assert numbers["distill_gan"]["20"]["step_s"] > 0
    else:
        assert "`dmdctl prepare-real` is not a command in this checkout" in body
    return body, numbers


@pytest.mark.slow  # 23 s: the default suite stays under 3 minutes on 2 cores (CI runs it)
def test_data_scale_runs_at_tiny_sizes(bench_root, tmp_path, capsys):
    """The data-scale benchmark end to end at tiny sizes (~25 s): distill on each prompts file
    as its own measured process, the table with ratios against the smallest size, the target
    verdicts, the data rates and the JSON of every number; the real-image part runs (two more
    processes) or says why not."""
    body, numbers = data_scale_at_tiny_sizes(tmp_path, capsys, ["make-pairs", "cache-on", "clip-l"])
    assert "make-pairs" not in numbers and "--prompt-cache on |" not in body
    assert not (bench_root / "BENCHMARKS.md").exists()


@pytest.mark.slow  # ~40 s: three more dmdctl processes (make-pairs twice, the cache row)
def test_data_scale_every_part_at_tiny_sizes(bench_root, tmp_path, capsys):
    body, numbers = data_scale_at_tiny_sizes(tmp_path, capsys, ["clip-l"])
    for n in ("50", "200"):
        assert re.search(rf"\| make-pairs, 64 pairs \| {n} \| - \|", body), body
    assert "| distill, --prompt-cache on | 50 |" in body and "vs off" in body
    assert set(numbers["make_pairs"]) == {"50", "200"}


def test_digits_step_benchmark_compares_the_same_step(bench_root, capsys):
    """The digits step benchmark times the step before the bottleneck-ended passes against the
    shipped one, after checking that both compute the same losses."""
    from benchmarks import digits_step

    body = digits_step.main(["--runs", "dmd2", "--repeats", "1", "--batch-size", "8",
                             "--clock", "cpu"])  # fmt: skip
    assert "| dmd2 | previous |" in body and "+ bf16" in body
    assert re.search(r"max relative difference \d\.\de-\d\d", body)
    assert len(re.findall(r"\*\*\d+\.\d\dx\*\*", body)) == 4


def test_wan_step_benchmark_runs_at_tiny_size(hf_offline):
    """The prepared Wan 2.1 1.3B step benchmark (run at real shapes on a GPU) works end to end
    at tiny size: the wan-t2v-1.3b recipe's 3 flow steps and 5 fake updates on 5-D latents."""
    from benchmarks import wan_step

    rows = wan_step.main(["--size", "tiny", "--video-size", "5x32x32", "--device", "cpu",
                          "--precision", "no", "--steps", "1", "--warmup", "1"])  # fmt: skip
    (row,) = rows
    assert row["latent"] == [16, 2, 4, 4] and row["generator_steps"] == 3
    assert row["fake_updates"] == 5 and row["finite"] and row["step_s"] > 0


@pytest.mark.slow
def test_digits_curves_scores_each_checkpoint_and_diagnoses_the_head(bench_root, tmp_path):
    """The quality-against-budget benchmark at tiny size: a DMD2 run stopped at each scoring
    step, scored with intervals, its GAN head diagnosed per noise band, and the PNG written."""
    from benchmarks import digits_curves

    args = ["--runs", "dmd2", "--steps", "2", "--every", "1", "--samples", "200",
            "--bootstrap", "5", "--out", str(tmp_path / "c"), "--plot", str(tmp_path / "c.png"),
            "--set", "batch_size=8"]  # fmt: skip
    body = digits_curves.main(args)
    assert "| dmd2 | 0 | 1 |" in body and "| dmd2 | 0 | 2 |" in body
    assert "| teacher 35 NFE |" in body
    # four noise bands of head accuracy, each a fraction
    row = next(line for line in body.splitlines() if line.startswith("| dmd2 | 0 | 2 |"))
    assert len(re.findall(r"\b[01]\.\d\d\b", row.split("|")[-2])) == 4
    assert (tmp_path / "c.png").stat().st_size > 0
    assert sorted(
        p.name for p in (tmp_path / "c" / "seed0" / "dmd2" / "checkpoints").iterdir()
    ) == [
        "step-0000001",
        "step-0000002",
    ]
