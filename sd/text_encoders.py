"""The text-encoder stack: which encoders condition a family's UNet, and how each one is read.

SD v1 conditions on one CLIP ViT-L/14 text tower; SD 2.x on OpenCLIP ViT-H; SDXL on both CLIP ViT-L and
OpenCLIP bigG, their hidden states concatenated along the channels, with bigG's pooled output as a
global vector. Each entry says how its tokens are padded, which hidden layer conditions, whether the final
LayerNorm is applied to it, whether the encoder yields a pooled vector, what AUTOMATIC1111's "Clip skip"
does to it (`CLIP_SKIP_RULES`), and which vectors of a textual-inversion file it takes (`sd.embeddings`).
"""

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TextEncoderSpec:
    name: str = "clip"  # the network's name in StableDiffusionModels and the checkpoint tables
    pad_id: int | None = None  # token id that pads to 77 positions; None: the end-of-text id (SD v1)
    hidden_layer: int = -1  # the layer whose output conditions (-1: the last; -2: the penultimate)
    final_norm: bool = True  # apply the final LayerNorm to that layer's output
    pooled: bool = False  # also yield the pooled vector (the end-of-text token's, projected)
    clip_skip: str = "back"  # a key of CLIP_SKIP_RULES
    embedding_key: str | None = None  # the key of its vectors in a textual-inversion file of several text encoders
    # (SDXL's "clip_l", "clip_g"); None: it takes the file's one set of vectors (SD 1.x, 2.x)

    def with_clip_skip(self, clip_skip: int) -> "TextEncoderSpec":
        """The spec that reads the layer AUTOMATIC1111's "Clip skip" `clip_skip` picks (1: unchanged)."""
        return replace(self, hidden_layer=CLIP_SKIP_RULES[self.clip_skip](self.hidden_layer, clip_skip))


CLIP_SKIP_RULES = {  # (the spec's own hidden layer, clip skip N) -> the layer read
    "back": lambda layer, n: layer - (n - 1),  # N - 1 layers further back (SD 1.x, SD 2.x)
    "from_last": lambda layer, n: min(layer, -n),  # the N-th last, never nearer the end than its own (SDXL's ViT-L)
    "none": lambda layer, n: layer,  # clip skip leaves it alone (SDXL's bigG)
}
