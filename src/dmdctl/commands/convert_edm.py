"""``dmdctl convert-edm``: an NVlabs EDM pickle -> a dmdctl teacher safetensors file.

The pickle is read as data (:mod:`.pickle_loader`: nothing in it runs); the network under its
``ema`` entry is rebuilt as dmdctl's own architecture from its init arguments, its weights are
loaded with ``strict=True``, and the teacher is saved with its config in the file's metadata.
Every other command then loads the safetensors file, never the pickle.
"""

from __future__ import annotations

from pathlib import Path

from dmdctl.commands import show
from dmdctl.files import sha256_file
from dmdctl.settings.convert_edm import ConvertEdmConfig


def convert_edm(cfg: ConvertEdmConfig) -> dict:
    from dmdctl.core.denoiser import EDMPrecond
    from dmdctl.teachers import KINDS, save_teacher
    from dmdctl.teachers.edm.pickle_loader import backbone_from_checkpoint, read_edm_checkpoint

    cfg.validate()
    source, out = Path(cfg.source), Path(cfg.out)
    ckpt = read_edm_checkpoint(source, cfg.entry)
    backbone = backbone_from_checkpoint(ckpt)
    c = ckpt.config
    denoiser = EDMPrecond(backbone, c["sigma_data"], c["sigma_min"], c["sigma_max"])
    digest = sha256_file(source)
    extra = {f"edm_{k}": v for k, v in ckpt.info.items()}
    extra["edm_source_sha256"] = digest
    extra["edm_entry"] = cfg.entry
    save_teacher(denoiser, KINDS["edm"], c, out, extra=extra)
    return {
        "out": str(out),
        "kind": "edm",
        "architecture": c["architecture"],
        "resolution": c["img_resolution"],
        "classes": c["label_dim"],
        "parameters": sum(p.numel() for p in backbone.parameters()),
        "source": str(source),
        "source_sha256": digest[:16] + "…",
        "next": f"dmdctl make-pairs --teacher-path {out} --steps N --out PAIRS",
    }


def run(cfg: ConvertEdmConfig) -> int | None:
    """Run the command on resolved settings (its help: :data:`dmdctl.settings.convert_edm.HELP`)."""

    show("convert-edm", convert_edm(cfg))
    return None
