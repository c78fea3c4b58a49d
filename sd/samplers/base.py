"""The interface all samplers share, modelled on diffusers' schedulers so that results can be compared,
and the two families they come in.

A pipeline drives any sampler the same way (classifier-free guidance left out):

    sampler.set_timesteps(num_inference_steps, device)
    x = noise * sampler.init_noise_sigma                             # (B, 4, h, w)
    for t in sampler.timesteps:
        eps = unet(sampler.scale_model_input(x, t), t, context)      # predicted noise
        x = sampler.step(eps, t, x, generator)

img2img starts part-way through the same schedule: `sampler.set_strength(strength)` picks the begin
index i, `x = sampler.add_noise(image_latents, noise, sampler.timesteps[i:i + 1])`, then the loop runs
over `sampler.timesteps[i:]`. A sampler counts the steps it has taken itself (`step_index`), so
multistep methods know where they are without the pipeline's help.

The price of this one-call-per-`step` interface: a method that evaluates the model more than once per
step cannot ask for those evaluations itself. Heun and the first step of PLMS are written as state
carried between calls over a timestep list that repeats entries (the second call at a repeated
timestep is the correction), so `timesteps` is longer than the number of steps, `order` says by how
much, and a caller must make exactly one `step` call per entry. Parity with diffusers, step by step,
rests on keeping this interface.

The model output is the noise eps; a model that predicts something else has it turned into eps first
(`sd.parameterization.to_epsilon`, at the `input_scales` of the step).

Two families, both in the variable x_t = alpha x0 + s eps of the training process (alpha =
sqrt(a_bar_t), s = sqrt(1 - a_bar_t)), which `add_noise` and `predicted_original` implement once
(`sd.parameterization`) from the (alpha, s) a subclass gives in `_scales`:
- `AlphaSampler`: integer timesteps of the training schedule, read in a_bar (DDPM, DDIM, PLMS);
- `SigmaSampler`: a run chosen in the noise level sigma = s / alpha (Karras et al., 2022) by a sigma
  spacing (`spacing.py`: evenly in timestep, Karras, exponential) (DPM-Solver++ as it is; the
  k-diffusion samplers change the variable to x_t / alpha, where (alpha, s) = (1, sigma), see
  k_diffusion.py).
"""

import torch

from sd.errors import InputError
from sd.parameterization import Scales, clean_latents, noised, scales
from sd.samplers.schedule import NoiseSchedule
from sd.samplers.spacing import SPACINGS, Spacing, linspace


def draw_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) noise shaped like `like`, drawn as diffusers' `randn_tensor` draws it: on the generator's
    device, then moved, so that a CPU generator gives the same numbers whatever device runs the model."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def signal_and_noise_scales(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, s) = (sqrt(a_bar), sqrt(1 - a_bar)) for sigma = s / alpha."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


