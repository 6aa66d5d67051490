"""``dmdctl env``: the block a user pastes into a bug report (as ``accelerate env`` and
``diffusers-cli env``). It reads versions from the installed packages' metadata, asks torch
about its devices, and looks at environment variables and files: no network, no GPU needed, and
a library that fails to import is reported rather than stopping the report."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from dmdctl import __version__
from dmdctl.settings.env import EnvConfig

PACKAGES = (
    "torch", "torchvision", "diffusers", "accelerate", "transformers", "peft", "huggingface_hub",
    "safetensors", "numpy", "pyarrow", "lpips", "bitsandbytes", "torch-fidelity", "clean-fid",
    "typer", "rich",
)  # fmt: skip
# environment variables that change what a run does or where it reads and writes
VARIABLES = (
    "CUDA_VISIBLE_DEVICES", "DMDCTL_THREADS", "DMDCTL_QUIET", "OMP_NUM_THREADS", "HF_HOME",
    "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "TORCH_HOME", "XDG_CACHE_HOME",
)  # fmt: skip
ON = ("1", "true", "yes", "on")  # the values huggingface_hub reads as true


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    """Installed versions from the packages' metadata (nothing is imported); None: not installed."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def hf_home() -> Path:
    """Hugging Face's cache root, by huggingface_hub's rule (read now, not at its import)."""
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.environ.get("HF_HOME", os.path.join(xdg, "huggingface"))).expanduser()


def torch_report() -> dict:
    """What torch sees: its build, CUDA (and MPS) and every GPU with its memory."""
    try:
        import torch
    except Exception as e:  # a broken install is what a bug report is for
        return {"error": f"cannot import torch: {e}"}
    cuda = torch.cuda.is_available()
    devices = []
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(
                {
                    "index": i,
                    "name": p.name,
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "capability": f"{p.major}.{p.minor}",
                }
            )
    mps = getattr(torch.backends, "mps", None)
    return {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cuda_available": cuda,
        "mps_available": bool(mps and mps.is_available()),
        "threads": torch.get_num_threads(),
        "devices": devices,
        "hub_dir": torch.hub.get_dir(),
    }


def memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return None


def report() -> dict:
    home = hf_home()
    accelerate_config = home / "accelerate" / "default_config.yaml"  # accelerate config's file
    return {
        "dmdctl": __version__,
        "python": f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": memory_gib(),
        "packages": package_versions(),
        "torch": torch_report(),
        "accelerate_config": {"path": str(accelerate_config), "found": accelerate_config.is_file()},
        "hf_home": str(home),
        "hf_hub_cache": os.environ.get("HF_HUB_CACHE", str(home / "hub")),
        "offline": os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ON,
        "environment": {k: os.environ[k] for k in VARIABLES if k in os.environ},
    }


def text(r: dict) -> str:
    """The report as ``key: value`` lines, for pasting into an issue."""
    t = r["torch"]
    lines = [
        f"dmdctl: {r['dmdctl']}",
        f"Python: {r['python']}",
        f"Platform: {r['platform']}",
        f"CPUs: {r['cpus']}, memory: {r['memory_gib']} GiB",
    ]
    lines += [f"{k}: {v or 'not installed'}" for k, v in r["packages"].items()]
    if "error" in t:
        lines.append(f"torch: {t['error']}")
    else:
        lines += [
            f"torch build: CUDA {t['cuda_build'] or 'none'}, cuDNN {t['cudnn'] or 'none'}, "
            f"{t['threads']} threads",
            f"CUDA available: {t['cuda_available']}",
            f"MPS available: {t['mps_available']}",
        ]
        lines += [
            f"GPU {d['index']}: {d['name']}, {d['memory_gib']} GiB, compute capability "
            f"{d['capability']}"
            for d in t["devices"]
        ]
        lines.append(f"torch hub folder (TORCH_HOME): {t['hub_dir']}")
    found = "found" if r["accelerate_config"]["found"] else "not found"
    lines += [
        f"Accelerate default config: {r['accelerate_config']['path']} ({found})",
        f"Hugging Face home (HF_HOME): {r['hf_home']}",
        f"Hugging Face hub cache: {r['hf_hub_cache']}",
        f"Offline mode (HF_HUB_OFFLINE): {'on' if r['offline'] else 'off'}",
    ]
    lines += [f"${k}={v}" for k, v in r["environment"].items()]
    return "\n".join(lines)


def run(cfg: EnvConfig) -> int | None:
    """Run the command on resolved settings (its help: :data:`dmdctl.settings.env.HELP`)."""
    r = report()
    print(json.dumps(r, indent=2) if cfg.json else text(r))
    return None
