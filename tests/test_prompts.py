"""Prompt files read by row, and prompt conditions encoded in the step or cached: both paths
give the same conditioning, bad rows are named before anything is written."""

import pytest
import torch

from cli_helpers import SD_PROMPTS, ok, run
from dmdctl.data import prompts as dp
from dmdctl.data.prompts import PromptFile, setup_prompt_conditions
from dmdctl.errors import UserError


@pytest.fixture(scope="module")
def xl_pipe(tmp_path_factory):
    from dmdctl.teachers.sd.testing import build_xl_pipeline

    return build_xl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


@pytest.fixture(scope="module")
def sd3_pipe(tmp_path_factory):
    from dmdctl.teachers.sd.testing import build_sd3_pipeline

    return build_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


def test_text_and_jsonl_files_are_read_by_row(tmp_path, monkeypatch):
    monkeypatch.setattr(dp, "SCAN_CHUNK", 7)  # lines cut across reads
    p = tmp_path / "p.txt"
    p.write_bytes("a cat\r\n\n   \nün chien rouge\n  the sky  \nlast line, no newline".encode())
    f = PromptFile(p)
    assert len(f) == 4
    assert f.texts([3, 0, 2, 1, 0]) == [
        "last line, no newline", "a cat", "the sky", "ün chien rouge", "a cat",
    ]  # fmt: skip
    j = tmp_path / "p.jsonl"
    j.write_text(
        '{"caption": "a cat"}\n\n{"prompt": "a dog", "id": 3}\n{"text": "x", "caption": "y"}\n'
    )
    assert PromptFile(j).texts(range(3)) == ["a cat", "a dog", "y"]
    # what the index holds: 12 bytes a row, however long the prompts
    big = tmp_path / "big.txt"
    big.write_text("".join(f"prompt number {i} " + "x" * (i % 50) + "\n" for i in range(5000)))
    g = PromptFile(big)
    assert len(g) == 5000 and g[4321] == "prompt number 4321 " + "x" * (4321 % 50)
    assert g.starts.nbytes + g.lengths.nbytes == 12 * 5000


def test_arrow_and_parquet_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(5)), "text": [f"prompt {i}" for i in range(5)]})
    with pa.ipc.new_file(str(tmp_path / "p.arrow"), table.schema) as w:
        w.write_table(table)
    assert PromptFile(tmp_path / "p.arrow").texts([4, 1]) == ["prompt 4", "prompt 1"]
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=2)
    f = PromptFile(tmp_path / "p.parquet")
    assert len(f) == 5 and f.texts([4, 0, 3]) == ["prompt 4", "prompt 0", "prompt 3"]
    with pytest.raises(UserError, match="column 'id' holds int64, not text"):
        PromptFile(tmp_path / "p.parquet", "id")
    pq.write_table(pa.table({"id": [1]}), tmp_path / "q.parquet")
    with pytest.raises(UserError, match="no caption/prompt/text column"):
        PromptFile(tmp_path / "q.parquet")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"caption": "a"}\n{"image": "x.png"}\n', "p.jsonl:2 has no 'caption'"),
        ('{"caption": "a"}\n\n{"caption": 3}\n', "p.jsonl:3 has no 'caption'"),
        ('{"caption": "a"}\n{caption\n', "p.jsonl:2 is not valid JSON"),
        ("\n  \n", "holds no prompt"),
    ],
)
def test_bad_rows_are_named(tmp_path, content, message):
    p = tmp_path / "p.jsonl"
    p.write_text(content)
    with pytest.raises(UserError, match=message):
        PromptFile(p)


def test_text_that_is_not_utf8_is_named(tmp_path):
    p = tmp_path / "p.txt"
    p.write_bytes(b"a cat\n\xff\xfe dog\n")
    with pytest.raises(UserError, match=r"p.txt:2 is not UTF-8"):
        PromptFile(p)


def _state():
    from accelerate import PartialState

    return PartialState(cpu=True)


