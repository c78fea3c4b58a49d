"""The interface all samplers share, modelled on diffusers' schedulers so that results can be compared.

A pipeline drives any sampler the same way (classifier-free guidance left out):

    sampler.set_timesteps(num_inference_steps, device)
    x = noise * sampler.init_noise_sigma                             # (B, 4, h, w)
    for t in sampler.timesteps:
        eps = unet(sampler.scale_model_input(x, t), t, context)      # predicted noise
        x = sampler.step(eps, t, x, generator)

img2img starts part-way through the same schedule: `sampler.set_begin_index(i)`,
`x = sampler.add_noise(image_latents, noise, sampler.timesteps[i:i + 1])`, then the loop runs over
`sampler.timesteps[i:]`. A sampler counts the steps it has taken itself (`step_index`), so multistep
methods know where they are without the pipeline's help.
"""

import torch

from sd.errors import InputError
from sd.samplers.schedule import NoiseSchedule


def draw_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) noise shaped like `like`, drawn as diffusers' `randn_tensor` draws it: on the generator's
    device, then moved, so that a CPU generator gives the same numbers whatever device runs the model."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


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

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Choose the timesteps of an n-step run and start at the first of them."""
        if not 1 <= num_inference_steps <= self.schedule.num_train_timesteps:
            raise InputError(f"steps must be between 1 and {self.schedule.num_train_timesteps}, "
                             f"got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        self.timesteps = self._make_timesteps(num_inference_steps).to(device)
        self.set_begin_index(0)

    def set_begin_index(self, index: int) -> None:
        """(Re)start the run at `timesteps[index]`, forgetting the history multistep methods keep."""
        self._begin_index = self._step_index = index
        self._reset()

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
        raise NotImplementedError

    def _make_timesteps(self, num_inference_steps: int) -> torch.Tensor:
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
        return self.schedule.leading_timesteps(num_inference_steps)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        alphas_cumprod = self.schedule.alphas_cumprod.to(original.device, original.dtype)
        alpha_bar = alphas_cumprod[timesteps.to(original.device)].reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return alpha_bar**0.5 * original + (1 - alpha_bar) ** 0.5 * noise  # (B, 4, h, w)
