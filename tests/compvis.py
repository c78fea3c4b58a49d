"""Writing test checkpoints the way the official CompVis files are laid out."""

import json
import struct
from pathlib import Path

import torch

from sd.checkpoint import PREFIXES, ema_key
from sd.files import write_safetensors

UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX = PREFIXES["unet"][0], PREFIXES["vae"][0], PREFIXES["clip"][0]


def training_buffers() -> dict[str, torch.Tensor]:
    """Non-weight entries that real CompVis files carry beside the weights; loaders must ignore them."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return {"betas": betas.float(), "alphas_cumprod": alphas_cumprod.float(),
            "alphas_cumprod_prev": torch.cat([torch.ones(1), alphas_cumprod[:-1]]).float(),
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt().float(), "logvar": torch.zeros(1000),
            CLIP_PREFIX + "embeddings.position_ids": torch.arange(77)[None]}


def with_ema_decoys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full (non "emaonly") checkpoint: the UNet weights move to their `model_ema.*` copies and the
    `model.diffusion_model.*` keys hold decoys (the weights halved), so only EMA loading gives the model."""
    unet_keys = [k for k in state if k.startswith(UNET_PREFIX)]
    return {**state, **{ema_key(k): state[k] for k in unet_keys}, **{k: state[k] * 0.5 for k in unet_keys},
            "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000)}


def save_checkpoint(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """.safetensors, or .ckpt / .pt nested under "state_dict" as torch.save wrote the official files."""
    path = Path(path)
    if path.suffix == ".safetensors":
        write_safetensors(path, state)
    elif path.suffix in (".ckpt", ".pt"):
        torch.save({"state_dict": state, "global_step": 470000}, path)
    else:
        raise ValueError(f"save_checkpoint: {path} must end in .safetensors, .ckpt or .pt")
    return path
