"""The CLIP text encoder (Radford et al., 2021): the text tower of CLIP ViT-L/14 and of OpenCLIP's towers.

A pre-LayerNorm transformer with a causal mask over 77 token positions. SD v1 conditions the UNet on
all 77 output vectors of the final LayerNorm: ids (B, 77) -> hidden states (B, 77, 768). Other families
read another layer (the penultimate), with or without the final LayerNorm, and SDXL also the pooled
vector: the final-LayerNorm state of the end-of-text token, projected (`text_projection`). OpenCLIP's
towers differ only in sizes and in exact GELU instead of CLIP's sigmoid approximation.
Parameter names follow the `cond_stage_model.transformer.text_model.` part of the CompVis checkpoint.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from sd.attention import Attention
from sd.checkpointing import call


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    eps: float = 1e-5
    activation: str = "quick_gelu"  # a key of ACTIVATIONS: CLIP's "quick_gelu", OpenCLIP's exact "gelu"
    projection_dim: int | None = None  # width of `text_projection` (of the pooled vector); None: no projection


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU that CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


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
        self.activation = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))  # (B, 77, C)


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
    """Token ids (B, 77) -> hidden states (B, 77, width), and optionally the pooled vector (B, projection_dim).

    `token_vectors` (B, 77, width) replace the ids' token embeddings (textual inversion puts learned
    vectors there). `encode` reads any layer: `hidden_layer` -1 is the last, -2 the penultimate
    (AUTOMATIC1111's "Clip skip" N is layer -N), with or without the final LayerNorm; given the
    end-of-text positions `eos` (B,) it also returns the pooled vector (always from the last layer)."""

    def __init__(self, cfg: CLIPConfig = CLIPConfig()):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def encode(self, ids: torch.Tensor, token_vectors: torch.Tensor | None = None, *, hidden_layer: int = -1,
               final_norm: bool = True, eos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        layers = self.encoder.layers
        stop = len(layers) + 1 + hidden_layer  # layers run before the conditioning layer's output
        x = self.embeddings(ids, token_vectors)  # (B, 77, C)
        for layer in layers[:stop]:
            x = call(self, layer, x)
        hidden = self.final_layer_norm(x) if final_norm else x  # (B, 77, C)
        if eos is None:
            return hidden, None
        for layer in layers[stop:]:
            x = call(self, layer, x)
        pooled = self.final_layer_norm(x[torch.arange(x.shape[0], device=x.device), eos])  # (B, C)
        return hidden, self.text_projection(pooled) if self.config.projection_dim is not None else pooled

    def forward(self, ids: torch.Tensor, token_vectors: torch.Tensor | None = None, clip_skip: int = 1) -> torch.Tensor:
        return self.encode(ids, token_vectors, hidden_layer=-clip_skip)[0]  # (B, 77, C)
