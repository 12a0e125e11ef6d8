"""What a 3D generator is made of: cameras, the hash-grid field, the marcher and volume rendering, the NeRF
generator, and its exports (turntable, views, mesh). Knows nothing of diffusion priors."""
