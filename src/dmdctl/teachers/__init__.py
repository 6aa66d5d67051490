"""Teacher registry: named presets, and loading/saving teachers as safetensors.

A teacher file is a safetensors state dict of an :class:`~dmdctl.core.denoiser.EDMPrecond` whose
metadata holds ``format = dmdctl.teacher``, the teacher ``kind`` and its ``config`` (JSON), so a
file alone is enough to rebuild the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import nn

from dmdctl.errors import UserError
from dmdctl.files import atomic_save_safetensors, sha256_file
from dmdctl.teachers.base import Teacher, TeacherKind
from dmdctl.teachers.digits import Digits
from dmdctl.teachers.edm.kind import EDM
from dmdctl.teachers.edm2.kind import EDM2
from dmdctl.teachers.sd.kind import StableDiffusion
from dmdctl.teachers.source import SourceCheckpoint
from dmdctl.teachers.toy2d import Toy2D
from dmdctl.teachers.wan.kind import Wan

KINDS: dict[str, TeacherKind] = {
    k.name: k for k in (Toy2D(), Digits(), StableDiffusion(), EDM(), EDM2(), Wan())
}
# the kinds whose teachers are diffusers pipeline folders (or hub ids)
PIPELINE_KINDS = (StableDiffusion.name, Wan.name)

TEACHER_FORMAT = "dmdctl.teacher"
GENERATOR_FORMAT = "dmdctl.generator"


def presets() -> dict[str, tuple[str, dict]]:
    """Every named preset: name -> (kind, config)."""
    out = {}
    for kind in KINDS.values():
        for name, cfg in kind.presets().items():
            out[name] = (kind.name, cfg)
    return out


def get_kind(name: str) -> TeacherKind:
    if name in KINDS:
        return KINDS[name]
    table = presets()
    if name in table:
        return KINDS[table[name][0]]
    raise UserError(
        f"unknown teacher '{name}' (known: {', '.join(sorted(set(KINDS) | set(table)))})"
    )


def preset_of(teacher: str | None, teacher_path=None) -> tuple[TeacherKind, str] | None:
    """The preset whose recipes (distill, pairs) apply to ``--teacher`` / ``--teacher-path``.

    A named preset applies as named; a kind's name, or a pipeline folder given without
    ``--teacher``, brings the kind's default preset when ``default_recipe_applies``. None when
    no recipe applies, including for an unknown name (reported when the teacher is loaded).
    """
    from dmdctl.teachers.sd.pipeline import is_pipeline_folder

    name = teacher
    if name is None and teacher_path is not None and is_pipeline_folder(Path(teacher_path)):
        name = folder_kind(Path(teacher_path))  # a diffusers pipeline folder: SD or Wan
    if name is None:
        return None
    try:
        kind = get_kind(str(name))
    except UserError:
        return None
    if name == kind.name:
        if not kind.default_recipe_applies:
            return None
        name = kind.default_preset
        if kind.name == StableDiffusion.name and teacher_path is not None:
            arch = _local_pipeline_arch(str(teacher_path))
            name = kind.default_preset_for({"arch": arch}) if arch else name
    return kind, str(name)


def _local_pipeline_arch(source: str) -> str | None:
    """The architecture of a pipeline folder, or of a hub id already in the local cache."""
    from dmdctl.teachers.sd.pipeline import pipeline_arch, resolve_pipeline_folder

    try:
        return pipeline_arch(resolve_pipeline_folder(source, offline=True))
    except UserError:
        return None


def is_sd_name(name: str | None) -> bool:
    """Whether ``--teacher`` names the Stable Diffusion kind or one of its presets."""
    return name is not None and get_kind(name).name == StableDiffusion.name


def is_pipeline_name(name: str | None) -> bool:
    """Whether ``--teacher`` names a kind (or preset) whose teachers are diffusers pipelines."""
    return name is not None and get_kind(name).name in PIPELINE_KINDS


def folder_kind(folder: Path) -> str:
    """The kind of a diffusers pipeline folder: Wan's text-to-video pipelines, else SD."""
    from dmdctl.teachers.wan.pipeline import is_wan_folder

    return Wan.name if is_wan_folder(folder) else StableDiffusion.name


def preset_config(name: str) -> tuple[TeacherKind, dict]:
    kind = get_kind(name)
    table = presets()
    cfg = table[name][1] if name in table else kind.presets()[kind.default_preset]
    return kind, dict(cfg)


def preset_source(name: str) -> SourceCheckpoint | None:
    """The published checkpoint a preset's length (`steps`) comes from; None where its source
    gives no length or it has none (the value is then ours)."""
    _, cfg = preset_config(name)
    return cfg.get("source") or cfg.get("recipe", {}).get("source")