@pytest.mark.parametrize("arch", ["sd", "sdxl", "sd3"])
def test_conditions_encoded_in_the_step_equal_the_cached_table(
    arch, sd_pipe, xl_pipe, sd3_pipe, prompts_file, tmp_path, hf_offline
):
    """The two paths a run can take give the same conditioning (fp32), and the same
    unconditional branch: a run does not change with --prompt-cache."""
    from dmdctl.teachers import resolve_teacher

    pipe = {"sd": sd_pipe, "sdxl": xl_pipe, "sd3": sd3_pipe}[arch]
    teacher = resolve_teacher(None, pipe)
    source = PromptFile(prompts_file)
    state = _state()
    cached, _, line_c = setup_prompt_conditions(teacher, source, None, "on", tmp_path, state, None)
    encoded, _, line_e = setup_prompt_conditions(
        teacher, source, None, "off", tmp_path / "e", state, None
    )
    assert cached.mode == "cached" and encoded.mode == "encoded"
    assert "a table" in line_c and "encoded in each step" in line_e
    assert not (tmp_path / "e").exists()  # nothing written for the encoded path
    idx = torch.tensor([3, 0, 2, 2, 1])
    a, b = cached(idx), encoded(idx)
    assert a.shape == b.shape == (5, *a.shape[1:])
    assert (a - b).abs().max() <= 1e-6
    assert (cached.uncond - encoded.uncond).abs().max() <= 1e-6
    # and both are what the teacher's own encoder gives for those prompts
    direct = teacher.text_encoder()([SD_PROMPTS[i] for i in idx.tolist()])
    assert (b - direct).abs().max() <= 1e-6


def test_the_table_is_made_once_and_auto_picks_by_size(
    sd_pipe, prompts_file, tmp_path, hf_offline, monkeypatch
):
    from dmdctl.teachers import resolve_teacher

    teacher = resolve_teacher(None, sd_pipe)
    source = PromptFile(prompts_file)
    first, _, _ = setup_prompt_conditions(teacher, source, None, "auto", tmp_path, _state(), None)
    assert first.mode == "cached" and (tmp_path / dp.EMBEDDINGS_FILE).is_file()

    def no_encoder():
        raise AssertionError("the text encoder was loaded again")

    monkeypatch.setattr(teacher, "text_encoder", no_encoder)
    again, _, _ = setup_prompt_conditions(teacher, source, None, "auto", tmp_path, _state(), None)
    assert torch.equal(again.table.embeddings, first.table.embeddings)
    monkeypatch.undo()
    # a set larger than the auto limit is encoded in the step
    monkeypatch.setattr(dp, "AUTO_CACHE_BYTES", dp.embedding_bytes(teacher) * (len(source) - 1))
    big, _, _ = setup_prompt_conditions(
        teacher, source, None, "auto", tmp_path / "big", _state(), None
    )
    assert big.mode == "encoded" and not (tmp_path / "big").exists()


def test_a_run_says_which_path_it_took_and_trains_the_same(
    sd_pipe, prompts_file, tmp_path, hf_offline
):
    from safetensors.torch import load_file

    args = [
        "distill", "--teacher-path", sd_pipe, "--prompts", prompts_file, "--reg-weight", 0,
        "--batch-size", 2, "--steps", 2, "--fake-updates", 1, "--plot-samples", 0, "--cpu",
        "--mixed-precision", "no", "--real-guidance", 1.75,
    ]  # fmt: skip
    runs = {}
    for mode in ("on", "off"):
        r = ok(run(*args, "--prompt-cache", mode, "--out", tmp_path / mode))
        assert (
            "a table of their embeddings" if mode == "on" else "encoded in each step"
        ) in r.output
        runs[mode] = load_file(str(tmp_path / mode / "generator.safetensors"))
    assert (tmp_path / "on" / dp.EMBEDDINGS_FILE).is_file()
    assert not (tmp_path / "off" / dp.EMBEDDINGS_FILE).exists()
    diff = max((runs["on"][k] - runs["off"][k]).abs().max().item() for k in runs["on"])
    assert 0 < max(v.abs().max().item() for v in runs["on"].values())
    assert diff <= 1e-5, diff
