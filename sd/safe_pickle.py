"""Load pickle checkpoints (`.ckpt`, `.pt`) without running any code from the file.

A `.ckpt` is a zip of raw tensor data plus `data.pkl`, a Python pickle. A pickle is a small program:
its GLOBAL opcode imports any `module.name` and REDUCE calls it with arguments from the file, so a
plain `pickle.load` / `torch.load(weights_only=False)` runs `os.system(...)` if the file asks.

PyTorch's own `torch.load(weights_only=True)` allows only the globals that rebuild tensors, but official
Stable Diffusion checkpoints also pickle PyTorch Lightning objects and numpy scalars beside the
weights, which it refuses. So `load_pickle_checkpoint` gives `torch.load` an unpickler that resolves
every global itself (TorchScript archives, which torch.load would hand to torch.jit.load, are refused
first):
- torch's weights_only allowlist and plain builtin types: the real objects;
- anything from a module that can run code or touch the system (os, subprocess, builtins.exec, ...):
  `UnsafeCheckpointError`, raised when the global is read, before anything is called;
- anything else: an inert placeholder class that records its module, name, arguments and state and
  never imports the module.
It also refuses BUILD (set attributes) on a class or function, which would patch torch itself. So
the only code that can run is what torch's weights_only mode trusts. And a pickle cannot make the
loader allocate more than the file could hold: every length the stream gives is refused when larger than
the file's size in bytes: those of the builtin constructors (`bytearray(n)`, `list(range(n))`, ...), of
BYTEARRAY8 (which allocates before it reads), the element count of a storage (which the legacy format
allocates before reading its data) and the shape of a rebuilt tensor (a zero-stride view of a few bytes can
have any shape); the reads of BINBYTES8, BINUNICODE8, LONG4 and FRAME read at most the file's size.
"""

import _compat_pickle
import builtins
import contextvars
import functools
import math
import os
import pickle
import struct
import types
import zipfile

import torch
from torch._weights_only_unpickler import _get_allowed_globals

from sd.errors import CheckpointError, UnsafeCheckpointError, checkpoint_not_found

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)  # how older files start

# Top-level modules whose globals can run code or touch the system; a pickle naming one is refused.
_DANGEROUS_MODULES = frozenset({
    "builtins", "os", "posix", "nt", "posixpath", "ntpath", "sys", "subprocess", "_posixsubprocess",
    "shutil", "tempfile", "glob", "io", "_io", "socket", "ssl", "select", "http", "urllib", "ftplib",
    "smtplib", "telnetlib", "importlib", "pkgutil", "runpy", "zipimport", "pickle", "_pickle",
    "marshal", "shelve", "ctypes", "_ctypes", "cffi", "code", "codeop", "pty", "tty", "webbrowser",
    "types", "inspect", "gc", "operator", "multiprocessing", "threading", "_thread", "asyncio",
    "concurrent", "signal", "resource", "mmap", "pdb", "bdb", "timeit", "trace", "profile",
    "cProfile", "doctest", "pydoc", "platform", "sysconfig", "site", "ensurepip", "pip",
    "setuptools", "distutils", "zipfile", "tarfile",
})
_SAFE_BUILTINS = ("bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset", "int", "list",
                 "object", "range", "set", "slice", "str", "tuple")
_SIZED_BUILTINS = ("bytearray", "bytes", "frozenset", "list", "set", "str", "tuple")  # an int or range sizes them
_file_size: contextvars.ContextVar[int] = contextvars.ContextVar("file_size", default=0)


class _Refused(Exception):
    """The pickle does something it must not; the argument says what, e.g. 'calls posix.system, ...'."""


class _Placeholder:
    """Base of the stand-ins for classes and functions that are not loaded.

    Calling one (REDUCE), NEWOBJ and copyreg._reconstructor give an instance that keeps the
    arguments; BUILD, SETITEMS and APPENDS store the state, dict items and list items. Nothing else.
    """

    module = name = ""

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self.args, self.kwargs, self.state, self.dictitems, self.listitems = args, kwargs, None, {}, []
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.dictitems[key] = value

    def append(self, item):
        self.listitems.append(item)

    def extend(self, items):
        self.listitems.extend(items)

    def __repr__(self):
        return f"<placeholder for {self.module}.{self.name}>"


@functools.cache
def _placeholder(module: str, name: str) -> type:
    """The placeholder class for `module.name`; the same class each time, so it works as a dict key."""
    return type(name, (_Placeholder,), {"module": module, "name": name})


def _reconstructor(cls, base, state):
    """Protocol 0/1 pickles build objects with copyreg._reconstructor; only placeholders come this way."""
    if not (isinstance(cls, type) and issubclass(cls, _Placeholder)):
        raise pickle.UnpicklingError(f"copyreg._reconstructor of {cls!r} is not supported")
    return cls() if state is None else cls(state)


def _check_length(n, what: str) -> None:
    """Refuse a length `n` (of items or bytes) that the stream gives, if larger than the file being loaded."""
    limit = _file_size.get()
    if isinstance(n, int) and n > limit:
        raise _Refused(f"asks for a {what} of {n} items, more than its {limit} bytes could hold")


def _bounded(constructor: type):
    """`constructor`, refusing an int or range argument larger than the file being loaded."""
    def build(*args):
        for arg in args:
            _check_length(len(arg) if isinstance(arg, range) else arg, constructor.__name__)
        return constructor(*args)
    return build


