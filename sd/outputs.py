"""Where a run's images go: their file names, checked before any work is done, and each PNG written whole
(`sd.files.write_atomically`) with its "parameters" text, never over an existing file unless asked to."""

import itertools
import time
from pathlib import Path

from PIL import Image, PngImagePlugin

from sd.cli import note
from sd.errors import InputError
from sd.files import write_atomically
from sd.paths import writable_output
from sd.parameters import TEXT_CHUNK

DEFAULT_FOLDER = Path("outputs")


def default_output() -> Path:
    """outputs/<date>-<time>.png"""
    return DEFAULT_FOLDER / f"{time.strftime('%Y%m%d-%H%M%S')}.png"


def check_output(path: Path, is_default: bool) -> None:
    """Refuse an output that cannot be written, before any work is done (`sd.paths.writable_output`); the
    default folder is made."""
    if is_default:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot make the output folder {path.parent} ({e.strerror}); pass --output") from None
    writable_output(path, "--output", ".png")


def numbered(path: Path, k: int) -> Path:
    return path.with_name(f"{path.stem}-{k}{path.suffix}")


def output_paths(output: Path, n: int, overwrite: bool) -> list[Path]:
    """`output`, or NAME-1.png ... NAME-n.png for several images. Without `overwrite`, names already taken
    are skipped for the next free numbered ones, with a note."""
    wanted = [output] if n == 1 else [numbered(output, k) for k in range(1, n + 1)]
    taken = [p for p in wanted if p.exists()]
    if overwrite or not taken:
        return wanted
    paths = list(itertools.islice((p for k in itertools.count(1) if not (p := numbered(output, k)).exists()), n))
    note(f"{', '.join(map(str, taken))} exist{'s' * (len(taken) == 1)}; writing {', '.join(map(str, paths))} "
         f"instead (--overwrite replaces)")
    return paths


def write_png(image: Image.Image, path: Path, parameters: str, overwrite: bool) -> Path:
    """Write the PNG; without `overwrite`, under the next free numbered name if `path` was taken meanwhile
    (by another run, say). Returns the path written."""
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_CHUNK, parameters)  # as iTXt (UTF-8) when the text is not Latin-1
    for candidate in itertools.chain([path], (numbered(path, k) for k in itertools.count(1))):
        try:
            write_atomically(candidate, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), overwrite)
            if candidate != path:
                note(f"{path} appeared while the image was made; wrote {candidate} instead (--overwrite replaces)")
            return candidate
        except FileExistsError:
            continue
