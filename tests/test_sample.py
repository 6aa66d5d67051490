"""``sample`` (dmdctl.commands.sample): samples of a generator or of the teacher's sampler."""

import json

from cli_helpers import run


def test_sample_and_eval_fid_of_the_teacher(toy_teacher, tmp_path):
    r = run(
        "sample", "--teacher-path", toy_teacher, "--steps", 4, "--num", 300, "--out", tmp_path / "s"
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s" / "samples.png").stat().st_size > 0
    r = run(
        "eval-fid",
        "--teacher-path",
        toy_teacher,
        "--steps",
        4,
        "--num-samples",
        500,
        "--json",
        tmp_path / "f.json",
    )
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "f.json").read_text())
    assert {
        "fid",
        "num_samples",
        "reference",
        "features",
        "modes_covered",
        "frac_within_3std",
    } <= set(result)
    assert result["num_samples"] == 500 and result["nfe"] == 7 and result["features"] == "identity"
    # the teacher's 35-NFE sampler puts its samples on the modes; at 1 step it is the blur at the
    # data mean (the conftest teacher measured 8/8 modes, 0.63 within 3 std; 1 step 0/8, 0.02)
    scores = {}
    for steps in (18, 1):
        r = run(
            "eval-fid", "--teacher-path", toy_teacher, "--steps", steps, "--num-samples", 500,
            "--json", tmp_path / f"f{steps}.json",
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        scores[steps] = json.loads((tmp_path / f"f{steps}.json").read_text())
    assert scores[18]["modes_covered"] == 8 and scores[18]["frac_within_3std"] > 0.4, scores
    assert scores[1]["modes_covered"] == 0 and scores[1]["frac_within_3std"] < 0.1, scores


def test_a_single_prompt_makes_4_images_or_2_videos_as_the_help_says(sd_pipe, tmp_path, hf_offline):
    """``sample --prompt`` without --num: 4 images of a text-to-image generator, 2 videos of a
    video (Wan) one, each seed --seed+i with the prompt; what ``sample --help`` says of --num."""
    from dmdctl.generators import save_generator
    from dmdctl.settings.sample import SampleConfig
    from dmdctl.teachers import resolve_teacher
    from dmdctl.teachers.wan.testing import build_wan_pipeline

    wan = build_wan_pipeline(tmp_path / "wan")
    want = {"images": (sd_pipe, {}), "videos": (wan, {"video_size": "5x32x32"})}
    for sub, (pipe, kw) in want.items():
        t = resolve_teacher(None, pipe, **kw)
        gen = save_generator(t.denoiser, t.kind.name, t.config, t.sha256, tmp_path / f"{sub}.g")
        r = run("sample", "--generator", gen, "--prompt", "a red dog", "--seed", 3, "--out",
                tmp_path / sub, "--device", "cpu", "--no-plot")  # fmt: skip
        assert r.exit_code == 0, r.output
        rows = [json.loads(x) for x in (tmp_path / sub / f"{sub}.jsonl").read_text().splitlines()]
        assert [(x["seed"], x["prompt"]) for x in rows] == [
            (3 + i, "a red dog") for i in range({"images": 4, "videos": 2}[sub])
        ]
        assert all((tmp_path / sub / x["file"]).stat().st_size > 0 for x in rows)
    shown = SampleConfig.__dataclass_fields__["num"].metadata["show_default"]
    assert "for --prompt 4 images or 2 videos" in shown
