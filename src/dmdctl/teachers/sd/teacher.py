"""A diffusers Stable Diffusion pipeline (folder or hub id) as a dmdctl teacher."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dmdctl.teachers.base import Teacher
from dmdctl.teachers.sd.kind import StableDiffusion


@dataclass
class PipelineTeacher(Teacher):
    """A diffusers pipeline (folder or hub id) as a teacher: its folder, the source it was named
    by (recorded in the identity), and its VAE's files; the kinds add the codec and encoder."""

    folder: Path | None = None
    source: str = ""
    _codec = None

    def vae_files(self) -> tuple[Path, Path]:
        """(config.json, weights) of the pipeline's VAE: what a real-data store's latents depend
        on (data/real_store.py reads them through this, without importing the teachers)."""
        from dmdctl.teachers.sd.pipeline import _weights_file

        return self.folder / "vae" / "config.json", _weights_file(Path(self.folder), "vae")

    def identity(self) -> dict:
        return dict(super().identity(), path=self.source)


@dataclass
class SDTeacher(PipelineTeacher):
    """A diffusers Stable Diffusion pipeline as a teacher (latent space, prompt embeddings)."""

    @property
    def codec(self):
        """The VAE, loaded on first use (training without LPIPS or plots never loads it)."""
        if self._codec is None:
            from dmdctl.teachers.sd.pipeline import VAECodec, load_vae

            self._codec = VAECodec(
                load_vae(self.folder), self.config["scaling_factor"], self.config
            )
        return self._codec

    def text_encoder(self):
        from dmdctl.teachers.sd.pipeline import load_text_encoder

        return load_text_encoder(self.folder, self.config)


def load_sd_teacher(
    source: str,
    kind: StableDiffusion,
    offline: bool = False,
    preset: str | None = None,
    no_t5: bool = False,
) -> SDTeacher:
    """A pipeline folder or hub id as a teacher (frozen UNet wrapped as a denoiser) of ``kind``
    (the registry's Stable Diffusion kind); a ``preset`` (sd15, sdxl, ...) must be written for
    the pipeline's architecture."""
    from dmdctl.errors import UserError
    from dmdctl.teachers.sd import pipeline as sdp

    folder = sdp.resolve_pipeline_folder(str(source), offline)
    arch = sdp.pipeline_arch(folder)
    if preset is not None and kind.preset_arch(preset) != arch:
        fits = [n for n in kind.presets() if kind.preset_arch(n) == arch]
        raise UserError(
            f"{source} is {sdp.a_pipeline(arch)}, but --teacher {preset} is a "
            f"recipe for {sdp.ARCH_NAMES[kind.preset_arch(preset)]}; use --teacher "
            f"{' / '.join(fits)} (or --teacher sd) with this pipeline"
        )
    if Path(source).expanduser().exists():  # a local folder is recorded resolved: sample and
        source = str(Path(source).expanduser().resolve())  # export work from any folder
    config = sdp.sd_config(folder, str(source), no_t5)
    sha = sdp.pipeline_identity(folder)
    denoiser = sdp.build_denoiser(config, sdp.load_unet(folder))
    denoiser.eval().requires_grad_(False)
    return SDTeacher(kind, config, denoiser, None, sha, folder=folder, source=str(source))
