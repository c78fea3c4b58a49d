"""PLMS, the pseudo linear multistep sampler of PNDM (Liu et al., 2022, "Pseudo Numerical Methods for
Diffusion Models on Manifolds"), as CompVis' `plms.py` and diffusers' PNDMScheduler(skip_prk_steps=True).

Every step moves x from t to t_prev = t - T//n with the "pseudo" transfer of eq. 9, the DDIM step
written in eps. The eps it uses is a linear multistep (Adams-Bashforth) combination of the model's
last predictions, of order 2 to 4 as history builds up. The very first step has no history: it is a
pseudo improved-Euler step instead, which evaluates the model twice (at t, then at t_prev on the
result) and redoes the step from t with the mean of both. So the timesteps repeat their second
entry, [t_0, t_1, t_1, t_2, ...], and the run makes n + 1 model calls.

Like diffusers, the step reads its transfer from t itself and counts calls since the run began; an
img2img run that begins after the repeated entry starts the first-step pair one timestep late.
"""

import torch

from sd.samplers.base import AlphaSampler

# Adams-Bashforth weights by order: numerators for the newest, second newest, ... eps, and denominator.
ADAMS_BASHFORTH = {2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


class PLMSSampler(AlphaSampler):
    def _make_timesteps(self, num_inference_steps):
        timesteps = super()._make_timesteps(num_inference_steps)  # (n,) descending
        return torch.cat([timesteps[:1], timesteps[1:2], timesteps[1:]])  # (n + 1,)

    def _reset(self):
        self._eps_history = []  # eps at the start of each step, newest last
        self._first_x = None  # x where the run began, for the redo of the first step

    def _step(self, eps, t, x, i, generator):
        t = int(t)
        stride = self.schedule.num_train_timesteps // self.num_inference_steps
        calls = i - self._begin_index
        if calls == 0:  # pseudo improved Euler, part 1: an Euler step with eps(x_t, t)
            self._eps_history.append(eps)
            self._first_x = x
            return self._transfer(x, t, t - stride, eps)
        if calls == 1:  # part 2: redo the step from the start with the mean of both eps
            x, self._first_x = self._first_x, None
            return self._transfer(x, t + stride, t, (eps + self._eps_history[-1]) / 2)
        self._eps_history = [*self._eps_history[-3:], eps]
        numerators, denominator = ADAMS_BASHFORTH[len(self._eps_history)]
        eps = sum(n * e for n, e in zip(numerators, reversed(self._eps_history))) / denominator
        return self._transfer(x, t, t - stride, eps)

    def _transfer(self, x, t, t_prev, eps):
        """PNDM's eq. 9 from t to t_prev (equal to a deterministic DDIM step)."""
        a, a_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        eps_denominator = a * (1 - a_prev) ** 0.5 + (a * (1 - a) * a_prev) ** 0.5
        return (a_prev / a) ** 0.5 * x - (a_prev - a) * eps / eps_denominator  # (B, 4, h, w)
