"""DDIM (Song et al., 2020, "Denoising Diffusion Implicit Models"), the sampler of the original SD release.

A non-Markovian process with the same marginals as DDPM lets a step jump straight from t to t_prev
(eq. 12): with a = a_bar_t and a_prev = a_bar_{t_prev},

    x0     = (x_t - sqrt(1 - a) eps) / sqrt(a)
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z,   z ~ N(0, I)
    s      = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev)                    (eq. 16)

eta = 0 gives the deterministic DDIM sampler (an ODE solver, good in 20-50 steps); eta = 1 is DDPM.
"""

from sd.parameterization import clean_latents, noised
from sd.samplers.base import AlphaSampler, draw_noise
from sd.samplers.schedule import NoiseSchedule


class DDIMSampler(AlphaSampler):
    def __init__(self, schedule: NoiseSchedule | None = None, *, eta: float = 0.0):
        super().__init__(schedule)
        self.eta = eta

    def _step(self, eps, t, x, i, generator):
        t = int(t)
        t_prev = t - self.schedule.num_train_timesteps // self.num_inference_steps
        a, a_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        x0 = clean_latents(eps, x, a**0.5, (1 - a) ** 0.5)  # (B, 4, h, w)
        variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        s = self.eta * variance**0.5
        x_prev = a_prev**0.5 * x0 + (1 - a_prev - s**2) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + s * draw_noise(eps, generator)
        return x_prev


class DDIMInverseSampler(AlphaSampler):
    """DDIM run backwards (inversion, Song et al. sec. 4.3; Mokady et al., 2022): from clean latents up the
    same timesteps in rising order, each step the DDIM update from t - T/n to t with the noise predicted
    at t, so that DDIM sampling from the result comes back near the start. Not a sampler for images."""

    def _make_timesteps(self, num_inference_steps):
        return self.schedule.integer_timesteps(num_inference_steps).flip(0)  # (n,) rising

    def _start_of_step(self, t: int) -> int:
        """The timestep t - T/n the step to t starts from, where the sample is."""
        steps = self.schedule.num_train_timesteps
        return min(t - steps // self.num_inference_steps, steps - 1)

    def input_scales(self, t, like):
        a_from = self.alpha_bar(self._start_of_step(int(t))).to(like.device, like.dtype)
        return a_from**0.5, (1 - a_from) ** 0.5

    def _step(self, eps, t, x, i, generator):
        t = int(t)
        a_from, a_to = self.alpha_bar(self._start_of_step(t)), self.alpha_bar(t)
        x0 = clean_latents(eps, x, a_from**0.5, (1 - a_from) ** 0.5)  # (B, 4, h, w)
        return noised(x0, eps, a_to**0.5, (1 - a_to) ** 0.5)
