"""Where the project's files are, and writing files so that a crash, a full disk or Ctrl-C never leaves a
half-written one behind."""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

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
