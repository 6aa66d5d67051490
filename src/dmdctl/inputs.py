"""Checks of the paths a user gives, made before anything is loaded, computed or written."""

from __future__ import annotations

import os
from pathlib import Path

from dmdctl.errors import UserError, require


def check_out_folder(out: Path, flag: str = "--out") -> None:
    """Refuse an output path that cannot become a folder, before anything is computed or written."""
    out = Path(out)
    if out.exists():
        require(out.is_dir(), f"{flag} {out} is a file, not a folder; choose another {flag}")
        require(os.access(out, os.W_OK), f"{flag} {out} is not writable; choose another {flag}")
        return
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    require(
        parent.is_dir(),
        f"{flag} {out} cannot be created: {parent} is a file; choose another {flag}",
    )
    require(
        os.access(parent, os.W_OK),
        f"{flag} {out} cannot be created: {parent} is not writable; choose another {flag}",
    )


def check_teacher_path(path: str | None, teacher: str | None = None) -> None:
    """--teacher-path must name a readable file (checked before anything is loaded).

    Stable Diffusion and Wan teachers are a diffusers pipeline folder or a hub id instead.
    """
    if path is None:
        return
    from dmdctl.teachers import is_pipeline_name
    from dmdctl.teachers.sd.pipeline import is_pipeline_folder, looks_like_hub_id

    p = Path(path)
    if is_pipeline_folder(p) or (is_pipeline_name(teacher) and looks_like_hub_id(str(path))):
        return
    if is_pipeline_name(teacher):
        raise UserError(
            f"--teacher-path {p} is neither a diffusers pipeline folder (with model_index.json) "
            "nor a hub id like stable-diffusion-v1-5/stable-diffusion-v1-5"
        )
    require(
        p.exists(),
        f"teacher file not found: {p} (check the path, or train one with "
        "`dmdctl train-teacher toy2d --out DIR`)",
    )
    require(
        not p.is_dir(),
        f"--teacher-path {p} is a folder; pass the teacher file in it (e.g. {p / 'teacher.safetensors'})",
    )
    require(
        p.suffix.lower() != ".pkl",
        f"--teacher-path {p} is a pickle, which dmdctl does not load (pickles can run code); "
        f"convert an NVlabs EDM checkpoint with `dmdctl convert-edm {p} -o teacher.safetensors`",
    )
    require(
        not p.is_file() or os.access(p, os.R_OK),
        f"--teacher-path {p} is not readable (permission denied)",
    )


def resolve_input_paths(cfg, names: tuple[str, ...]) -> None:
    """Record the inputs a run reads as absolute paths (in its config.toml and the files it
    writes), so its outputs work from any folder. A value that is not a local path (a hub id,
    a name) is kept as given."""
    for name in names:
        value = getattr(cfg, name, None)
        if value and Path(value).expanduser().exists():
            setattr(cfg, name, str(Path(value).expanduser().resolve()))
