"""What the UNet is conditioned on, as one bundle that batches as a whole.

Latent diffusion conditions the denoiser on the text through cross-attention (`context`); SDXL adds a
global vector (pooled text and size embeddings) to the timestep embedding through `label_emb`; the
inpainting UNet takes the mask and the masked image's latents as extra input channels (`concat`).
Classifier-free guidance (Ho & Salimans, 2022) runs the unconditional and the conditional bundle in one
batch, so every field is batched the same way.
"""

from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class Conditioning:
    context: torch.Tensor  # (B, T, C): the text encoders' hidden states, attended to by cross-attention
    vector: torch.Tensor | None = None  # (B, D): added to the timestep embedding through label_emb (SDXL "y")
    concat: torch.Tensor | None = None  # (B, c, h, w): channels concatenated to the UNet's input (inpainting)

    def map(self, f) -> "Conditioning":
        """The bundle with `f` applied to every tensor it holds."""
        return replace(self, **{field.name: f(value) for field in fields(self)
                                if (value := getattr(self, field.name)) is not None})

    @staticmethod
    def cat(bundles: list["Conditioning"]) -> "Conditioning":
        """The bundles one after the other along the batch: fields present in all of them are concatenated."""
        first = bundles[0]
        return replace(first, **{field.name: torch.cat([getattr(b, field.name) for b in bundles])
                                 for field in fields(first) if getattr(first, field.name) is not None})