def read_metadata(path: Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None


def load_state(path: Path, expected_format: str) -> tuple[dict, dict[str, torch.Tensor]]:
    meta = read_metadata(path)
    fmt = meta.get("format")
    if fmt != expected_format:
        what = {TEACHER_FORMAT: "a dmdctl teacher", GENERATOR_FORMAT: "a dmdctl generator"}
        raise UserError(
            f"{path} is not {what.get(expected_format, expected_format)} file "
            f"(its metadata says format={fmt!r})"
        )
    return meta, load_file(str(path))


def save_network(
    denoiser: nn.Module, fmt: str, kind: str, config: dict, path: Path, meta: dict[str, str]
) -> Path:
    """A teacher or generator file: the denoiser's weights as safetensors, with the file's
    ``format``, the teacher ``kind`` and the network ``config`` (JSON) in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": fmt, "kind": kind, "config": json.dumps(config), **meta}
    state = {k: v.detach().cpu().contiguous() for k, v in denoiser.state_dict().items()}
    try:
        return atomic_save_safetensors(state, path, meta)
    except (OSError, SafetensorError) as e:
        raise UserError(f"could not write {path}: {getattr(e, 'strerror', None) or e}") from None


def load_network(path: Path, fmt: str) -> tuple[dict, TeacherKind, dict, nn.Module]:
    """(metadata, kind, config, denoiser with the file's weights) of a file from :func:`save_network`."""
    return build_network(path, *load_state(path, fmt))


def build_network(
    path: Path, meta: dict, state: dict[str, torch.Tensor]
) -> tuple[dict, TeacherKind, dict, nn.Module]:
    """(metadata, kind, config, denoiser with ``state``) of a file's metadata and weights."""
    kind = get_kind(meta["kind"])
    config = json.loads(meta["config"])
    denoiser = kind.build(config)
    try:
        denoiser.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(
            f"{path}: weights do not match its config ({str(e).splitlines()[0]})"
        ) from None
    return meta, kind, config, denoiser


def save_teacher(
    denoiser: nn.Module, kind: TeacherKind, config: dict, path: Path, extra: dict | None = None
) -> Path:
    extra = {k: str(v) for k, v in (extra or {}).items()}
    return save_network(denoiser, TEACHER_FORMAT, kind.name, config, path, extra)


def load_teacher(path: Path, expected: str | None = None) -> Teacher:
    """Load a teacher file; ``expected`` (a kind or preset name) guards against mix-ups."""
    path = Path(path)
    if path.suffix.lower() == ".pkl":
        raise UserError(
            f"{path} is a pickle, which dmdctl does not load as a teacher (pickles can run code); "
            f"convert an NVlabs EDM checkpoint with `dmdctl convert-edm {path} -o teacher.safetensors`"
        )
    meta, kind, config, denoiser = load_network(path, TEACHER_FORMAT)
    if expected is not None and get_kind(expected).name != kind.name:
        raise UserError(f"{path} holds a '{kind.name}' teacher, but --teacher says '{expected}'")
    denoiser.eval().requires_grad_(False)
    return Teacher(kind, config, denoiser, path, sha256_file(path))


def resolve_teacher(
    teacher: str | None,
    teacher_path: Path | str | None,
    offline: bool = False,
    no_t5: bool = False,
    video_size: str | None = None,
) -> Teacher:
    """The teacher named by ``--teacher`` / ``--teacher-path`` on any command (``no_t5``: an SD3
    teacher without its T5 text encoder; ``video_size``: a video teacher's FRAMESxHEIGHTxWIDTH)."""
    from dmdctl.teachers.sd.pipeline import is_pipeline_folder

    named = get_kind(teacher).name if teacher is not None else None
    folder = teacher_path is not None and is_pipeline_folder(Path(teacher_path))
    if named in PIPELINE_KINDS or folder:
        found = folder_kind(Path(teacher_path)) if folder else named
        if teacher is not None and named != found:
            if named not in PIPELINE_KINDS:
                raise UserError(
                    f"{teacher_path} is a diffusers pipeline, but --teacher says '{teacher}'"
                )
            fits = " / ".join([n for n, (k, _) in presets().items() if k == found] + [found])
            what = {Wan.name: "Wan text-to-video", StableDiffusion.name: "Stable Diffusion"}
            raise UserError(
                f"{teacher_path} is a {what[found]} pipeline, but --teacher {teacher} is a "
                f"{what[named]} teacher; use --teacher {fits} with this pipeline"
            )
        if teacher_path is None:
            _, cfg = preset_config(teacher)
            teacher_path = cfg["pipeline"]
        if found == Wan.name:
            if no_t5:
                raise UserError("--no-t5 is for SD3 teachers (their third text encoder is T5)")
            from dmdctl.teachers.wan.kind import load_wan_teacher

            return load_wan_teacher(str(teacher_path), KINDS[Wan.name], offline, video_size)
        if video_size is not None:
            raise UserError("--video-size is for video teachers (Wan); this teacher makes images")
        from dmdctl.teachers.sd.teacher import load_sd_teacher

        preset = teacher if teacher is not None and teacher != StableDiffusion.name else None
        kind = KINDS[StableDiffusion.name]
        return load_sd_teacher(str(teacher_path), kind, offline, preset, no_t5)
    if video_size is not None:
        raise UserError("--video-size is for video teachers (Wan); this teacher makes images")
    if teacher_path is None:
        if teacher is None:
            raise UserError(
                "no teacher given: pass --teacher-path FILE (and optionally --teacher NAME)"
            )
        kind = get_kind(teacher)
        default = kind.default_path()
        if default is None or not default.is_file():
            hint = kind.missing_path_hint
            raise UserError(
                f"teacher '{teacher}' needs --teacher-path FILE; "
                + (hint or f"train one with `dmdctl train-teacher {kind.name} --out DIR`")
            )
        teacher_path = default
    if no_t5:
        raise UserError("--no-t5 is for SD3 teachers (their third text encoder is T5)")
    return load_teacher(teacher_path, expected=teacher)
