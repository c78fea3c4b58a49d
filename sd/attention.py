"""Building blocks shared by the three networks: multi-head attention and GroupNorm.

Attention is the scaled dot-product attention of "Attention Is All You Need" (Vaswani et al., 2017):
softmax(Q K^T / sqrt(d)) V, computed per head by `torch.nn.functional.scaled_dot_product_attention`.
Each network keeps its own projection layers (their names follow the original checkpoint) in an
`Attention` layer, and all of them call `multi_head_attention` for the part in between: torch's fused
kernel by default, or `plain_attention`, the formula written out, when a model is configured so.
"""

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Base of the networks' attention layers: `attend` runs `multi_head_attention` with this layer's
    settings, which `configure_attention` changes for every layer of one model."""

    query_slice: int | None = None  # attend at most this many query positions at a time (None: all)
    fused: bool = True  # torch's fused kernel, else the formula written out (`plain_attention`)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
               causal: bool = False) -> torch.Tensor:
        return multi_head_attention(q, k, v, heads, causal, self.query_slice, self.fused)


def configure_attention(model: nn.Module, *, query_slice: int | None = None, fused: bool = True) -> None:
    """Settings of every attention layer of `model`. Slicing bounds the memory of kernels that hold the
    (N, M) score matrix, at some cost in speed (torch's fused CPU and CUDA kernels do not hold it)."""
    for layer in model.modules():
        if isinstance(layer, Attention):
            layer.query_slice, layer.fused = query_slice, fused


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V for q (..., N, d), k and v (..., M, d), as written: (..., N, d). In float16 the
    scores are computed in float32: SD 2.1's overflow float16 (black images, diffusers #1614)."""
    if q.dtype == torch.float16:
        return plain_attention(q.float(), k.float(), v.float(), causal).half()
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., N, M)
    if causal:  # position i attends to positions <= i only
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1),
                                    float("-inf"))
    return scores.softmax(dim=-1) @ v


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False,
                         query_slice: int | None = None, fused: bool = True) -> torch.Tensor:
    """Attend `q` (B, N, C) to `k`, `v` (B, M, C) with `heads` heads; returns (B, N, C)."""
    b, n, c = q.shape
    q, k, v = (x.reshape(b, -1, heads, c // heads).transpose(1, 2) for x in (q, k, v))  # (B, heads, N|M, d)
    attend = partial(F.scaled_dot_product_attention, is_causal=causal) if fused else partial(plain_attention,
                                                                                              causal=causal)
    if query_slice is None or causal or n <= query_slice:
        out = attend(q, k, v)  # (B, heads, N, d)
    else:
        out = torch.cat([attend(q_part, k, v) for q_part in q.split(query_slice, dim=2)], dim=2)  # (B, heads, N, d)
    return out.transpose(1, 2).reshape(b, n, c)  # (B, N, C)


def group_norm(channels: int, eps: float, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm (Wu & He, 2018); every Stable Diffusion v1 convolution block uses 32 groups. A flat region
    normalised over a group of one channel is zero, so narrow networks need fewer groups to keep colour."""
    return nn.GroupNorm(groups, channels, eps=eps)
