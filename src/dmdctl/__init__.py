"""dmdctl: distil a diffusion model into a one-step generator with Distribution Matching Distillation."""

__version__ = "0.1.0"
