"""Tiny Stable Diffusion v1 checkpoints for fast tests: the real architecture at toy widths.

`tiny_compvis_state()` gives the weights of our own UNet, VAE and CLIP text model, built at the
tiny configurations below with seeded random weights, under their CompVis keys (the `PREFIXES` of
`sd.checkpoint`) together with the extra entries real files carry (training
buffers, `position_ids`; with `ema=True` also `model_ema.*`). `load_checkpoint` infers the same
configurations back from the tensor shapes. `write_tiny_checkpoint()` writes it as .safetensors or
as .ckpt (nested under "state_dict", as the official files are).

What the loader's config inference fixes, and so the tiny models keep: 2 res blocks per level and
8 heads in the UNet, CLIP heads = width // 64, channel counts multiples of 32 (GroupNorm(32)).
The VAE keeps 4 levels, so images are still 8x the latent size; CLIP keeps the real vocabulary
(49408) and 77 positions, so real tokenizer ids work. About 7.2M parameters, 29 MB in fp32.
`family="sd2"` gives an SD 2.x-shaped one: the UNet with heads of 64 channels and Linear projections, the
text tower with exact GELU and a projection, written in OpenCLIP's layout (`sd.layouts.OPEN_CLIP`);
`family="sdxl"` (and "sdxl-inpainting", "sdxl-refiner") an SDXL-shaped one: CLIP ViT-L and the bigG-like tower
(the refiner: bigG alone), the UNet with SDXL's block structure (no attention at the first level, depths
growing) and the vector of the pooled text and the micro-conditions.
"""

import math
from pathlib import Path

import torch
from torch import nn

from sd.clip import CLIPConfig, CLIPTextModel
from sd.families import FAMILIES, SDXL, SDXL_REFINER
from sd.micro_conditioning import vector_width
from sd.unet import UNet, UNetConfig
from sd.vae import AutoencoderKL, VAEConfig
from tests.compvis import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, save_checkpoint, training_buffers, with_ema_decoys

TINY_CLIP = CLIPConfig(width=64, layers=2, heads=1)
# Like SD: cross-attention on every level but the last, channels growing with depth.
TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_levels=(0, 1),
                       context_dim=TINY_CLIP.width)
TINY_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 2))
TINY_SD2_CLIP = CLIPConfig(width=64, layers=3, heads=1, activation="gelu", projection_dim=64)
TINY_SD2_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), attention_levels=(0, 1), context_dim=64,
                           head_channels=64, linear_proj=True)
TINY_BIG_G = CLIPConfig(width=64, layers=3, heads=1, activation="gelu", projection_dim=64)
TINY_SDXL_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), attention_levels=(1, 2), context_dim=128,
                            head_channels=64, linear_proj=True, transformer_depth=(0, 1, 2),
                            adm_in_channels=vector_width(64, SDXL.micro_conditions))
TINY_REFINER_UNET = UNetConfig(**{**TINY_SDXL_UNET.__dict__, "context_dim": 64, "transformer_depth": 1,
                                  "adm_in_channels": vector_width(64, SDXL_REFINER.micro_conditions)})
TINY = {  # family -> (UNet, {text tower: its configuration})
    "sd1": (TINY_UNET, {"clip": TINY_CLIP}), "sd2": (TINY_SD2_UNET, {"clip": TINY_SD2_CLIP}),
    "sdxl": (TINY_SDXL_UNET, {"clip": TINY_CLIP, "clip_g": TINY_BIG_G}),
    "sdxl-refiner": (TINY_REFINER_UNET, {"clip_g": TINY_BIG_G}),
}
TINY["sdxl-inpainting"] = TINY["sdxl"]


def random_weights(model: nn.Module, gen: torch.Generator, dtype: torch.dtype = torch.float32,
                   fp16_exact: bool = True) -> dict[str, torch.Tensor]:
    """Seeded random values for every parameter of `model` (which may live on the meta device).

    Weights ~ N(0, 1/fan_in) keep activations of order 1 through the network; norm scales are
    1 + N(0, 0.1) and biases N(0, 0.02), so none is a trivial 0 or 1 that would hide a wrong
    wiring. With `fp16_exact`, values are rounded to fp16-representable ones, so an fp16 copy holds the
    same weights (without: two passes fewer over each tensor, for full-size float32 references); `dtype`: the
    type they are kept in (float16 halves the memory of a full-size model's).
    """
    state = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=gen)  # made the value in place: no second full-size tensor
            if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                value = noise.mul_(0.1).add_(1) if name == "weight" else noise.mul_(0.1)
            elif p.dim() == 1:  # biases
                value = noise.mul_(0.02)
            else:
                value = noise.div_(math.sqrt(p[0].numel()))
            state[f"{module_name}.{name}" if module_name else name] = (value.half() if fp16_exact else value).to(dtype)
    return state


def tiny_compvis_state(in_channels: int = 4, seed: int = 0, ema: bool = False, buffers: bool = True,
                       unet: UNetConfig | None = None, vae: VAEConfig = TINY_VAE,
                       family: str = "sd1") -> dict[str, torch.Tensor]:
    """A tiny SD v1 checkpoint's state dict in the CompVis layout; the same for the same arguments.

    in_channels: 4 for a text-to-image UNet, 9 for an inpainting one.
    ema: make it a full (non "emaonly") checkpoint: the model's UNet weights are stored as the
         `model_ema.*` copies and the `model.diffusion_model.*` keys hold decoys (the weights
         halved), so loading with EMA (the default) gives the same models as `ema=False`.
    buffers: add the training buffers (betas, alphas_cumprod, ...) that real files carry.
    unet, vae: the networks' shapes (the loader reads them back from the weights); unet default: the family's.
    family: a key of `TINY`, whose text towers' prefixes and layouts the file takes.
    """
    gen = torch.Generator().manual_seed(seed)
    unet = unet or TINY[family][0]
    record = FAMILIES[family]
    with torch.device("meta"):
        models = {"unet": UNet(UNetConfig(**{**unet.__dict__, "in_channels": in_channels})),
                  "vae": AutoencoderKL(vae), **{net: CLIPTextModel(cfg) for net, cfg in TINY[family][1].items()}}
    state = {}
    for net, model in models.items():
        weights = random_weights(model, gen)
        if net in record.renames:
            weights = record.renames[net].write(weights)
        state.update({record.prefixes[net][0] + k: v for k, v in weights.items()})
    if buffers:
        state.update(training_buffers())
    return with_ema_decoys(state) if ema else state


def write_tiny_checkpoint(path: str | Path, **kwargs) -> Path:
    """Write `tiny_compvis_state(**kwargs)` to `path` (.safetensors, .ckpt or .pt). Returns the path."""
    return save_checkpoint(tiny_compvis_state(**kwargs), path)