class Sampler:
    """Base class. Subclasses build their timesteps in `_make_timesteps` and take one step in `_step`."""

    order: int = 1  # model calls per step of the schedule: img2img that skips k steps begins at k * order
    init_noise_sigma: float = 1.0  # standard deviation of the starting noise (valid after set_timesteps)

    def __init__(self, schedule: NoiseSchedule | None = None):
        self.schedule = schedule or NoiseSchedule()
        self.num_inference_steps = 0
        self.timesteps = torch.empty(0)  # (n,) the model timesteps to loop over, in order
        self._begin_index = 0
        self._step_index = 0

    @property
    def max_steps(self) -> int:
        """The most steps a run can have: as many as training had timesteps, unless a sampler says less."""
        return self.schedule.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Choose the timesteps of an n-step run and start at the first of them."""
        if not 1 <= num_inference_steps <= self.max_steps:
            raise InputError(f"steps must be between 1 and {self.max_steps}, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        self._start(self._make_timesteps(num_inference_steps), device)
        self.set_begin_index(0)

    def _start(self, run, device: torch.device | str | None) -> None:
        """Take the run `_make_timesteps` made: here, its timesteps."""
        self.timesteps = run.to(device)

    def set_begin_index(self, index: int) -> None:
        """(Re)start the run at `timesteps[index]`, forgetting the history multistep methods keep."""
        self._begin_index = self._step_index = index
        self._reset()

    def set_strength(self, strength: float) -> None:
        """Begin where an img2img run that redraws `strength` of its image (0 to 1) begins: after the first
        n - int(n * strength) of the n steps, each `order` entries of `timesteps` long (diffusers' rule)."""
        n = self.num_inference_steps
        self.set_begin_index((n - min(int(n * strength), n)) * self.order)

    def switch_timestep(self, switch: float) -> int:
        """The timestep where a run hands over to a refiner after `switch` (0 to 1) of the way: T - switch * T,
        rounded (diffusers' `discrete_timestep_cutoff`)."""
        return int(round(self.schedule.num_train_timesteps * (1 - switch)))

    def steps_before(self, switch: float) -> int:
        """The entries of the run from its begin index that come before the hand-off at `switch`: those whose
        timestep is at or above `switch_timestep` (diffusers' `denoising_end`)."""
        return int((self.timesteps[self.begin_index:] >= self.switch_timestep(switch)).sum())

    def steps_after(self, switch: float) -> int:
        """The entries at the end of the run that come after the hand-off at `switch`: those below
        `switch_timestep`, one more where an even count would split a second-order step (diffusers'
        `denoising_start`)."""
        n = int((self.timesteps < self.switch_timestep(switch)).sum())
        return n + 1 if self.order == 2 and n % 2 == 0 else n

    @property
    def begin_index(self) -> int:
        """Position in `timesteps` where this run began."""
        return self._begin_index

    @property
    def step_index(self) -> int:
        """Position in `timesteps` of the next call to `step`."""
        return self._step_index

    def scale_model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model sees of the current sample x_t; unchanged unless a sampler says otherwise."""
        return x

    def step(self, model_output: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """From the sample x at timestep t and the model's noise prediction to the next, less noisy sample."""
        x_prev = self._step(model_output.to(x.dtype), t, x, self._step_index, generator)
        self._step_index += 1
        return x_prev

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Noise clean latents (B, 4, h, w) to the level of `timesteps` (B,) or (1,), as training did."""
        return noised(original, noise, *self._scales(timesteps, original))  # (B, 4, h, w)

    def predicted_original(self, eps: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The clean latents x0 that the model's noise prediction at (x, t) implies."""
        return clean_latents(eps, x, *self._scales(t, x))

    def input_scales(self, t: torch.Tensor, like: torch.Tensor) -> Scales:
        """(alpha, s) of x_t, the sample the model sees at the next step (timestep t), shaped (1, 1, 1, 1): what
        `sd.parameterization.to_epsilon` needs to turn another prediction than eps into eps."""
        return self._scales(t, like)

    def _scales(self, timesteps: torch.Tensor, like: torch.Tensor) -> Scales:
        """(alpha, s) of each timestep in the variable x = alpha x0 + s eps this sampler steps in, shaped
        (B, 1, 1, 1) on `like`'s device and dtype."""
        raise NotImplementedError

    def _make_timesteps(self, num_inference_steps: int):
        """The run of n steps (its timesteps, and for samplers in sigma their sigmas), without side effects."""
        raise NotImplementedError

    def _step(self, eps: torch.Tensor, t: torch.Tensor, x: torch.Tensor, i: int,
              generator: torch.Generator | None) -> torch.Tensor:
        """One step from timesteps[i]; eps is the model output in x's dtype."""
        raise NotImplementedError

    def _reset(self) -> None:
        """Forget the state carried from step to step (none here)."""


class AlphaSampler(Sampler):
    """Base of the samplers that follow the discrete training process in a_bar (DDPM, DDIM, PLMS).

    Timesteps are integers with "leading" spacing (1, 1 + T//n, ...), the model sees x_t as it is and
    the run starts from unit noise. Past the last timestep, `alpha_bar(t < 0)` is 1 (pure signal) when
    `set_alpha_to_one`, otherwise a_bar_0 as in SD's published scheduler configuration.
    """

    set_alpha_to_one: bool = False

    def alpha_bar(self, t: int) -> torch.Tensor:
        alphas_cumprod = self.schedule.alphas_cumprod
        if t >= 0:
            return alphas_cumprod[t]
        return torch.tensor(1.0) if self.set_alpha_to_one else alphas_cumprod[0]

    def _make_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        return self.schedule.integer_timesteps(num_inference_steps)

    def _scales(self, timesteps, like):
        return scales(self.schedule.alphas_cumprod, timesteps, like)


class SigmaSampler(Sampler):
    """Base of the samplers whose run is chosen in sigma: beside the model timesteps it builds `sigmas`
    (len(timesteps) + 1,), the last one 0, on the CPU, with a sigma spacing (`sd.samplers.spacing`, or its
    name): by default n evenly spaced, possibly fractional timesteps from 999 down to 0 ("linspace");
    `karras=True` is short for `spacing=karras`, EDM's eq. 5 schedule, which spends more steps at low noise."""

    integer_timesteps: bool = False  # round the model timesteps, keeping the sigmas (diffusers' DPM-Solver++)
    default_spacing: Spacing = linspace

    def __init__(self, schedule: NoiseSchedule | None = None, *, spacing: Spacing | str | None = None,
                 karras: bool = False):
        super().__init__(schedule)
        if karras and spacing is not None:
            raise InputError(f"give either karras=True or spacing={spacing!r}, not both")
        spacing = "karras" if karras else spacing
        if isinstance(spacing, str) and spacing not in SPACINGS:
            raise InputError(f"unknown sigma spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")
        self.spacing = SPACINGS[spacing] if isinstance(spacing, str) else spacing or type(self).default_spacing
        self.sigmas = torch.empty(0)

    def _make_timesteps(self, num_inference_steps):
        timesteps, sigmas = self.spacing(self.schedule, num_inference_steps)  # (n,) each
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).float()  # (n + 1,)
        return (timesteps.round().long() if self.integer_timesteps else timesteps.float()), sigmas

    def _start(self, run, device):
        timesteps, self.sigmas = run
        self.timesteps = timesteps.to(device)

    def _sigmas_at(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The sigma of each timestep (B,), looked up in `timesteps` from the begin index on, shaped (B, 1, 1, 1)
        on `like`'s device and dtype."""
        candidates = self.timesteps[self._begin_index:].cpu()
        indices = []
        for t in timesteps.reshape(-1).cpu():
            matches = (candidates == t).nonzero()
            if len(matches) == 0:
                raise ValueError(f"timestep {float(t)} is not among this run's timesteps from the begin index on")
            indices.append(self._begin_index + int(matches[0]))
        return self.sigmas[indices].to(like.device, like.dtype).reshape(-1, 1, 1, 1)

    def _scales(self, timesteps, like):
        return signal_and_noise_scales(self._sigmas_at(timesteps, like))

    def input_scales(self, t, like):
        sigma = self.sigmas[self._step_index].to(like.device, like.dtype).reshape(1, 1, 1, 1)
        return signal_and_noise_scales(sigma)
