"""The diffusion task, plain PyTorch and diffusers: U-Net presets, the training loop,
sampling, and the frozen autoencoder of latent diffusion."""
