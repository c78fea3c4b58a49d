"""The one check of the tensors that files hand us (checkpoints, LoRAs, embeddings), before anything is built
or merged from them: what they are (a CPU tensor with values, dense, not complex) and what they hold
(floating-point numbers, of a rank and size that can be weights, finite, and no larger than float16 can
hold: every Stable Diffusion file is shared in float16, so a larger value is damage, not a weight).

`structure_fault` and `value_fault` say what is wrong in a few words, or None; `check_tensors` refuses a
file's first bad tensor in one line naming the file and the key.
"""

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from sd.errors import CheckpointError, SDError

MAX_MAGNITUDE = torch.finfo(torch.float16).max  # 65504
_REDUCIBLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # aminmax runs on these as they are


def structure_fault(tensor) -> str | None:
    """Why `tensor` is no tensor of values at all (not a tensor, on the meta device, sparse, complex), or None."""
    if not isinstance(tensor, torch.Tensor):
        return f"is a {type(tensor).__name__}, not a tensor"
    if tensor.device.type != "cpu":
        return f"is a tensor on the {tensor.device.type} device, which holds no values as files store them"
    if tensor.layout != torch.strided:
        return f"is a {str(tensor.layout).removeprefix('torch.')} tensor, which holds no weights as files store them"
    if tensor.is_complex():
        return f"holds complex numbers ({str(tensor.dtype).removeprefix('torch.')})"
    return None


def value_fault(tensor: torch.Tensor, min_dim: int = 1) -> str | None:
    """Why the values of a (structurally sound) tensor cannot be weights: not floating point, fewer than
    `min_dim` dimensions, no values, NaN, inf or beyond MAX_MAGNITUDE; or None."""
    if not tensor.is_floating_point():
        return f"holds {str(tensor.dtype).removeprefix('torch.')} numbers where weights are floating point"
    if tensor.dim() < min_dim or tensor.numel() == 0:
        return f"has shape {tuple(tensor.shape)}, which holds no weights" if tensor.numel() == 0 else \
            f"is {tensor.dim()}-d (shape {tuple(tensor.shape)}) where weights have at least {min_dim} dimensions"
    low, high = torch.aminmax(tensor if tensor.dtype in _REDUCIBLE else tensor.float())
    largest = max(-float(low), float(high))
    if largest != largest:
        return "holds NaN values"
    if largest > MAX_MAGNITUDE:
        return ("holds inf values" if largest == float("inf") else
                f"holds values as large as {largest:.3g}, beyond any weight (at most {MAX_MAGNITUDE:g})")
    return None


def tensor_fault(tensor, min_dim: int = 1) -> str | None:
    """`structure_fault`, else `value_fault`."""
    return structure_fault(tensor) or value_fault(tensor, min_dim)


def check_tensors(path: Path, tensors: Mapping[str, object], what: str, fault: Callable[[object], str | None] = tensor_fault,
                  named: Callable[[str], str] = str, error: type[SDError] = CheckpointError) -> None:
    """Refuse the first of `tensors` (by key) with a `fault`, naming the file, the key (as `named` spells it)
    and what to do; `what` the file is, in the message ("checkpoint", "LoRA", "embedding")."""
    for key, tensor in tensors.items():
        problem = fault(tensor)
        if problem:
            raise error(f"{path}: {named(key)} {problem}; the {what} is damaged or not a Stable Diffusion {what}: "
                        f"get a trusted copy")
