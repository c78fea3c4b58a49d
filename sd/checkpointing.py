"""Gradient checkpointing (Chen et al., 2016): a block's activations are not kept for the backward pass but
computed again there, trading one more forward pass for the memory of all but the blocks' inputs. The UNet and
the text encoder run their blocks through `call`, which checkpoints while gradients are being recorded and
the network's `gradient_checkpointing` is set (`python -m sd.train ... --gradient-checkpointing`)."""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def call(network: nn.Module, block: nn.Module, *args, **kwargs):
    """block(*args, **kwargs), checkpointed when `network` asks for it and gradients are recorded."""
    if getattr(network, "gradient_checkpointing", False) and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)
