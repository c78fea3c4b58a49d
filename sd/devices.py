"""The device and number type a run uses, and whether an image of a size can be decoded in the memory free
there: checked before any loading, so that a run that cannot finish does not start."""

import re
from pathlib import Path

import torch

from sd.errors import InputError
from sd.settings import VAE_FACTOR

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Peak memory of SD's VAE decoder, the largest user of memory: about 1100 numbers per output pixel
# (measured: 4.2 kB per pixel in fp32, at 256x256 and 512x512). Attention needs much less: the fused
# kernels of scaled_dot_product_attention never store the (tokens x tokens) matrices (measured on the
# CPU: 8 heads x 16384 tokens x batch 2, whose 17 GB of matrices left the peak under 0.4 GB).
DECODER_NUMBERS_PER_PIXEL = 1100
TILED_DECODE_PIXELS = (64 * VAE_FACTOR) ** 2  # one tile of AutoencoderKL.decode_tiled's default 64 latents


def pick_device(name: str | None) -> torch.device:
    """The device asked for, if this machine has it; by default cuda, else mps, else cpu."""
    available = ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    available += ["mps"] if torch.backends.mps.is_available() else []
    if name is None:
        return torch.device("cuda" if "cuda:0" in available else "mps" if "mps" in available else "cpu")
    try:
        device = torch.device(name)
        key = f"cuda:{device.index or 0}" if device.type == "cuda" else device.type
    except RuntimeError:
        key = None
    if key not in available:
        raise InputError(f"device {name!r} is unknown or not available on this machine; use one of: "
                         f"{', '.join(available)}")
    return device


def pick_dtype(name: str | None, device: torch.device) -> str:
    """The --dtype asked for; by default fp32 on the CPU, fp16 elsewhere."""
    if name == "fp16" and device.type == "cpu":
        raise InputError("fp16 is slow and inaccurate on the CPU; use --dtype bf16 or fp32")
    return name or ("fp32" if device.type == "cpu" else "fp16")


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device`: CUDA's free memory, else the system's MemAvailable (Linux); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return int(re.search(r"^MemAvailable:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)[1]) * 1024
    except (OSError, TypeError):
        return None


def check_memory(width: int, height: int, device: torch.device, dtype: torch.dtype, tiled: bool) -> None:
    """Refuse a size whose decoding cannot fit in the free memory (estimate: DECODER_NUMBERS_PER_PIXEL;
    a tiled decode needs that of one tile, TILED_DECODE_PIXELS)."""
    pixels = min(width * height, TILED_DECODE_PIXELS) if tiled else width * height
    need, free = DECODER_NUMBERS_PER_PIXEL * pixels * dtype.itemsize, free_memory(device)
    if free is not None and need > free:
        raise InputError(f"{width}x{height} needs about {need / 2**30:.1f} GiB to decode but {device.type} has "
                         f"{free / 2**30:.1f} GiB free; lower --width and --height"
                         f"{'' if tiled else ', or add --tiled-decode'}")
