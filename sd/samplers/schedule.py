"""The noise schedule Stable Diffusion v1 was trained with, and how samplers pick timesteps from it.

Training noises a latent x0 to timestep t in [0, 1000) as x_t = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) eps
with eps ~ N(0, I) (Ho et al., 2020, eq. 4), where a_bar_t = prod_{s <= t} (1 - beta_s) and the betas
follow SD's "scaled_linear" schedule: evenly spaced in sqrt(beta). Samplers that work with sigmas
(Karras et al., 2022) use the equivalent noise level sigma_t = sqrt((1 - a_bar_t) / a_bar_t): then
x_t / sqrt(a_bar_t) = x0 + sigma_t eps.

Models trained for zero terminal SNR (Lin et al., 2024, "Common Diffusion Noise Schedules and Sample Steps
are Flawed") use the same betas rescaled so that a_bar at the last timestep is 0 (pure noise, Algorithm 1),
held at 2**-24 so that sigma stays finite (about 4096), as diffusers holds it; their integer-timestep runs
are "trailing": they start at T - 1, where the noise is pure, rather than at the "leading" grid's top.
"""

from dataclasses import dataclass
from functools import cached_property

import torch


def linspace(start: float, stop: float, n: int) -> torch.Tensor:
    """n evenly spaced values (float64) computed as numpy.linspace does, start + i * step, so that the
    timesteps diffusers rounds come out the same (at 26 steps, 13 * (999 / 26) is a hair under 499.5)."""
    if n == 1:
        return torch.tensor([float(start)], dtype=torch.float64)
    values = start + torch.arange(n, dtype=torch.float64) * ((stop - start) / (n - 1))  # (n,)
    values[-1] = stop
    return values


TERMINAL_ALPHA_BAR = 2.0**-24  # a_bar at the last timestep of a zero-terminal-SNR schedule, kept above 0


def rescaled_to_zero_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose sqrt(a_bar) is shifted and scaled so that it ends at 0 and keeps its first value (Lin et al.,
    2024, Algorithm 1)."""
    root = torch.cumprod(1.0 - betas, dim=0) ** 0.5  # (T,) sqrt(a_bar)
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alphas_cumprod = root**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])  # (T,)
    return 1 - alphas


@dataclass(frozen=True)
class NoiseSchedule:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    steps_offset: int = 1  # "leading" spacing starts at t = 1 (CompVis DDIM: range(0, 1000, c) + 1)
    zero_terminal_snr: bool = False  # the betas rescaled to a_bar_T = 0 (Lin et al., 2024)
    trailing: bool = False  # integer-timestep runs start at T - 1 ("trailing") instead of on the leading grid

    @cached_property
    def betas(self) -> torch.Tensor:
        """"scaled_linear" betas, (T,) float32."""
        sqrt_betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, self.num_train_timesteps,
                                    dtype=torch.float32)  # (T,)
        return rescaled_to_zero_snr(sqrt_betas**2) if self.zero_terminal_snr else sqrt_betas**2

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """a_bar_t, the fraction of the signal's variance left at timestep t, (T,) float32, decreasing."""
        alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        if self.zero_terminal_snr:
            alphas_cumprod[-1] = TERMINAL_ALPHA_BAR
        return alphas_cumprod

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt((1 - a_bar_t) / a_bar_t), (T,) float32, increasing from about 0.03 to 14.6."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def integer_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """The integer timesteps of an n-step run, descending: trailing or leading, as the schedule says."""
        if self.trailing:  # T - 1, T - 1 - T/n, ... rounded: diffusers' "trailing" (numpy's arange, whose
            # float step comes out as (T - T/n) - T; its length can be n + 1, ending at t = -1: n are kept)
            top = float(self.num_train_timesteps)
            delta = (top - top / num_inference_steps) - top
            values = top + torch.arange(num_inference_steps, dtype=torch.float64) * delta  # (n,)
            return (values.round() - 1).long()
        return self.leading_timesteps(num_inference_steps)

    def leading_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Every (T // n)-th timestep from steps_offset up, descending (int64), as CompVis' DDIM and PLMS.
        At n = T the offset would put the first step at T, past the schedule (CompVis and diffusers fail
        there): the offset shrinks to keep every timestep below T."""
        step_ratio = self.num_train_timesteps // num_inference_steps
        top = (num_inference_steps - 1) * step_ratio
        offset = min(self.steps_offset, self.num_train_timesteps - 1 - top)
        return torch.arange(num_inference_steps - 1, -1, -1) * step_ratio + offset  # (n,)

    def linspace_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """n evenly spaced, possibly fractional timesteps from T - 1 down to 0 (float64), as k-diffusion."""
        return linspace(0, self.num_train_timesteps - 1, num_inference_steps).flip(0)  # (n,)
