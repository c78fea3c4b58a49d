"""Classifier-free guidance (Ho & Salimans, 2022): steer the denoiser away from its unconditional prediction.

The same network, trained with captions sometimes dropped, predicts both eps(x, c) and eps(x, "") (the
negative prompt in place of ""); sampling uses

    eps = eps_uncond + w (eps_cond - eps_uncond)

with guidance scale w. Both predictions come from one batched call: the unconditional half first, every
field of the `Conditioning` batched alike. At w <= 1 there is no unconditional call: the conditional
prediction alone.
"""

from dataclasses import dataclass

import torch

from sd.conditioning import Conditioning


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    scale: float  # w; at most 1: no guidance

    @property
    def guided(self) -> bool:
        """Whether the UNet also makes the unconditional prediction."""
        return self.scale > 1.0

    def conditioning(self, cond: Conditioning, uncond: Conditioning | None) -> Conditioning:
        """The bundle the UNet is called with: (2B, ...) unconditional first when guided, else `cond` (B, ...)."""
        return Conditioning.cat([uncond, cond]) if self.guided else cond

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The UNet's input for the sample x (B, 4, h, w): twice over, (2B, 4, h, w), when guided."""
        return torch.cat([x, x]) if self.guided else x

    def combine(self, output: torch.Tensor) -> torch.Tensor:
        """The guided prediction (B, ...) from the UNet's output for `inputs` (2B or B, ...)."""
        if not self.guided:
            return output
        uncond, cond = output.chunk(2)  # (B, ...) each
        return uncond + self.scale * (cond - uncond)
