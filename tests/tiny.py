"""Tiny Stable Diffusion v1 checkpoints for fast tests: the real architecture at toy widths.

`tiny_compvis_state()` gives the weights of our own UNet, VAE and CLIP text model, built at the
tiny configurations below with seeded random weights, under their CompVis keys (the `PREFIXES` of
`weights_converter.checkpoint`) together with the extra entries real files carry (training
buffers, `position_ids`; with `ema=True` also `model_ema.*`). `load_checkpoint` infers the same
configurations back from the tensor shapes. `write_tiny_checkpoint()` writes it as .safetensors or
as .ckpt (nested under "state_dict", as the official files are).

What the loader's config inference fixes, and so the tiny models keep: 2 res blocks per level and
8 heads in the UNet, CLIP heads = width // 64, channel counts multiples of 32 (GroupNorm(32)).
The VAE keeps 4 levels, so images are still 8x the latent size; CLIP keeps the real vocabulary
(49408) and 77 positions, so real tokenizer ids work. About 7.2M parameters, 29 MB in fp32.
"""

import math
from pathlib import Path

import torch
from torch import nn

from sd.clip import CLIPConfig, CLIPTextModel
from sd.unet import UNet, UNetConfig
from sd.vae import AutoencoderKL, VAEConfig
from weights_converter.checkpoint import PREFIXES, ema_key

TINY_CLIP = CLIPConfig(width=64, layers=2, heads=1)
# Like SD: cross-attention on every level but the last, channels growing with depth.
TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_levels=(0, 1),
                       context_dim=TINY_CLIP.width)
TINY_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 2))

UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX = PREFIXES["unet"][0], PREFIXES["vae"][0], PREFIXES["clip"][0]


def random_weights(model: nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded random values for every parameter of `model` (which may live on the meta device).

    Weights ~ N(0, 1/fan_in) keep activations of order 1 through the network; norm scales are
    1 + N(0, 0.1) and biases N(0, 0.02), so none is a trivial 0 or 1 that would hide a wrong
    wiring. Values are rounded to fp16-representable ones, so an fp16 copy holds the same weights.
    """
    state = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=gen)
            if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                value = 1 + 0.1 * noise if name == "weight" else 0.1 * noise
            elif p.dim() == 1:  # biases
                value = 0.02 * noise
            else:
                value = noise / math.sqrt(p[0].numel())
            state[f"{module_name}.{name}" if module_name else name] = value.half().float()
    return state


def training_buffers() -> dict[str, torch.Tensor]:
    """Non-weight entries of real CompVis files, which the loader must ignore."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return {"betas": betas.float(), "alphas_cumprod": alphas_cumprod.float(),
            "alphas_cumprod_prev": torch.cat([torch.ones(1), alphas_cumprod[:-1]]).float(),
            "logvar": torch.zeros(1000)}


def tiny_compvis_state(in_channels: int = 4, seed: int = 0, ema: bool = False,
                       buffers: bool = True) -> dict[str, torch.Tensor]:
    """A tiny SD v1 checkpoint's state dict in the CompVis layout; the same for the same arguments.

    in_channels: 4 for a text-to-image UNet, 9 for an inpainting one.
    ema: make it a full (non "emaonly") checkpoint: the model's UNet weights are stored as the
         `model_ema.*` copies and the `model.diffusion_model.*` keys hold decoys (the weights
         halved), so loading with EMA (the default) gives the same models as `ema=False`.
    buffers: add the training buffers (betas, alphas_cumprod, ...) that real files carry.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        models = {UNET_PREFIX: UNet(TINY_UNET if in_channels == 4 else
                                    UNetConfig(**{**TINY_UNET.__dict__, "in_channels": in_channels})),
                  VAE_PREFIX: AutoencoderKL(TINY_VAE), CLIP_PREFIX: CLIPTextModel(TINY_CLIP)}
    state = {prefix + k: v for prefix, model in models.items() for k, v in random_weights(model, gen).items()}
    state[CLIP_PREFIX + "embeddings.position_ids"] = torch.arange(TINY_CLIP.max_positions)[None]  # (1, 77)
    if buffers:
        state.update(training_buffers())
    if ema:
        unet_keys = [k for k in state if k.startswith(UNET_PREFIX)]
        state.update({ema_key(k): state[k] for k in unet_keys})
        state.update({k: state[k] * 0.5 for k in unet_keys})
        state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000)})
    return state


def write_tiny_checkpoint(path: str | Path, **kwargs) -> Path:
    """Write `tiny_compvis_state(**kwargs)` to `path`: .safetensors, or .ckpt / .pt as torch.save writes
    official files ({"state_dict": ..., "global_step": ...}). Returns the path."""
    path = Path(path)
    state = tiny_compvis_state(**kwargs)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, path)
    elif path.suffix in (".ckpt", ".pt"):
        torch.save({"state_dict": state, "global_step": 470000}, path)
    else:
        raise ValueError(f"write_tiny_checkpoint: {path} must end in .safetensors, .ckpt or .pt")
    return path
