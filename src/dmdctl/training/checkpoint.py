"""Training checkpoints as safetensors + JSON (no pickle), and what lets a run survive.

A checkpoint is a folder ``checkpoints/step-0000500/`` holding one safetensors file per model,
per optimiser and for the EMA, plus ``state.json`` (step, config, scalars). It is written under
a temporary name and renamed when complete, so a crash mid-write never leaves a folder that
looks complete. (Accelerate's ``save_state`` pickles optimiser and RNG states; this format
keeps every file loadable without unpickling.)

Also here: the resume checks (config differences, trimming a log to the checkpoint's step).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dmdctl.errors import UserError
from dmdctl.files import atomic_write_bytes, describe_os_error

STEP_DIR = re.compile(r"^step-(\d+)$")


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state dict into tensors and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, per in state["state"].items():
        for name, value in per.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, per in rest["scalars"].items():
        state.setdefault(int(pid), {}).update(per)
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(
    root: Path,
    step: int,
    models: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
    optimizers: dict[str, torch.optim.Optimizer | dict],
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict,
    keep: int = 0,
) -> Path:
    root = Path(root)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        meta = {"step": str(step)}
        for name, model in models.items():
            # a module, or its state dict already gathered (distill --fsdp)
            sd = model if isinstance(model, dict) else model.state_dict()
            sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
            save_file(sd, str(tmp / f"{name}.safetensors"), metadata=meta)
        opt_rest = {}
        for name, opt in optimizers.items():
            t, rest = flatten_optimizer(opt if isinstance(opt, dict) else opt.state_dict())
            save_file(t, str(tmp / f"optim_{name}.safetensors"), metadata=meta)
            opt_rest[name] = rest
        for name, group in tensors.items():
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in group.items()},
                str(tmp / f"{name}.safetensors"),
                metadata=meta,
            )
        body = dict(state, step=step, optimizers=opt_rest)
        with open(tmp / "state.json", "w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"could not write checkpoint {final}: {describe_os_error(e)}; the earlier checkpoints "
            "are intact, resume from them with --resume latest"
        ) from None
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := STEP_DIR.match(p.name)) and (p / "state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def find_checkpoint(out: Path, resume: str) -> Path:
    """``--resume latest`` (newest complete checkpoint of the run) or a checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(Path(out) / "checkpoints")
        if not found:
            raise UserError(
                f"--resume latest: no complete checkpoint under {Path(out) / 'checkpoints'}"
            )
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise UserError(
            f"--resume {resume}: not a checkpoint folder (no state.json); use 'latest' or a step-N folder"
        )
    return path


def load_checkpoint(path: Path) -> tuple[dict, callable]:
    """Return (state.json, loader) where ``loader(name)`` reads one safetensors file of it."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} is unreadable: {e}") from None

    def loader(name: str) -> dict[str, torch.Tensor]:
        f = path / f"{name}.safetensors"
        if not f.is_file():
            raise UserError(f"checkpoint {path} lacks {f.name}")
        return load_file(str(f))

    return state, loader


def read_checkpoint_state(path: Path) -> dict:
    state, _ = load_checkpoint(path)
    return state


def config_differences(saved: dict, current: dict, names) -> list[str]:
    """``"name A there, B now"`` for each of ``names`` whose value differs."""
    return [
        f"{n} {saved.get(n)!r} there, {current.get(n)!r} now"
        for n in names
        if saved.get(n) != current.get(n)
    ]


def trim_log(path: Path, last_step: int) -> int:
    """Keep the rows of a JSON-lines log up to ``last_step``; return how many were dropped.

    After a crash or SIGKILL the log can hold rows past the checkpoint a run resumes from;
    the resumed run writes those steps again, so each step appears once.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            dropped += 1  # a half-written last line
            continue
        if step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
    return dropped


def append_line(path: Path, line: str) -> None:
    """Append one line; on failure (disk full) cut the file back so no half line remains."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
    except OSError as e:
        try:
            os.truncate(path, size)
        except OSError:
            pass
        raise UserError(
            f"could not write {path}: {describe_os_error(e)}; resume with --resume latest"
        ) from None
