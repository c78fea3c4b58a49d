"""Samplers (noise schedulers) of Stable Diffusion v1, chosen by name.

    sampler = make_sampler("dpmpp_2m_karras")
    sampler = make_sampler("ddim", eta=0.5)
    sampler = make_sampler("euler", spacing="exponential")   # or spacing=sd.samplers.spacing.karras

Every sampler has the interface of `base.Sampler`. Options: `eta` for ddim; `spacing` (a function or a
name of `spacing.SPACINGS`; `karras=True` is short for spacing="karras") for the sigma-space samplers
(euler, euler_a, heun, lms, dpmpp_2m); `original_steps` for lcm; `schedule` (a `NoiseSchedule`) for all.
"""

import inspect
from collections.abc import Callable
from functools import partial

from sd.errors import InputError
from sd.samplers.base import Sampler
from sd.samplers.ddim import DDIMSampler
from sd.samplers.ddpm import DDPMSampler
from sd.samplers.dpm_solver import DPMSolverPP2MSampler
from sd.samplers.k_diffusion import EulerAncestralSampler, EulerSampler, HeunSampler, LMSSampler
from sd.samplers.lcm import LCMSampler
from sd.samplers.plms import PLMSSampler
from sd.samplers.schedule import NoiseSchedule
from sd.samplers.spacing import SPACINGS, karras

SAMPLERS: dict[str, Callable[..., Sampler]] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "plms": PLMSSampler,
    "euler": EulerSampler,
    "euler_a": EulerAncestralSampler,
    "heun": HeunSampler,
    "lms": LMSSampler,
    "dpmpp_2m": DPMSolverPP2MSampler,
    "dpmpp_2m_karras": partial(DPMSolverPP2MSampler, spacing=karras),
    "lcm": LCMSampler,  # for LCM-distilled models and LCM-LoRAs only: 2 to 8 steps, guidance 1 to 2
}

# Deterministic, second order and multistep (one model call per step): good images in 20-30 steps.
DEFAULT_SAMPLER = "dpmpp_2m_karras"


def make_sampler(name: str, **options) -> Sampler:
    """The sampler registered as `name`, built with `options` (see the module docstring)."""
    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    constructor = SAMPLERS[name]
    accepted = inspect.signature(constructor).parameters
    for option in options:
        if option not in accepted:
            raise InputError(f"sampler {name!r} has no option {option!r}; its options: {', '.join(accepted)}")
    return constructor(**options)


__all__ = ["DEFAULT_SAMPLER", "SAMPLERS", "SPACINGS", "NoiseSchedule", "Sampler", "make_sampler"]
