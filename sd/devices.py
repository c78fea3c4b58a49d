"""The device and number type a run uses, and whether an image of a size can be decoded in the memory this
process may still use there (`memory_budget`): checked before any loading, so that a run that cannot finish
does not start."""

import re
import resource
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
    except (RuntimeError, TypeError, ValueError):  # not a device's name at all
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


CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2, then v1
                ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def kilobytes(path: str, key: str) -> int | None:
    """The "key: N kB" line of a /proc file, in bytes; None if unknown."""
    try:
        return int(re.search(rf"^{key}:\s*(\d+) kB", Path(path).read_text(), re.M)[1]) * 1024
    except (OSError, TypeError):
        return None


def address_space_left() -> int | None:
    """RLIMIT_AS (ulimit -v) minus what this process already maps; None without a limit."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    mapped = kilobytes("/proc/self/status", "VmSize")
    return None if limit == resource.RLIM_INFINITY or mapped is None else max(limit - mapped, 0)


def cgroup_left() -> int | None:
    """The memory cgroup's limit minus its usage; None without a limit."""
    for limit_file, usage_file in CGROUP_FILES:
        try:
            limit, usage = (int(Path(name).read_text()) for name in (limit_file, usage_file))
        except (OSError, ValueError):  # absent, or "max": no limit
            continue
        return max(limit - usage, 0)
    return None


def memory_budget(device: torch.device) -> int | None:
    """Bytes this process can still allocate on `device`: CUDA's free memory; on the CPU the smallest of the
    system's MemAvailable, RLIMIT_AS minus what the process maps, and the cgroup's limit minus its usage.
    None if none is known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    known = [n for n in (kilobytes("/proc/meminfo", "MemAvailable"), address_space_left(), cgroup_left())
             if n is not None]
    return min(known, default=None)


def check_memory(width: int, height: int, device: torch.device, dtype: torch.dtype, tiled: bool,
                 images: int = 1) -> None:
    """Refuse a size whose decoding of `images` images at once cannot fit in `memory_budget` (estimate:
    DECODER_NUMBERS_PER_PIXEL; a tiled decode needs that of one tile, TILED_DECODE_PIXELS)."""
    pixels = min(width * height, TILED_DECODE_PIXELS) if tiled else width * height
    need, free = DECODER_NUMBERS_PER_PIXEL * pixels * images * dtype.itemsize, memory_budget(device)
    if free is not None and need > free:
        count = f"{images} images of " if images > 1 else ""
        raise InputError(f"{count}{width}x{height} needs about {need / 2**30:.1f} GiB to decode but {device.type} has "
                         f"{free / 2**30:.1f} GiB free for this process; lower --width and --height"
                         f"{', or make fewer images at once' * (images > 1)}{'' if tiled else ', or add --tiled-decode'}")
