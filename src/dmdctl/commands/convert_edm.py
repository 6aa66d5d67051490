"""``dmdctl convert-edm``: an NVlabs EDM or EDM2 pickle -> a dmdctl teacher safetensors file.

The pickle is read as data (:mod:`dmdctl.teachers.edm.pickle_loader`: nothing in it runs); the
network under its ``ema`` entry is rebuilt as dmdctl's own architecture from its init arguments
(EDM's ADM / DDPM++ / NCSN++ as an ``edm`` teacher; EDM2's ``Precond`` as an ``edm2`` teacher,
with the file's encoder), its weights are loaded with ``strict=True``, and the teacher is saved
with its config in the file's metadata. Every other command then loads the safetensors file,
never the pickle.
"""

from __future__ import annotations

from pathlib import Path

from dmdctl.commands import show
from dmdctl.errors import UserError
from dmdctl.files import sha256_file
from dmdctl.settings.convert_edm import ConvertEdmConfig


def convert_edm(cfg: ConvertEdmConfig) -> dict:
    from dmdctl.core.denoiser import EDMPrecond
    from dmdctl.teachers import KINDS, save_teacher
    from dmdctl.teachers.edm.pickle_loader import (
        backbone_from_checkpoint,
        edm_checkpoint_of,
        read_checkpoint_pickle,
    )

    cfg.validate()
    source, out = Path(cfg.source), Path(cfg.out)
    # read once; every record must be a class of one format (EDM's or EDM2's)
    data, family = read_checkpoint_pickle(source)
    if family == "EDM2":
        return _convert_edm2(cfg, data, source, out)
    if cfg.vae is not None:
        raise UserError("--vae is for EDM2 ImageNet-512 checkpoints (latent networks)")
    ckpt = edm_checkpoint_of(data, source, cfg.entry)
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


def _convert_edm2(cfg: ConvertEdmConfig, data, source: Path, out: Path) -> dict:
    from dmdctl.teachers import KINDS, save_teacher
    from dmdctl.teachers.edm2.checkpoint import edm2_checkpoint_of

    ckpt = edm2_checkpoint_of(data, source, cfg.entry)
    c = ckpt.config
    enc = c["encoder"]
    if cfg.vae is not None:
        if enc["class"] != "StabilityVAEEncoder":
            raise UserError(f"--vae: {source} is a pixel-space EDM2 network (no VAE)")
        from dmdctl.teachers.edm2.encoders import vae_folder

        vae_folder(cfg.vae)  # a folder that holds a VAE, or a hub id
        p = Path(cfg.vae).expanduser()
        enc["vae"] = str(p.resolve()) if p.exists() else cfg.vae
    kind = KINDS["edm2"]
    denoiser = kind.build(c)
    try:
        denoiser.backbone.load_state_dict(ckpt.state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise UserError(
            f"{source}: the weights do not match the EDM2 network of its init_kwargs "
            f"({' '.join(lines[:2])[:400]})"
        ) from None
    digest = sha256_file(source)
    extra = {f"edm2_{k}": v for k, v in ckpt.info.items()}
    extra["edm2_source_sha256"] = digest
    extra["edm2_entry"] = cfg.entry
    save_teacher(denoiser, kind, c, out, extra=extra)
    space = (
        f"latents {c['img_channels']}x{c['img_resolution']}x{c['img_resolution']}, VAE {enc['vae']}"
        if enc["class"] == "StabilityVAEEncoder"
        else f"pixels {c['img_resolution']}x{c['img_resolution']}"
    )
    return {
        "out": str(out),
        "kind": "edm2",
        "network": f"EDM2 UNet, {c['model_kwargs'].get('model_channels')} channels",
        "space": space,
        "classes": c["label_dim"],
        "parameters": sum(p.numel() for p in denoiser.backbone.parameters()),
        "source": str(source),
        "source_sha256": digest[:16] + "…",
        "next": f"dmdctl distill --teacher edm2 --teacher-path {out} --out RUN",
    }


def run(cfg: ConvertEdmConfig) -> int | None:
    """Run the command on resolved settings (its help: :data:`dmdctl.settings.convert_edm.HELP`)."""

    show("convert-edm", convert_edm(cfg))
    return None
