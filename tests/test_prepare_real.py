"""``dmdctl prepare-real`` and the store it makes: what goes in comes back out by row, a stopped
run resumes to the same bytes, two processes make what one makes, and a store that does not
fit the teacher (or was damaged) is refused in one line.

The bad inputs that must leave nothing behind are in tests/test_bad_inputs.py (documented in
docs/ERRORS.md); the ones here need the tiny SD pipeline's store or look at what is kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from cli_helpers import (
    PROCESS_ENV,
    SD_PROMPTS,
    captioned_images,
    free_port,
    ok,
    one_line_error,
    run,
)
from dmdctl.commands.prepare_real import prepare_real
from dmdctl.data import real_store
from dmdctl.data.real import open_real_store
from dmdctl.data.real_store import read_images, to_unit_range
from dmdctl.errors import UserError
from dmdctl.files import sha256_file
from dmdctl.settings.prepare_real import PrepareRealConfig
from dmdctl.teachers import resolve_teacher


def digits_npz(path: Path, n: int = 40, compressed: bool = False) -> Path:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    (np.savez_compressed if compressed else np.savez)(path, images, labels)
    return path


def shard_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(Path(folder).glob("real-*.arrow"))}


def manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def sd_store(sd_pipe, tmp_path_factory):
    """5 captioned 20x24 images made into a store for the tiny SD pipeline (16x16 images,
    latents [4, 8, 8]) in shards of 2, from a relative SOURCE path."""
    root = tmp_path_factory.mktemp("sdreal")
    folder = captioned_images(root / "images", n=5)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = prepare_real(
            PrepareRealConfig(
                "images", teacher_path=str(sd_pipe), out="store", shard_size=2, batch_size=2
            )
        )
    finally:
        os.chdir(cwd)
    return folder, root / "store", result


def test_captioned_folder_gives_the_vae_latents_and_captions_by_row(
    sd_store, sd_pipe, hf_offline, monkeypatch, tmp_path
):
    folder, store_dir, result = sd_store
    assert result["rows"] == 5 and result["skipped"] == 0 and result["complete"] is True
    m = manifest(store_dir)
    assert m["complete"] and m["rows"] == 5 and len(m["shards"]) == 3
    assert m["kind"] == "latents" and m["dtype"] == "float16" and m["sample_shape"] == [4, 8, 8]
    assert m["source"]["path"] == str(folder.resolve()) and m["conditioning"] == "captions"
    teacher = resolve_teacher(None, sd_pipe)
    monkeypatch.chdir(tmp_path)  # the store works from any folder
    store = open_real_store(store_dir, teacher)
    assert len(store) == 5 and store.num_shards == 3
    files = [folder / f"{i}.png" for i in range(5)]
    with torch.no_grad():
        want = teacher.codec.encode(to_unit_range(read_images(files, 3, 16))).half().float()
    idx = torch.tensor([4, 0, 3, 3, 1, 2])
    x, captions = store.rows(idx)
    assert x.dtype == torch.float32 and x.shape == (6, 4, 8, 8)
    # the same encode, rounded to fp16 (a batch of 2 vs 5 may differ by float rounding)
    torch.testing.assert_close(x, want[idx], rtol=2e-3, atol=1e-4)
    assert captions == [SD_PROMPTS[i % len(SD_PROMPTS)] for i in idx.tolist()]
    store.verify(range(store.num_shards))


def test_npz_with_labels_gives_the_pixels_and_labels(tmp_path, monkeypatch):
    """Uncompressed (seek) and compressed (read forward) npz: arr_0 and arr_1 come back as
    they were, and no read of the archive asks for more than one shard of images (memory
    itself is not measured)."""
    import zipfile

    teacher = resolve_teacher("digits", None)
    real_read, sizes = zipfile.ZipExtFile.read, []

    def read(self, n=-1):
        sizes.append(n)
        return real_read(self, n)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read)
    for compressed in (False, True):
        npz = digits_npz(tmp_path / f"d{int(compressed)}.npz", compressed=compressed)
        out = tmp_path / f"store{int(compressed)}"
        sizes.clear()
        ok(run("prepare-real", npz, "--teacher", "digits", "--out", out, "--shard-size", 16))
        assert sizes and -1 not in sizes and max(sizes) <= 16 * 8 * 8  # one shard of images
        store = open_real_store(out, teacher)
        data = np.load(npz)
        idx = torch.tensor([39, 0, 17, 16, 15, 33, 17])
        x, labels = store.rows(idx)
        pixels = torch.from_numpy(data["arr_0"][idx.numpy()]).permute(0, 3, 1, 2)
        assert torch.equal(x, pixels.float() / 127.5 - 1)
        assert torch.equal(labels, torch.from_numpy(data["arr_1"][idx.numpy()]).long())
        assert manifest(out)["shards"][2]["count"] == 8


def test_plain_folder_for_an_unconditional_pixel_teacher(tmp_path):
    from PIL import Image

    from dmdctl.teachers import KINDS, preset_config, save_teacher

    _, base = preset_config("digits")
    config = dict(base, num_classes=0)
    path = tmp_path / "uncond.safetensors"
    save_teacher(KINDS["digits"].build(config), KINDS["digits"], config, path)
    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("b.png", "a.png", "sub/c.png"):
        Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).save(
            tmp_path / "imgs" / name
        )
    out = tmp_path / "store"
    ok(run("prepare-real", tmp_path / "imgs", "--teacher-path", path, "--out", out))
    store = open_real_store(out, resolve_teacher(None, path))
    x, cond = store.rows(torch.arange(3))
    files = [tmp_path / "imgs" / n for n in ("a.png", "b.png", "sub/c.png")]
    assert cond is None
    assert torch.equal(x, to_unit_range(read_images(files, 1, 8)))


def test_stopped_run_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """SIGTERM in the middle of shard 2: shards 0-1 are kept, the rerun makes 2-4 only, and
    the shards are byte-identical to a run that was never stopped; every record once."""
    npz = digits_npz(tmp_path / "d.npz")
    cfg = dict(teacher="digits", shard_size=8, batch_size=4)
    prepare_real(PrepareRealConfig(str(npz), out=str(tmp_path / "whole"), **cfg))
    real_read = real_store.NpzSource.read
    calls = []

    def read_then_sigterm(self, first, count, mode, size):
        calls.append(first)
        if first == 20:  # the second batch of shard 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real_read(self, first, count, mode, size)

    monkeypatch.setattr(real_store.NpzSource, "read", read_then_sigterm)
    out = tmp_path / "stopped"
    result = prepare_real(PrepareRealConfig(str(npz), out=str(out), **cfg))
    assert result["interrupted"] == "SIGTERM" and result["rows"] == 16
    assert not manifest(out)["complete"] and sorted(shard_hashes(out)) == [
        "real-00000.arrow",
        "real-00001.arrow",
    ]
    teacher = resolve_teacher("digits", None)
    with pytest.raises(UserError, match=r"is incomplete \(2 of 5 shards\)"):
        open_real_store(out, teacher)
    monkeypatch.setattr(real_store.NpzSource, "read", real_read)
    result = prepare_real(PrepareRealConfig(str(npz), out=str(out), **cfg))
    assert result["made_now"] == 24 and result["resumed_after_shard"] == 2
    assert shard_hashes(out) == shard_hashes(tmp_path / "whole")
    assert manifest(out) == manifest(tmp_path / "whole")
    records = [
        pa.ipc.open_file(pa.memory_map(str(out / name))).get_batch(0).column("record").to_pylist()
        for name in shard_hashes(out)
    ]
    assert sum(records, []) == list(range(40)) == list(range(len(open_real_store(out, teacher))))


def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_store(tmp_path):
    """kill -9 (no clean stop: a half-written shard may be left as .tmp, records unmerged): the
    rerun drops the leftovers, makes only what is missing, and the store is byte-identical to a
    run that was never killed, every record once."""
    from cli_helpers import PROCESS_ENV
    from test_preemption import wait_until

    npz = digits_npz(tmp_path / "d.npz", n=4000)
    cfg = dict(teacher="digits", shard_size=10, batch_size=10)
    prepare_real(PrepareRealConfig(str(npz), out=str(tmp_path / "whole"), **cfg))
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "dmdctl", "prepare-real", str(npz), "--teacher", "digits",
            "--shard-size", "10", "--batch-size", "10", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(argv, env=PROCESS_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_until(proc, lambda: len(list(out.glob("real-*.arrow"))) >= 5)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    kept = len(list(out.glob("real-*.arrow")))
    assert kept < 400  # killed part-way
    result = prepare_real(PrepareRealConfig(str(npz), out=str(out), **cfg))
    assert result["made_now"] <= 4000 - 10 * (kept - 1)
    assert not list(out.glob("*.tmp")) and not (out / ".progress").exists()
    assert shard_hashes(out) == shard_hashes(tmp_path / "whole")
    assert manifest(out) == manifest(tmp_path / "whole")


def test_corrupt_image_stops_naming_file_and_line_and_skip_bad_skips_it(
    sd_pipe, hf_offline, tmp_path
):
    folder = captioned_images(tmp_path / "images", n=4)
    (folder / "2.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    out = tmp_path / "store"
    args = ("prepare-real", folder, "--teacher-path", sd_pipe, "--out", out, "--shard-size", 2)
    r = run(*args)
    one_line_error(r, "could not read image 2.png", "captions.jsonl:3", "--skip-bad-records")
    m = manifest(out)
    assert [e["file"] for e in m["shards"]] == ["real-00000.arrow"] and not m["complete"]
    r = ok(run(*args, "--skip-bad-records"))
    assert "skipped" in r.stdout
    m = manifest(out)
    assert m["complete"] and m["rows"] == 3
    assert m["shards"][1]["skipped"] == [{"record": 2, "why": "not an image PIL can decode"}]
    store = open_real_store(out, resolve_teacher(None, sd_pipe))
    _, captions = store.rows(torch.arange(3))
    assert captions == [SD_PROMPTS[0], SD_PROMPTS[1], SD_PROMPTS[3]]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"file": "0.png"}', "captions.jsonl:2: needs a JSON object with 'file' and 'caption'"),
        ('["0.png", "a cat"]', "captions.jsonl:2: needs a JSON object"),
    ],
)
def test_other_bad_captions_lines_write_nothing(sd_pipe, hf_offline, tmp_path, line, message):
    folder = captioned_images(tmp_path / "images", n=2)
    first = (folder / "captions.jsonl").read_text().splitlines()[0]
    (folder / "captions.jsonl").write_text(f"{first}\n{line}\n")
    out = tmp_path / "store"
    one_line_error(run("prepare-real", folder, "--teacher-path", sd_pipe, "--out", out), message)
    assert not out.exists()


def test_store_for_another_teacher_or_damaged_is_refused(sd_store, sd_pipe, hf_offline, tmp_path):
    import shutil

    from dmdctl.teachers.sd.testing import build_pipeline

    _, store_dir, _ = sd_store
    other = resolve_teacher(None, build_pipeline(tmp_path / "other", seed=1))
    with pytest.raises(UserError, match="was made with another VAE"):
        open_real_store(store_dir, other)
    with pytest.raises(
        UserError, match=r"teacher with samples in latents, this teacher has pixels"
    ):
        open_real_store(store_dir, resolve_teacher("digits", None))
    with pytest.raises(UserError, match="has no manifest.json"):
        open_real_store(tmp_path, other)
    teacher = resolve_teacher(None, sd_pipe)
    copy = tmp_path / "copy"
    shutil.copytree(store_dir, copy)
    shard = copy / "real-00001.arrow"
    data = shard.read_bytes()
    store = open_real_store(copy, teacher)
    store.rows(torch.tensor([2]))  # shard 1 is open (memory-mapped) now
    row3 = store._shard(1, 2).x[1].tobytes()
    shard.write_bytes(data[:-40])
    with pytest.raises(UserError, match=r"real-00001.arrow \(row 3\) was changed or truncated"):
        store.rows(torch.tensor([3]))
    with pytest.raises(UserError, match="real-00001.arrow is .* bytes, the manifest says"):
        open_real_store(copy, teacher)
    flipped = bytearray(data)
    at = data.find(row3)  # row 3's latents
    flipped[at + 1] ^= 0x01  # Arrow reads the file without complaint
    shard.write_bytes(bytes(flipped))
    store = open_real_store(copy, teacher)
    store.rows(torch.tensor([2, 3]))
    store.verify([0])
    with pytest.raises(UserError, match="real-00001.arrow is corrupt"):
        store.verify([0, 1])


def test_two_processes_make_the_store_one_makes(sd_store, sd_pipe, tmp_path):
    folder, store_dir, _ = sd_store
    env = dict(PROCESS_ENV, HF_HUB_OFFLINE="1")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), "-m", "dmdctl", "prepare-real", str(folder),
         "--teacher-path", str(sd_pipe), "--out", str(tmp_path / "two"), "--shard-size", "2",
         "--batch-size", "2", "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert shard_hashes(tmp_path / "two") == shard_hashes(store_dir)
    assert manifest(tmp_path / "two")["shards"] == manifest(store_dir)["shards"]


def test_parquet_with_image_structs_and_text_is_read_by_row_group(
    sd_store, sd_pipe, hf_offline, tmp_path
):
    """Hugging Face style Parquet (image struct with bytes, a 'text' column), two files of
    row groups of 2, shards of 3 spanning them: the same latents and captions as the folder."""
    import pyarrow.parquet as pq

    folder, store_dir, _ = sd_store
    images = [{"bytes": (folder / f"{i}.png").read_bytes(), "path": f"{i}.png"} for i in range(5)]
    texts = [SD_PROMPTS[i % len(SD_PROMPTS)] for i in range(5)]
    (tmp_path / "pq").mkdir()
    for name, part in (("a", slice(0, 3)), ("b", slice(3, 5))):
        table = pa.table({"text": texts[part], "image": images[part]})
        pq.write_table(table, tmp_path / "pq" / f"{name}.parquet", row_group_size=2)
    out = tmp_path / "store"
    args = ("--teacher-path", sd_pipe, "--out", out, "--shard-size", 3, "--batch-size", 2)
    ok(run("prepare-real", tmp_path / "pq", *args))
    teacher = resolve_teacher(None, sd_pipe)
    idx = torch.tensor([4, 1, 3, 0, 2])
    x, captions = open_real_store(out, teacher).rows(idx)
    x_folder, captions_folder = open_real_store(store_dir, teacher).rows(idx)
    # other shard sizes batch the VAE differently: equal up to float (then fp16) rounding
    torch.testing.assert_close(x, x_folder, rtol=2e-3, atol=1e-4)
    assert captions == captions_folder
    assert manifest(out)["source"]["caption_column"] == "text"
    r = run("prepare-real", tmp_path / "pq", *args, "--image-column", "picture")
    one_line_error(r, "a.parquet has no column 'picture'", "--image-column")
