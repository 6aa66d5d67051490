"""Checkpoints (dmdctl.training.checkpoint): safetensors only, an optimiser's state back to the
bit, nothing that looks complete until it is, the newest N kept, a log trimmed to its step."""

import json

import pytest
import torch

from dmdctl.errors import UserError
from dmdctl.training.checkpoint import (
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    trim_log,
    unflatten_optimizer,
)


def trained(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 3)).square().mean().backward()
        opt.step()
    return net, opt


def test_round_trip_restores_weights_and_optimiser_state_exactly(tmp_path):
    net, opt = trained()
    path = save_checkpoint(
        tmp_path, 7, {"generator": net}, {"generator": opt}, {"ema": {"w": torch.ones(2)}},
        {"step": 7, "config": {"lr": 0.01}},
    )  # fmt: skip
    assert path.name == "step-0000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors", "generator.safetensors", "optim_generator.safetensors", "state.json",
    ]  # fmt: skip
    state, load = load_checkpoint(path)
    assert state["step"] == 7 and state["config"] == {"lr": 0.01}
    net2, opt2 = trained(seed=1)
    net2.load_state_dict(load("generator"))
    for a, b in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(a, b)
    opt2.load_state_dict(
        unflatten_optimizer(load("optim_generator"), state["optimizers"]["generator"])
    )
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][k][name]))
    # what a resumed run notices: the next update is the same as without the interruption
    x = torch.randn(5, 3)
    for n, o in ((net, opt), (net2, opt2)):
        o.zero_grad()
        n(x).square().mean().backward()
        o.step()
    for a, b in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(load("ema")["w"], torch.ones(2))
    with pytest.raises(UserError, match="lacks fake.safetensors"):
        load("fake")


def test_only_complete_checkpoints_count_and_keep_trims_the_oldest(tmp_path):
    net, opt = trained()
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {"g": net}, {"g": opt}, {}, {"step": step}, keep=2)
    (tmp_path / ".tmp-step-0000040").mkdir()  # a write that never finished
    (tmp_path / "step-0000050").mkdir()  # no state.json: not complete
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000020", "step-0000030"]
    with pytest.raises(UserError, match="not a checkpoint folder"):
        find_checkpoint(tmp_path.parent, str(tmp_path / "step-0000050"))


def test_resume_latest_finds_the_newest_or_says_there_is_none(tmp_path):
    net, opt = trained()
    with pytest.raises(UserError, match="no complete checkpoint"):
        find_checkpoint(tmp_path, "latest")
    for step in (5, 15):
        save_checkpoint(tmp_path / "checkpoints", step, {"g": net}, {"g": opt}, {}, {"step": step})
    assert find_checkpoint(tmp_path, "latest").name == "step-0000015"


def test_trim_log_drops_rows_past_the_step_and_a_half_written_line(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (10, 20, 30)]
    log.write_text("\n".join(rows) + '\n{"step": 4')
    assert trim_log(log, 20) == 2
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [10, 20]
