"""Sigma spacings: where the n steps of a run fall on the training schedule's noise levels.

A spacing is a function `(schedule, n) -> (timesteps, sigmas)`, both (n,) from the noisiest down, that
any sampler in sigma (`SigmaSampler(spacing=...)`) takes:
- `linspace`: n timesteps evenly spaced from T - 1 down to 0, possibly fractional, their sigmas
  interpolated (k-diffusion's and diffusers' "linspace");
- `rounded_linspace`: the first n of n + 1 such timesteps, rounded (diffusers' DPM-Solver "linspace");
- `karras`: evenly spaced in sigma^(1/rho) (Karras et al., 2022, eq. 5), which spends more steps at
  low noise;
- `exponential`: evenly spaced in log sigma (k-diffusion's get_sigmas_exponential).
The last two pick sigmas first, each then gets the fractional timestep with that sigma.
"""

import math
from collections.abc import Callable

import torch

from sd.samplers.schedule import NoiseSchedule, linspace as evenly_spaced

KARRAS_RHO = 7.0  # EDM eq. 5: rho = 7 spaces the steps well for images

Spacing = Callable[[NoiseSchedule, int], tuple[torch.Tensor, torch.Tensor]]


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = KARRAS_RHO) -> torch.Tensor:
    """n sigmas from sigma_max to sigma_min, evenly spaced in sigma^(1/rho) (float64)."""
    ramp = evenly_spaced(0, 1, n)  # (n,)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def interpolate(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """values (T,) given at the timesteps 0..T-1, linearly interpolated at fractional timesteps t (float64)."""
    low = t.floor().long().clamp(max=len(values) - 2)  # (n,)
    values = values.double()
    return values[low] + (t - low) * (values[low + 1] - values[low])


def sigma_to_t(sigmas: torch.Tensor, training_sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional timestep of each sigma, interpolating log sigma between training timesteps."""
    log_training = training_sigmas.log().double()  # (T,) increasing
    log_sigmas = sigmas.log()  # (n,)
    low = (torch.searchsorted(log_training, log_sigmas, right=True) - 1).clamp(0, len(log_training) - 2)
    w = (log_training[low] - log_sigmas) / (log_training[low] - log_training[low + 1])
    return low + w.clamp(0, 1)


def at_timesteps(schedule: NoiseSchedule, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps chosen first (float32, as diffusers holds them), each with its interpolated sigma."""
    timesteps = timesteps.float()  # (n,)
    return timesteps, interpolate(schedule.sigmas, timesteps.double())


def at_sigmas(schedule: NoiseSchedule, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmas chosen first, each with the fractional timestep it lies at."""
    return sigma_to_t(sigmas, schedule.sigmas), sigmas


def linspace(schedule: NoiseSchedule, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return at_timesteps(schedule, schedule.linspace_timesteps(n))


def rounded_linspace(schedule: NoiseSchedule, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return at_timesteps(schedule, schedule.linspace_timesteps(n + 1)[:-1].round())


def karras(schedule: NoiseSchedule, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return at_sigmas(schedule, karras_sigmas(float(schedule.sigmas[0]), float(schedule.sigmas[-1]), n))


def exponential(schedule: NoiseSchedule, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    log_max, log_min = math.log(float(schedule.sigmas[-1])), math.log(float(schedule.sigmas[0]))
    return at_sigmas(schedule, evenly_spaced(log_max, log_min, n).exp())


SPACINGS: dict[str, Spacing] = {"linspace": linspace, "rounded_linspace": rounded_linspace, "karras": karras,
                                "exponential": exponential}
