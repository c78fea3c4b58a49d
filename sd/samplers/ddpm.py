"""DDPM ancestral sampling (Ho et al., 2020, "Denoising Diffusion Probabilistic Models").

Each step draws x_prev from the Gaussian posterior q(x_prev | x_t, x0) with x0 predicted from the noise,
eq. 6-7 of the paper, generalised to skip from t to the previous timestep of the run, t_prev: with
a = a_bar_t, a_prev = a_bar_{t_prev}, alpha = a / a_prev and beta = 1 - alpha,

    x0     = (x_t - sqrt(1 - a) eps) / sqrt(a)
    mean   = sqrt(a_prev) beta / (1 - a) x0 + sqrt(alpha) (1 - a_prev) / (1 - a) x_t
    x_prev = mean + sqrt((1 - a_prev) / (1 - a) beta) z,   z ~ N(0, I)

The variance is the "fixed_small" posterior variance beta~ (diffusers' default); it is stochastic and
needs many steps (hundreds) for a good image.
"""

import torch

from sd.parameterization import clean_latents
from sd.samplers.base import AlphaSampler, draw_noise

MIN_VARIANCE = 1e-20  # keeps the last step's variance (exactly 0) away from 0, as diffusers does


class DDPMSampler(AlphaSampler):
    set_alpha_to_one = True  # the chain ends in the data itself

    def _step(self, eps, t, x, i, generator):
        t = int(t)
        t_prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        a, a_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        alpha = a / a_prev
        beta = 1 - alpha
        x0 = clean_latents(eps, x, a**0.5, (1 - a) ** 0.5)  # (B, 4, h, w)
        mean = (a_prev**0.5 * beta / (1 - a)) * x0 + (alpha**0.5 * (1 - a_prev) / (1 - a)) * x
        if t == 0:
            return mean
        variance = torch.clamp((1 - a_prev) / (1 - a) * beta, min=MIN_VARIANCE)
        return mean + variance**0.5 * draw_noise(eps, generator)
