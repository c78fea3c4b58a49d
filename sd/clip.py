"""The CLIP text encoder of Stable Diffusion v1 (Radford et al., 2021: the ViT-L/14 text tower).

A 12-layer pre-LayerNorm transformer with a causal mask over 77 token positions. SD v1 conditions
the UNet on all 77 output vectors of the final LayerNorm: ids (B, 77) -> hidden states (B, 77, 768).
Parameter names follow the `cond_stage_model.transformer.text_model.` part of the CompVis checkpoint.
"""

from dataclasses import dataclass

import torch
from torch import nn

from sd.attention import Attention


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    eps: float = 1e-5


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU that CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(Attention):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 77, C)
        out = self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)
        return self.out_proj(out)  # (B, 77, C)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.width * cfg.mlp_ratio)
        self.fc2 = nn.Linear(cfg.width * cfg.mlp_ratio, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))  # (B, 77, C)


class CLIPLayer(nn.Module):
    """One pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))  # (B, 77, C)


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids: torch.Tensor, token_vectors: torch.Tensor | None = None) -> torch.Tensor:  # ids: (B, T)
        tokens = self.token_embedding(ids) if token_vectors is None else token_vectors  # (B, T, C)
        return tokens + self.position_embedding.weight[: ids.shape[1]]  # (B, T, C)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.layers))


class CLIPTextModel(nn.Module):
    """Token ids (B, 77) -> final-LayerNorm hidden states (B, 77, width).

    `token_vectors` (B, 77, width) replace the ids' token embeddings (textual inversion puts learned
    vectors there); `clip_skip` N > 1 takes the hidden states of the N-th last layer instead of the
    last, through the same final LayerNorm (what AUTOMATIC1111 calls "Clip skip")."""

    def __init__(self, cfg: CLIPConfig = CLIPConfig()):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, ids: torch.Tensor, token_vectors: torch.Tensor | None = None, clip_skip: int = 1) -> torch.Tensor:
        x = self.embeddings(ids, token_vectors)  # (B, 77, 768)
        for layer in self.encoder.layers[: len(self.encoder.layers) - (clip_skip - 1)]:
            x = layer(x)
        return self.final_layer_norm(x)  # (B, 77, 768)
