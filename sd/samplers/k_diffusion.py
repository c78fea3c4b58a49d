"""Samplers in sigma space (Karras et al., 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", "EDM"), as Katherine Crowson's k-diffusion and diffusers implement them for SD.

Dividing x_t by sqrt(a_bar_t) turns the training process into x = x0 + sigma eps with
sigma = sqrt((1 - a_bar) / a_bar): noise of growing standard deviation added to the data. Sampling
then solves the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma = eps from sigma_max down
to 0, where D = x - sigma eps is the model's estimate of the clean latents (EDM eq. 3-4). The run
starts from sigma_max * noise, the model sees x / sqrt(sigma^2 + 1) (which is x_t itself) and the
timestep whose sigma that is, and the last step lands on sigma = 0.

The sigmas of a run come from `SigmaSampler` (base.py) and its spacing (spacing.py). Samplers: Euler
(EDM Alg. 1 without its second-order correction), Euler ancestral, Heun (EDM Alg. 1) and LMS
(k-diffusion's linear multistep). DPM-Solver++ (dpm_solver.py) shares the sigmas but stays in x_t.
"""

import math

import torch

from sd.samplers.base import SigmaSampler, draw_noise

LMS_MAX_ORDER = 4


class KDiffusionSampler(SigmaSampler):
    """Base of Euler, Euler ancestral, Heun and LMS, which work in x = x_t / alpha = x0 + sigma eps: the run
    starts from sigma_max * noise, and the model sees x / sqrt(sigma^2 + 1), which is x_t itself."""

    @property
    def init_noise_sigma(self) -> float:
        return float(self.sigmas.max())

    def scale_model_input(self, x, t):
        sigma = self.sigmas[self._step_index]
        return x / (sigma**2 + 1) ** 0.5

    def _scales(self, timesteps, like):
        """(1, sigma): x = x0 + sigma eps, so `add_noise` and `predicted_original` (D(x; sigma)) hold here too."""
        sigma = self._sigmas_at(timesteps, like)  # (B, 1, 1, 1)
        return torch.ones_like(sigma), sigma

    @staticmethod
    def _derivative(eps: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """dx/dsigma = (x - D) / sigma with the denoised estimate D = x - sigma eps (k-diffusion's to_d)."""
        denoised = x - sigma * eps  # (B, 4, h, w)
        return (x - denoised) / sigma


class EulerSampler(KDiffusionSampler):
    def _step(self, eps, t, x, i, generator):
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        return x + self._derivative(eps, x, sigma) * (sigma_next - sigma)


class EulerAncestralSampler(KDiffusionSampler):
    """Euler down to sigma_down, then fresh noise of std sigma_up back up to sigma_next (k-diffusion;
    sigma_down^2 + sigma_up^2 = sigma_next^2, with the DDPM amount of new noise)."""

    def _step(self, eps, t, x, i, generator):
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + self._derivative(eps, x, sigma) * (sigma_down - sigma)
        return x + draw_noise(eps, generator) * sigma_up


class HeunSampler(KDiffusionSampler):
    """Heun's second-order method (EDM Alg. 1): an Euler step predicts x at the next sigma, the model is
    evaluated there, and the step is redone from the start with the mean of both slopes. Each step
    takes two calls, so `timesteps` repeats every entry after the first (as diffusers) and the last
    step, to sigma = 0, stays a plain Euler step."""

    order = 2

    def _make_timesteps(self, num_inference_steps):
        timesteps, sigmas = super()._make_timesteps(num_inference_steps)  # (n,), (n + 1,)
        return (torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]),  # (2n - 1,)
                torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]]))  # (2n,)

    def _reset(self):
        self._predictor = None  # (x, slope, dsigma) of an Euler step awaiting its correction

    def _step(self, eps, t, x, i, generator):
        if self._predictor is None:
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
            slope = self._derivative(eps, x, sigma)
            self._predictor = (x, slope, sigma_next - sigma)
            return x + slope * (sigma_next - sigma)
        x_start, slope_start, dsigma = self._predictor
        self._predictor = None
        slope = (slope_start + self._derivative(eps, x, self.sigmas[i])) / 2
        return x_start + slope * dsigma


class LMSSampler(KDiffusionSampler):
    """Linear multistep: integrate the polynomial through the last (up to 4) slopes over [sigma, sigma_next].

    Deviation from diffusers: the order grows with the slopes this run has seen (as k-diffusion), where
    diffusers' LMSDiscreteScheduler takes it from the step index, which breaks img2img's first steps.
    """

    def _reset(self):
        self._slopes = []  # newest last

    def _step(self, eps, t, x, i, generator):
        self._slopes = [*self._slopes[-(LMS_MAX_ORDER - 1):], self._derivative(eps, x, self.sigmas[i])]
        order = len(self._slopes)
        weights = [self._lms_weight(i, order, j) for j in range(order)]
        return x + sum(w * slope for w, slope in zip(weights, reversed(self._slopes)))

    def _lms_weight(self, i: int, order: int, j: int) -> float:
        """Integral over [sigmas[i], sigmas[i + 1]] of the Lagrange polynomial that is 1 at sigmas[i - j]
        and 0 at the other sigmas[i - k], k < order."""
        nodes = [float(self.sigmas[i - k]) for k in range(order)]

        def lagrange(s: float) -> float:
            return math.prod((s - nodes[k]) / (nodes[j] - nodes[k]) for k in range(order) if k != j)

        # two-point Gauss-Legendre quadrature is exact for polynomials up to degree 3 = LMS_MAX_ORDER - 1
        a, b = float(self.sigmas[i]), float(self.sigmas[i + 1])
        middle, half = (a + b) / 2, (b - a) / 2
        offset = half / math.sqrt(3)
        return half * (lagrange(middle - offset) + lagrange(middle + offset))
