"""Latent Consistency Models (Luo et al., 2023): images in 2 to 8 steps from a consistency-distilled model.

A consistency model maps any point x_t of a trajectory to its end in one evaluation, through the
boundary condition of Song et al. (2023), with the timestep scaled by 10 and sigma_data = 0.5:

    x0       = (x_t - sqrt(1 - a_bar_t) eps) / sqrt(a_bar_t)
    denoised = c_skip(t) x_t + c_out(t) x0,   c_skip = sigma_data^2 / ((10 t)^2 + sigma_data^2),
                                               c_out = 10 t / sqrt((10 t)^2 + sigma_data^2)

Sampling with more steps alternates: denoise, then noise the result afresh to the next timestep; the
last step returns the denoised latents. The timesteps are n of the 50 the distillation used
(k - 1, 2k - 1, ..., 999 with k = 1000 / 50), taken at evenly spaced positions from the top. It needs an
LCM-distilled UNet or an LCM-LoRA merged into an SD v1 model, with guidance around 1 to 2.
"""

import torch

from sd.parameterization import clean_latents, noised
from sd.samplers.base import AlphaSampler, draw_noise
from sd.samplers.schedule import NoiseSchedule

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


class LCMSampler(AlphaSampler):
    def __init__(self, schedule: NoiseSchedule | None = None, *, original_steps: int = 50):
        super().__init__(schedule)
        self.original_steps = original_steps

    @property
    def max_steps(self) -> int:
        return self.original_steps

    def _make_timesteps(self, num_inference_steps):
        k = self.schedule.num_train_timesteps // self.original_steps
        distilled = torch.arange(self.original_steps, 0, -1) * k - 1  # (50,) 999, 979, ..., 19
        positions = torch.arange(num_inference_steps) * self.original_steps // num_inference_steps  # (n,)
        return distilled[positions]

    def _step(self, eps, t, x, i, generator):
        last = i == len(self.timesteps) - 1
        a = self.alpha_bar(int(t))
        a_next = self.alpha_bar(int(self.timesteps[i if last else i + 1]))
        scaled = int(t) * TIMESTEP_SCALING
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        x0 = clean_latents(eps, x, a**0.5, (1 - a) ** 0.5)  # (B, 4, h, w)
        denoised = c_out * x0 + c_skip * x
        if last:
            return denoised
        return noised(denoised, draw_noise(eps, generator), a_next**0.5, (1 - a_next) ** 0.5)
