"""The method's building blocks: the denoiser interface and the one-step generator, noise
schedules and samplers, losses, learning-rate schedules, EMA, the pixel/latent codec and the
generator files."""