def _bounded_read(read, n: int) -> bytes:
    """`read(n)` of the file, reading at most the file's size (a file object allocates n before it reads):
    a longer read comes back short, which the unpickler reports as a truncated file."""
    return read(min(n, _file_size.get()))


def _is_storage(pid) -> bool:
    """A persistent id ("storage", type, key, location, numel, ...), as torch.save writes for each storage."""
    return isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")


def _bounded_view(rebuild):
    """torch's tensor rebuild `rebuild(storage, offset, size, stride, ...)`, refusing a tensor of more bytes
    than the file: a view of a few stored bytes with zero strides is legal, but as a weight it would be
    materialised (`.contiguous()`, `.to(dtype)`) at its full size."""
    @functools.wraps(rebuild)
    def build(storage, offset, size, *rest):
        limit, numel = _file_size.get(), math.prod(size)
        if numel * storage.dtype.itemsize > limit:
            raise _Refused(f"asks for a tensor of shape {tuple(size)} ({numel} values) from "
                           f"{storage._untyped_storage.nbytes()} stored bytes, more than its {limit} bytes could hold")
        return rebuild(storage, offset, size, *rest)
    return build


_STORAGE_REBUILDS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_qtensor")
_ALLOWED_GLOBALS = {
    **_get_allowed_globals(),
    **{f"torch._utils.{name}": _bounded_view(getattr(torch._utils, name)) for name in _STORAGE_REBUILDS},
    **{f"builtins.{name}": getattr(builtins, name) for name in _SAFE_BUILTINS},
    "copyreg._reconstructor": _reconstructor,
}


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler, so BUILD can be checked
    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        self._file_read = functools.partial(_bounded_read, file.read)  # BINBYTES8, BINUNICODE8, LONG4, FRAME

    def find_class(self, module, name):
        # What pickle.Unpickler.find_class does for Python 2 names (torch.save writes protocol 2).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full_name = f"{module}.{name}"
        if module == "builtins" and name in _SIZED_BUILTINS:
            return _bounded(getattr(builtins, name))
        if full_name in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[full_name]
        if module.split(".")[0] in _DANGEROUS_MODULES:
            raise _Refused(f"calls {full_name}, which would run code")
        return _placeholder(module, name)

    def load_build(self):
        # BUILD sets attributes on the object below it; on a class or function (which a crafted pickle
        # can put there) it would patch torch or collections for the whole process.
        target = self.stack[-2]
        if isinstance(target, (type, types.FunctionType, types.BuiltinFunctionType)):
            raise _Refused(f"rewrites {target.__module__}.{target.__qualname__}, which would change "
                           f"how this program runs")
        super().load_build()

    def load_bytearray8(self):
        # BYTEARRAY8 allocates its length before it reads: a few bytes could ask for gigabytes.
        n, = struct.unpack("<Q", self.read(8))
        _check_length(n, "bytearray")
        self.append(bytearray(self.read(n)))

    def load_binpersid(self):
        # The legacy format allocates a storage's numel elements before it reads their data.
        if _is_storage(self.stack[-1]):
            _check_length(self.stack[-1][4], "storage")
        super().load_binpersid()

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: load_build,
                pickle.BYTEARRAY8[0]: load_bytearray8, pickle.BINPERSID[0]: load_binpersid}


# torch.load wants a pickle module: it subclasses `.Unpickler` (its find_class maps storage types
# itself and calls ours for everything else) and reads the legacy format's headers with `.load`.
_restricted_pickle = types.SimpleNamespace(
    __name__="restricted_pickle",
    Unpickler=_RestrictedUnpickler,
    load=lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load(),
)


def is_torchscript(path: str) -> bool:
    """A zip written by torch.jit.save (it holds constants.pkl), as torch.load tells them apart."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())
    except Exception:  # noqa: BLE001 - a damaged zip (BadZipFile, NotImplementedError, ...): torch.load reports it
        return False


def load_pickle_checkpoint(path, what: str = "checkpoint") -> object:
    """Unpickle a torch checkpoint without running its code: tensors on CPU, memory-mapped from zips.
    `what` the file is, in messages ("checkpoint", "embedding").

    Raises UnsafeCheckpointError if the pickle names a dangerous global or would patch a class or
    function (nothing has run), and CheckpointError if the file is missing, truncated, corrupt or not
    a torch checkpoint.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(LEGACY_MAGIC))
    except FileNotFoundError:
        raise checkpoint_not_found(path) from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror}.") from None
    is_zip = head.startswith(ZIP_MAGIC)  # the legacy format cannot be memory-mapped
    if is_zip and is_torchscript(path):  # torch.load would hand it to torch.jit.load, which runs its code
        raise UnsafeCheckpointError(f"refusing to load {path}: it is a TorchScript archive (torch.jit.save), "
                                    f"a program rather than a {what} of weights.")
    size = _file_size.set(os.path.getsize(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=is_zip, pickle_module=_restricted_pickle)
    except _Refused as e:
        raise UnsafeCheckpointError(f"refusing to load {path}: its pickle {e}. Get the {what} from a "
                                    f"trusted source or convert a trusted copy to .safetensors.") from None
    except Exception as e:
        if not (is_zip or LEGACY_MAGIC.startswith(head)):
            raise CheckpointError(f"{path} is not a PyTorch {what} file: it is neither a zip archive "
                                  f"nor a legacy torch.save file.") from e
        reason = str(e).strip().split("\n")[0].split(". ")[0][:150] or type(e).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({reason}); download it again.") from e
    finally:
        _file_size.reset(size)
