"""sd: Stable Diffusion v1.x from scratch in plain PyTorch."""
