"""Load original CompVis Stable Diffusion v1 checkpoints (.ckpt or .safetensors) into `sd`'s models."""

from weights_converter.checkpoint import StableDiffusionModels, load_checkpoint, read_state_dict

__all__ = ["StableDiffusionModels", "load_checkpoint", "read_state_dict"]
