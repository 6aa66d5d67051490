"""Stable Diffusion teachers: the kind, the UNet as a denoiser, the diffusers pipeline loading,
prompts and schedulers, one-step generation and tiny test pipelines."""
