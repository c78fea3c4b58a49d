"""Where the project's files are, writing files so that a crash, a full disk or Ctrl-C never leaves a
half-written one behind, and writing .safetensors files one tensor at a time."""

import json
import os
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from sd.errors import InputError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # tokenizer files, the tiny model, official checkpoints


def write_atomically(path: Path, write: Callable[[Path], None], overwrite: bool = True) -> None:
    """`write(tmp)` to a temporary file beside `path`, then give it the name `path` in one step. The file gets
    the usual permissions (umask), whatever the writer chose; the temporary file never outlives the call.
    Without `overwrite` the name is claimed by a hard link, which fails with FileExistsError if anything
    has the name by then (created during the write, say), so nothing is ever replaced. The temporary file is
    created exclusively under a random name (`mkstemp`: O_CREAT | O_EXCL), so a file or link planted beside
    `path` is never written through."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64",
                      torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint64: "U64",
                      torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL"}


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's values as a .safetensors file holds them: contiguous, in its dtype, little-endian."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """The safetensors format (an 8-byte header length, a JSON header of dtypes, shapes and offsets, the data)
    written one tensor at a time: safetensors' own `save_file` builds the whole file in memory first, twice the
    14 GB of an fp32 SDXL file. Tensors may share memory (each is written out whole)."""
    header, start = {}, 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for key, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise InputError(f"{key} is a {str(tensor.dtype).removeprefix('torch.')} tensor, which a .safetensors "
                             f"file cannot hold; convert it to one of "
                             f"{', '.join(str(d).removeprefix('torch.') for d in SAFETENSORS_DTYPES)}")
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [start, start + size]}
        start += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for tensor in tensors.values():
            f.write(tensor_bytes(tensor))
