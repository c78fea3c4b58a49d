"""DPM-Solver++(2M) (Lu et al., 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", Alg. 2), diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++").

The probability-flow ODE is solved exactly in its linear part, in the variable lambda = log(alpha / s)
(half the log signal-to-noise ratio), where x_t = alpha x0 + s eps with alpha = sqrt(a_bar) and
s = sqrt(1 - a_bar). Each step from lambda to lambda_next = lambda + h reads

    x_next = (s_next / s) x - phi D,   phi = alpha_next (exp(-h) - 1)

with D the model's clean-latent estimate x0 = (x - s eps) / alpha (first order, which is DDIM), or, when
the previous step's estimate is at hand, D = x0 + (x0 - x0_prev) / (2 r) with r = h_prev / h, a
second-order multistep correction. The first step of a run and the last one (to sigma = 0) are first
order. Sigmas and timesteps come from the sigma machinery of k_diffusion.py (Karras sigmas with
`karras=True`, model timesteps rounded as diffusers does); unlike there, x is x_t itself, so the run
starts from unit noise and the model input is not scaled.
"""

import torch

from sd.samplers.k_diffusion import SigmaSampler


def signal_and_noise_scales(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, s) = (sqrt(a_bar), sqrt(1 - a_bar)) for sigma = s / alpha."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


class DPMSolverPP2MSampler(SigmaSampler):
    integer_timesteps = True
    init_noise_sigma = 1.0

    def scale_model_input(self, x, t):
        return x

    def add_noise(self, original, noise, timesteps):
        sigma = self._sigmas_at(timesteps).to(original.device, original.dtype).reshape(-1, 1, 1, 1)
        alpha, s = signal_and_noise_scales(sigma)  # (B, 1, 1, 1) each
        return alpha * original + s * noise  # (B, 4, h, w)

    def _spaced_timesteps(self, num_inference_steps):
        """n + 1 evenly spaced integer timesteps from 999 to 0, without the last, as diffusers spaces them."""
        return self.schedule.linspace_timesteps(num_inference_steps + 1)[:-1].round()

    def _reset(self):
        self._previous_x0 = None

    def _lambda(self, i: int) -> torch.Tensor:
        alpha, s = signal_and_noise_scales(self.sigmas[i])
        return torch.log(alpha) - torch.log(s)  # +inf at sigma = 0

    def _step(self, eps, t, x, i, generator):
        alpha, s = signal_and_noise_scales(self.sigmas[i])
        alpha_next, s_next = signal_and_noise_scales(self.sigmas[i + 1])
        h = self._lambda(i + 1) - self._lambda(i)
        x0 = (x - s * eps) / alpha  # shaped like x
        phi = alpha_next * (torch.exp(-h) - 1.0)
        x_next = (s_next / s) * x - phi * x0  # first order
        if self._previous_x0 is not None and i < len(self.timesteps) - 1:
            r = (self._lambda(i) - self._lambda(i - 1)) / h
            x_next = x_next - (0.5 * phi) * ((1.0 / r) * (x0 - self._previous_x0))  # second-order correction
        self._previous_x0 = x0
        return x_next
