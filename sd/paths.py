"""The one path policy: what may name a file, relative to what.

- A path the user types (--checkpoint, --lora PATH, --image, --output, a --data folder) may be any path, absolute
  or relative to the current folder; it must be valid Unicode (it is printed and written into a PNG's parameters)
  and, for an input, a file this process can read (`readable_file`).
- A name that comes from text (a prompt's <lora:NAME> tag, a PNG's "Model") names a file in one folder only: a
  plain file name, no folder part, no `..` (`plain_name`, `file_in`). A link the user put in that folder (models
  shared between programs) is theirs to follow.
- A file that a folder lists (a dataset's images and captions) must really be inside it, links followed
  (`inside`): its text ends up in a published checkpoint's metadata.
"""

import os
from collections.abc import Iterable
from pathlib import Path

from sd.cli import printable, shown
from sd.errors import InputError, SDError

SEPARATORS = ("/", "\\")  # both, on every system: a PNG made on Windows may hold either


def is_unicode(text: str) -> bool:
    """Whether `text` is valid Unicode (a file name of bytes that are not UTF-8 holds lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_unicode(path: Path | str, flag: str) -> None:
    """Refuse a path that is not valid Unicode: it could be neither printed nor kept in a PNG's parameters."""
    if not is_unicode(str(path)):
        raise InputError(f"{flag} {printable(str(path))} is not valid UTF-8; rename the file (or folder) with UTF-8 "
                         f"characters only")


def readable_file(path: Path, what: str, missing: SDError | None = None) -> Path:
    """`path` if it is a file this process can read; else one `InputError` that names it as `what` (`missing`
    where there is nothing at `path`) and says what to do."""
    try:
        if path.is_dir():
            raise InputError(f"{what} {path} is a folder; give a file")
        if not path.is_file():
            raise missing or InputError(f"{what} not found: {path}; check the path")
        with open(path, "rb"):
            pass
    except PermissionError:
        raise InputError(f"cannot read {what} {path}: permission denied; fix the file's permissions (chmod u+r) "
                         f"or run as a user who may read it") from None
    except OSError as e:  # a name too long, a loop of links, an I/O error
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}; check the path") from None
    return path


def exists(path: Path) -> bool:
    """Whether anything is at `path`; False where the name cannot even be looked up (too long, say)."""
    try:
        return path.exists()
    except OSError:
        return False


def plain_name(name: str, what: str, folder: Path, fix: str) -> str:
    """`name` if it can only name a file inside `folder`: not empty, no folder part, not `.` or `..`; else
    refused, `fix` saying what to do instead."""
    if not name.strip() or name.strip() in (".", "..") or any(s in name for s in SEPARATORS) or "\0" in name:
        raise InputError(f"{what} names {name!r}, which is not a file name in {shown(folder)}/ (no folder part, "
                         f"no '..'); {fix}")
    return name


def inside(path: Path, folder: Path, what: str, fix: str) -> Path:
    """`path` if its real path (symlinks followed) is inside `folder`'s; else refused, `fix` saying what to do."""
    real = path.resolve()
    if not real.is_relative_to(folder.resolve()):
        raise InputError(f"{what}: {shown(path)} is a link to {real}, outside {shown(folder)}/, and is not read; "
                         f"{fix}")
    return path


def file_in(folder: Path, name: str, suffixes: Iterable[str], what: str, fix: str) -> Path | None:
    """The file `name` + the first of `suffixes` that is in `folder`, by the policy above (`plain_name`,
    `readable_file`; `fix`: what to do instead); None if there is none."""
    plain_name(name, what, folder, fix)
    for suffix in suffixes:
        path = folder / f"{name}{suffix}"
        if exists(path) and (path.is_file() or path.is_dir()):
            return readable_file(path, what)
    return None


def writable_output(path: Path, flag: str, suffix: str) -> None:
    """Refuse an output that cannot be written, before any work: not ending in `suffix`, a folder, in a folder
    that is missing or read-only (`writable_folder`)."""
    check_unicode(path, flag)
    try:
        if path.is_dir():
            raise InputError(f"{flag} {path} is a folder; give a file name ending in {suffix}")
        if path.suffix.lower() != suffix:
            raise InputError(f"{flag} {path} must end in {suffix}")
        if not path.parent.is_dir():
            raise InputError(f"output folder {path.parent} does not exist; create it first or choose another {flag}")
    except OSError as e:
        raise InputError(f"cannot write to output folder {path.parent} ({e.strerror}); choose another {flag}") from None
    writable_folder(path.parent, f"the folder of {flag}")


def writable_folder(folder: Path, what: str) -> None:
    """Refuse a folder no file can be created in (tried: permissions alone do not tell, for root or a read-only
    disk). The probe file is created exclusively under a random name, so nothing there is followed or replaced."""
    try:
        probe = folder / f".{os.urandom(8).hex()}.probe"
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write into {what} {folder} ({e.strerror}); choose a folder you can write to") from None
