"""`dmdctl clip-score` on a folder of images: each image scored with its own prompt, from the
images.jsonl `dmdctl sample` writes or a plain prompts file, with one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_helpers import ok, one_line_error, run
from dmdctl.metrics.clip import clip_cosines
from test_clip_score import CAPTIONS, uint8_images

pytest.importorskip("transformers")


@pytest.fixture
def folder(tmp_path):
    from PIL import Image

    imgs = uint8_images(4, 3)
    (tmp_path / "images").mkdir()
    rows = []
    for i, img in enumerate(imgs):
        Image.fromarray(img.transpose(1, 2, 0)).save(tmp_path / "images" / f"{i:05d}.png")
        rows.append({"file": f"images/{i:05d}.png", "seed": i, "prompt": CAPTIONS[i]})
    # listed out of order: the command must follow the file names, not the order
    (tmp_path / "images.jsonl").write_text("\n".join(json.dumps(r) for r in rows[::-1]) + "\n")
    (tmp_path / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n")
    return tmp_path, imgs


def test_clip_score_of_a_sampled_folder(folder, tiny_clip):
    root, imgs = folder
    want = clip_cosines(torch.from_numpy(imgs), CAPTIONS, tiny_clip).mean()
    for prompts in ("images.jsonl", "prompts.txt"):
        out = root / f"{prompts}.json"
        r = ok(run("clip-score", "--images", root / "images", "--prompts", root / prompts,
                   "--clip-model", tiny_clip, "--json", out))  # fmt: skip
        assert "clip_score" in r.output
        res = json.loads(out.read_text())
        assert res["num_images"] == 4
        assert res["clip_score"] == pytest.approx(want, rel=1e-5, abs=1e-6), prompts
    # a different prefix changes what is scored
    out = root / "prefixed.json"
    ok(run("clip-score", "--images", root / "images", "--prompts", root / "prompts.txt",
           "--clip-model", tiny_clip, "--prefix", "a photo depicts ", "--json", out))  # fmt: skip
    assert not np.isclose(json.loads(out.read_text())["clip_score"], want)


def test_clip_score_bad_inputs(folder, tiny_clip):
    root, _ = folder
    (root / "three.txt").write_text("a\nb\nc\n")
    one_line_error(run("clip-score", "--images", root / "images", "--prompts", root / "three.txt",
                       "--clip-model", tiny_clip), "holds 4 images but", "has 3 prompts")  # fmt: skip
    one_line_error(run("clip-score", "--images", root / "images", "--prompts", root / "none.txt",
                       "--clip-model", tiny_clip), "prompts file not found")  # fmt: skip
    one_line_error(run("clip-score", "--images", root / "images", "--prompts", root / "prompts.txt"),
                   "pass --clip-model")  # fmt: skip
    (root / "images" / "00002.png").unlink()
    one_line_error(run("clip-score", "--images", root / "images", "--prompts",
                       root / "images.jsonl", "--clip-model", tiny_clip),
                   "do not exist", "00002.png")  # fmt: skip
