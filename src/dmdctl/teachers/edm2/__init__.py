"""NVlabs EDM2 teachers (magnitude-preserving UNets, ImageNet-512 latents / ImageNet-64 pixels)."""
