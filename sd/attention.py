"""Building blocks shared by the three networks: multi-head attention and GroupNorm.

Attention is the scaled dot-product attention of "Attention Is All You Need" (Vaswani et al., 2017):
softmax(Q K^T / sqrt(d)) V, computed per head by `torch.nn.functional.scaled_dot_product_attention`.
Each network keeps its own projection layers (their names follow the original checkpoint), and all
of them call `multi_head_attention` for the part in between.
"""

import torch
import torch.nn.functional as F
from torch import nn


_query_slice: int | None = None


def set_attention_slicing(queries: int | None) -> None:
    """Attend at most `queries` query positions at a time (None: all at once), which bounds the memory
    of attention kernels that hold the (N, M) score matrix, at some cost in speed."""
    global _query_slice
    _query_slice = queries


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         causal: bool = False) -> torch.Tensor:
    """Attend `q` (B, N, C) to `k`, `v` (B, M, C) with `heads` heads; returns (B, N, C)."""
    b, n, c = q.shape
    q, k, v = (x.reshape(b, -1, heads, c // heads).transpose(1, 2) for x in (q, k, v))  # (B, heads, N|M, d)
    if _query_slice is None or causal or n <= _query_slice:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, heads, N, d)
    else:
        out = torch.cat([F.scaled_dot_product_attention(q_part, k, v)
                         for q_part in q.split(_query_slice, dim=2)], dim=2)  # (B, heads, N, d)
    return out.transpose(1, 2).reshape(b, n, c)  # (B, N, C)


def group_norm(channels: int, eps: float, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm (Wu & He, 2018) with the 32 groups every Stable Diffusion convolution block uses."""
    return nn.GroupNorm(groups, channels, eps=eps)
