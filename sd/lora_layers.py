"""Trainable LoRA layers (Hu et al., 2021): a frozen layer W and a low-rank branch beside it, unmerged.

    y = W x + (alpha / r) up(down(x))

For a Linear layer down is Linear(in, r) and up Linear(r, out); for a convolution (LoCon) down is an
r-channel convolution with W's kernel, stride, padding and dilation and up a 1x1 one, so the branch is
the convolution whose kernel is `LoRAPatch.delta`. As in the paper and peft, down starts kaiming-uniform
(a = sqrt 5, nn.Linear's default) and up at zero, so a fresh layer computes W x; only down and up train.

A rank is at most the layer's width: the smaller side of W as a matrix, min(in, out), with in * k * k for a
convolution's kernel (`rank_limit`); a higher one adds no expressive power, only parameters, and is refused.

`wrap_lora` puts such layers in place of a network's Linear and Conv2d layers by name pattern;
`unwrap_lora` takes them out again, merging their change into W (`sd.lora.add_patch`, the merger's own
sum) or not; `lora_state_dict` writes those of a model in kohya's layout or diffusers/PEFT's (the names of
`sd.lora.written_name`), files `read_lora` reads back (into the unwrapped model).
"""

import math
import re

import torch
from torch import nn

from sd.checkpoint import StableDiffusionModels
from sd.errors import InputError
from sd.lora import PREFIXES, LoRAPatch, add_patch, written_name


class LoRALayer(nn.Module):
    """base(x) + (alpha / r) up(down(dropout(x))) with base frozen; `patch()` is the change it makes to
    base's weight."""

    def __init__(self, base: nn.Module, down: nn.Module, up: nn.Module, alpha: float, dropout: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down, self.up = down, up
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.alpha = float(alpha)
        self.scale = self.alpha / down.weight.shape[0]  # alpha / r
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(self.dropout(x))) * self.scale

    def patch(self) -> LoRAPatch:
        """The trained change as a patch (a copy of down and up as they are now)."""
        return LoRAPatch(self.down.weight.detach().clone(), self.up.weight.detach().clone(), self.alpha)


def rank_limit(base: nn.Module) -> int:
    """The highest rank a LoRA of `base` can have: the smaller side of its weight as a matrix, min(in, out)
    (in * k * k for a convolution)."""
    return min(base.weight.shape[0], base.weight[0].numel())


def check_rank(base: nn.Module, rank: int, flag: str = "the LoRA rank", path: str | None = None) -> None:
    """Refuse a rank that is not a whole number >= 1, or above the width of `base` (the layer at `path`), in one
    line naming `flag`."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InputError(f"{flag} must be a whole number >= 1, got {rank!r}")
    if rank > rank_limit(base):
        shape = "x".join(map(str, base.weight.shape))
        raise InputError(f"{flag} {rank} is above the width of the layer {path or base} ({rank_limit(base)}, the "
                         f"smaller side of its {shape} weight): give {flag} {rank_limit(base)} or less")


class LoRALinear(LoRALayer):
    """A Linear layer with a trainable rank-`rank` branch: down (r, in), up (out, r)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        check_rank(base, rank)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        super().__init__(base, nn.Linear(base.in_features, rank, bias=False, **like),
                         nn.Linear(rank, base.out_features, bias=False, **like), alpha, dropout)


class LoRAConv(LoRALayer):
    """A Conv2d layer with a trainable rank-`rank` branch (LoCon): down (r, in, k, k) with base's stride,
    padding and dilation, up a 1x1 convolution (out, r, 1, 1)."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0):
        check_rank(base, rank)
        if base.groups != 1:
            raise InputError(f"{base} is a grouped convolution (groups={base.groups}); LoRA is for groups=1 only: "
                             f"leave it out of the pattern")
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                         bias=False, padding_mode=base.padding_mode, **like)
        super().__init__(base, down, nn.Conv2d(rank, base.out_channels, 1, bias=False, **like), alpha, dropout)


WRAPPERS: dict[type[nn.Module], type[LoRALayer]] = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv}


def lora_layers(network: nn.Module) -> dict[str, LoRALayer]:
    """The LoRA layers of `network` by module path."""
    return {path: module for path, module in network.named_modules() if isinstance(module, LoRALayer)}


def replace_module(network: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(network.get_submodule(parent), name, module)


def lora_candidates(network: nn.Module, pattern: str) -> dict[str, nn.Module]:
    """The nn.Linear and nn.Conv2d layers (those types, not subclasses, which may use their weight directly) of
    `network` whose module path `re.search`es `pattern` (e.g. r"attn[12]\\.to_(q|k|v|out\\.0)$"), those inside
    LoRA layers left out; refused if there are none."""
    wrapped = lora_layers(network)
    found = {path: module for path, module in network.named_modules()
             if path and re.search(pattern, path) and type(module) in WRAPPERS
             and not any(path.startswith(w + ".") for w in wrapped)}
    if not found:
        raise InputError(f"no Linear or Conv2d layer of the {type(network).__name__} has a path matching "
                         f"{pattern!r}; give a regular expression that matches some of its `named_modules()` paths")
    return found


def wrap_lora(network: nn.Module, pattern: str, rank: int, alpha: float, dropout: float = 0.0,
              flag: str = "the LoRA rank") -> dict[str, LoRALayer]:
    """Put a fresh LoRA layer in place of every `lora_candidates` layer of `network`, after checking the rank
    against each (a refusal names `flag`), so that a refused rank leaves the network as it was.
    Returns the new layers by path; their down and up are the parameters to train."""
    found = lora_candidates(network, pattern)
    for path, module in found.items():
        check_rank(module, rank, flag, path)
    layers = {}
    for path, module in found.items():
        layers[path] = WRAPPERS[type(module)](module, rank, alpha, dropout)
        replace_module(network, path, layers[path])
    return layers


def unwrap_lora(network: nn.Module, merge: bool = True) -> nn.Module:
    """Put the base layer back in place of every LoRA layer of `network`, with the layer's change added to
    its weight (`merge`) or as it was; the base layers stay frozen. Returns `network`."""
    for path, layer in lora_layers(network).items():
        if merge:
            add_patch(layer.base.weight, layer.patch(), 1.0)
        replace_module(network, path, layer.base)
    return network


def network_layers(models: StableDiffusionModels) -> dict[str, dict[str, LoRALayer]]:
    """The LoRA layers of the UNet and the text encoders: network name -> module path -> layer (networks
    without any left out)."""
    found = {net: lora_layers(model) for net in PREFIXES if (model := getattr(models, net)) is not None}
    return {net: layers for net, layers in found.items() if layers}


def lora_state_dict(models: StableDiffusionModels, layout: str = "kohya") -> dict[str, torch.Tensor]:
    """The LoRA layers of the UNet and the text encoders in kohya's file layout (`lora_unet_...`, `lora_te_...`
    or `lora_te1_...` and `lora_te2_...`, with `.lora_down.weight`, `.lora_up.weight`, `.alpha`) or, with `layout`
    "peft", diffusers/PEFT's (`LoRAPatch.peft_state`): saved with safetensors, a file `read_lora` reads back."""
    state = {}
    for net, layers in network_layers(models).items():
        for path, layer in layers.items():
            patch, name = layer.patch(), written_name(layout, net, path, models)
            state.update(patch.kohya_state(name) if layout == "kohya" else patch.peft_state(name))
    return state
