"""SDXL's micro-conditioning (Podell et al., 2023, sec. 2.2): the image's sizes and crop as inputs of the UNet.

SDXL was trained on images of every size and crop, each told to the UNet: the original size (h, w) of the
training image, the top-left corner (top, left) of the crop taken from it, and the target size (h, w) it
was resized to; the refiner instead of the target size an aesthetic score (6.0 asks for a good image, 2.5
is the negative's). At sampling time these are free controls: the defaults (sizes = the image's own, crop
0, 0) ask for an uncropped, well-framed image of that size. Each number is embedded as a timestep is
(256 sinusoidal channels, cosines first) and the embeddings follow the pooled text vector:
vector = [pooled (1280), emb(h, w, top, left, h, w) (6 x 256)] = 2816 for SDXL base, 2560 for the refiner.
"""

from dataclasses import dataclass

import torch

from sd.unet import timestep_embedding

EMBEDDING_CHANNELS = 256  # per number
MAX_PERIOD = 10000.0
DEFAULT_CROP = (0, 0)
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # the refiner's defaults (sgm, diffusers)
COUNTS = {"original_size": 2, "crop": 2, "target_size": 2, "aesthetic_score": 1}  # numbers of each condition


def vector_width(pooled_width: int, names: tuple[str, ...]) -> int:
    """The width of the vector of a UNet conditioned on a pooled text vector and the micro-conditions `names`."""
    return pooled_width + EMBEDDING_CHANNELS * sum(COUNTS[name] for name in names)


@dataclass(frozen=True)
class MicroConditions:
    """The values of one generation; a family's `micro_conditions` names which of them its UNet takes."""

    original_size: tuple[int, int]  # (h, w)
    crop: tuple[int, int]  # (top, left)
    target_size: tuple[int, int]  # (h, w)
    aesthetic_score: float = AESTHETIC_SCORE
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE  # the aesthetic score of the negative side

    def values(self, names: tuple[str, ...], negative: bool = False) -> list[float]:
        """The numbers the UNet embeds, in the order of `names`, for the prompt's side or the `negative` one."""
        out = []
        for name in names:
            value = getattr(self, "negative_" + name if negative and name == "aesthetic_score" else name)
            out += list(value) if isinstance(value, tuple) else [value]
        return out


def embed(pooled: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The vector label_emb takes: the pooled text (B, P) and the micro-conditions (B, k), each of the k embedded
    in 256 channels -> (B, P + 256 k)."""
    b, k = values.shape
    embedded = timestep_embedding(values.reshape(-1), EMBEDDING_CHANNELS, MAX_PERIOD)  # (B k, 256)
    return torch.cat([pooled, embedded.reshape(b, k * EMBEDDING_CHANNELS).to(pooled.dtype)], dim=1)  # (B, P + 256 k)
