"""DPM-Solver++(2M) (Lu et al., 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", Alg. 2), diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++").

The probability-flow ODE is solved exactly in its linear part, in the variable lambda = log(alpha / s)
(half the log signal-to-noise ratio), where x_t = alpha x0 + s eps with alpha = sqrt(a_bar) and
s = sqrt(1 - a_bar). Each step from lambda to lambda_next = lambda + h reads

    x_next = (s_next / s) x - phi D,   phi = alpha_next (exp(-h) - 1)

with D the model's clean-latent estimate x0 = (x - s eps) / alpha (first order, which is DDIM), or, when
the previous step's estimate is at hand, D = x0 + (x0 - x0_prev) / (2 r) with r = h_prev / h, a
second-order multistep correction. The first step of a run and the last one (to sigma = 0) are first
order. Sigmas and timesteps come from `SigmaSampler` (any spacing; Karras sigmas with `karras=True`;
model timesteps rounded as diffusers does); x is x_t itself, so the run starts from unit noise and the
model input is not scaled.

Where rounding gives two equal timesteps (1000 steps: two at 500), that step has h = 0 and moves
nothing, and it is not kept as the "previous" estimate: r is measured from the last estimate taken at
another lambda, so no step divides by zero (diffusers' scheduler makes NaN there).
"""

import torch

from sd.parameterization import clean_latents
from sd.samplers.base import SigmaSampler, signal_and_noise_scales
from sd.samplers.spacing import rounded_linspace


class DPMSolverPP2MSampler(SigmaSampler):
    integer_timesteps = True
    default_spacing = rounded_linspace  # n + 1 evenly spaced integer timesteps from 999 to 0, without the last

    def _reset(self):
        self._previous = None  # (x0, lambda) of the last step that moved

    def _lambda(self, i: int) -> torch.Tensor:
        alpha, s = signal_and_noise_scales(self.sigmas[i])
        return torch.log(alpha) - torch.log(s)  # +inf at sigma = 0

    def _step(self, eps, t, x, i, generator):
        lam = self._lambda(i)
        h = self._lambda(i + 1) - lam
        if h == 0:  # a repeated timestep: nothing to move
            return x
        alpha, s = signal_and_noise_scales(self.sigmas[i])
        alpha_next, s_next = signal_and_noise_scales(self.sigmas[i + 1])
        x0 = clean_latents(eps, x, alpha, s)  # shaped like x
        phi = alpha_next * (torch.exp(-h) - 1.0)
        x_next = (s_next / s) * x - phi * x0  # first order
        if self._previous is not None and i < len(self.timesteps) - 1:
            previous_x0, previous_lambda = self._previous
            r = (lam - previous_lambda) / h
            x_next = x_next - (0.5 * phi) * ((1.0 / r) * (x0 - previous_x0))  # second-order correction
        self._previous = (x0, lam)
        return x_next
