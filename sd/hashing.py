"""SHA-256 of files, by which AUTOMATIC1111 names models, embeddings and LoRAs ("Model hash", "TI hashes",
"Lora hashes"): one helper, optionally cached beside the file, so that a checkpoint of gigabytes is hashed once."""

import hashlib
import re
from pathlib import Path

from sd.files import write_atomically

MODEL_HASH_DIGITS = 10  # AUTOMATIC1111's "Model hash" is the first 10 hex digits of the SHA-256
SHORT_HASH_DIGITS = 12  # and "TI hashes", "Lora hashes" the first 12


def file_sha256(path: Path, cache: bool = False) -> str:
    """The file's SHA-256 in hex. With `cache`, the digest is kept beside the file in NAME.sha256 (sha256sum's
    format, so `sha256sum -c` checks it) and reused while that is newer than the file's last change (its ctime).
    The cache is only ever created, never replaced: a NAME.sha256 that is there already (the user's own, say) is
    left as it is, and a stale one means hashing again each time, until it is deleted."""
    sidecar = path.with_name(path.name + ".sha256")
    if cache and (digest := cached_digest(path, sidecar)):
        return digest
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if cache:
        try:
            write_atomically(sidecar, lambda tmp: tmp.write_text(f"{digest}  {path.name}\n"), overwrite=False)
        except OSError:
            pass  # there already, or a read-only folder: hash again next time
    return digest


def cached_digest(path: Path, sidecar: Path) -> str | None:
    """The digest in `sidecar` if it is current for `path` and one line of sha256sum's format naming it, else None."""
    try:
        stat = sidecar.stat()
        if sidecar.is_file() and stat.st_size <= 4096 and stat.st_mtime_ns >= path.stat().st_ctime_ns:
            line = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)\n?", sidecar.read_text(encoding="utf-8"))
            if line and line[2] == path.name:
                return line[1]
    except (OSError, UnicodeDecodeError):
        pass
    return None


def model_hash(path: Path) -> str:
    """AUTOMATIC1111's "Model hash" of a checkpoint: the start of its cached SHA-256."""
    return file_sha256(path, cache=True)[:MODEL_HASH_DIGITS]
