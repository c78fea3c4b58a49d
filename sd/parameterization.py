"""What the denoiser predicts, and the forward process it is trained on, written once.

Training noises clean latents x0 to timestep t as x_t = alpha x0 + s eps with eps ~ N(0, I), alpha =
sqrt(a_bar_t) and s = sqrt(1 - a_bar_t) (Ho et al., 2020, eq. 4). The network predicts either the noise
eps ("epsilon", SD v1) or the velocity v = alpha eps - s x0 ("v_prediction", Salimans & Ho, 2022,
sec. 4; SD 2.x at 768 px). Both determine x0 and eps from x_t:

    epsilon:       eps = prediction,             x0 = (x_t - s eps) / alpha
    v_prediction:  eps = s x_t + alpha v,        x0 = alpha x_t - s v

The samplers take eps; `to_epsilon` turns any prediction into it, `target` is what training regresses on.
"""

import torch

from sd.errors import InputError

PREDICTION_TYPES = ("epsilon", "v_prediction")

Scales = tuple[torch.Tensor, torch.Tensor]  # (alpha, s), each broadcastable to the latents, e.g. (B, 1, 1, 1)


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(f"unknown prediction type {prediction_type!r}; choose one of: {', '.join(PREDICTION_TYPES)}")
    return prediction_type


def scales(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> Scales:
    """(alpha, s) = (sqrt(a_bar_t), sqrt(1 - a_bar_t)) of integer timesteps t (B,) or (1,), each shaped
    (B, 1, 1, 1) on `like`'s device and dtype."""
    alpha_bar = alphas_cumprod.to(like.device, like.dtype)[t.to(like.device)].reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return alpha_bar**0.5, (1 - alpha_bar) ** 0.5


def noised(x0: torch.Tensor, noise: torch.Tensor, alpha, s) -> torch.Tensor:
    """The forward process: x0 brought to the noise level (alpha, s)."""
    return alpha * x0 + s * noise  # (B, 4, h, w)


def clean_latents(eps: torch.Tensor, x: torch.Tensor, alpha, s) -> torch.Tensor:
    """The clean latents x0 that the noise eps in x = alpha x0 + s eps implies."""
    return (x - s * eps) / alpha


def target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, alpha, s) -> torch.Tensor:
    """What a network of `prediction_type` must predict for x0 noised with `noise` to (alpha, s)."""
    if check_prediction_type(prediction_type) == "epsilon":
        return noise
    return alpha * noise - s * x0  # v


def to_epsilon(prediction_type: str, prediction: torch.Tensor, x: torch.Tensor, alpha, s) -> torch.Tensor:
    """The noise eps that a network of `prediction_type` predicted for the sample x_t = x at (alpha, s)."""
    if check_prediction_type(prediction_type) == "epsilon":
        return prediction
    return s * x + alpha * prediction  # from v
