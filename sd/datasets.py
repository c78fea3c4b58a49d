"""Training data: the captioned-shapes set generated in code, and folders of captioned images.

Captioned shapes: one shape (circle, square, triangle, star, heart) in one of 8 colours, small or
large, at one of 5 positions, on a plain background of another colour or gray. Captions follow

    a [small|large] COLOUR SHAPE [in the top left|...|in the center] [on a COLOUR background]

(optional parts in brackets) or one of a few paraphrases of it. Five colour-shape pairs are never
drawn (`HELD_OUT`), so that a trained model can be tested on combinations it never saw. Sample i of
seed s is a pure function of (s, i): the set is endless, and a run that resumes at step k draws
exactly what an uninterrupted run would.

Caption folders: `name.png` (or .jpg, .jpeg, .webp) beside `name.txt`, the convention of common
fine-tuning tools; images are centre-cropped to a square and resized.
"""

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sd.errors import InputError
from sd.paths import inside, readable_file

COLOURS = {
    "red": (220, 30, 30), "orange": (255, 140, 0), "yellow": (250, 225, 30), "green": (30, 160, 50),
    "blue": (30, 70, 230), "purple": (150, 50, 200), "white": (250, 250, 250), "black": (15, 15, 15),
}
BACKGROUNDS = {**COLOURS, "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "star", "heart")
NEW_SHAPES = ("cross",)  # drawn, never in the data: what the fine-tuning benchmark teaches the tiny model
SIZES = {"small": 0.28, "large": 0.5}  # side of the shape's box, as a fraction of the image's
POSITIONS = {  # centre of the shape, as fractions of the image's width and height
    "top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
HELD_OUT = frozenset({("red", "star"), ("green", "triangle"), ("blue", "heart"), ("yellow", "square"),
                      ("purple", "circle")})
JITTER = 0.03  # positions move up to this fraction of the image each way; sizes up to 3 times it
OPTIONAL_PART = 0.8  # chance that a caption names the size, the position, the background (each)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_CAPTION_BYTES = 64 * 1024  # a longer caption file is refused before it reaches the tokenizer


@dataclass(frozen=True)
class Scene:
    """What one captioned-shapes image shows."""

    shape: str
    colour: str
    size: str
    position: str
    background: str


def shape_outline(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]]:
    """The outline of `shape` centred at (cx, cy) inside a box `side` wide, as polygon points."""
    r = side / 2
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "circle":
        angles = [2 * math.pi * k / 64 for k in range(64)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
    if shape == "triangle":  # pointing up, filling the box
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":  # five points, the first straight up; inner radius 0.45 of the outer
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        return [(cx + rr * math.sin(math.pi * k / 5), cy + 0.1 * r - rr * math.cos(math.pi * k / 5))
                for k, rr in enumerate(radii)]
    if shape == "cross":  # a plus sign, its arms a third of the box wide
        t = r / 3
        quarter = [(t, -r), (t, -t), (r, -t)]  # the top arm's right edge round to the right arm's top edge
        turns = [(1, 0, 0, 1), (0, -1, 1, 0), (-1, 0, 0, -1), (0, 1, -1, 0)]  # turned by 0, 90, 180, 270 degrees
        return [(cx + a * x + b * y, cy + c * x + d * y) for a, b, c, d in turns for x, y in quarter]
    if shape == "heart":  # the classic parametric heart, scaled to the box
        ts = [2 * math.pi * k / 64 for k in range(64)]
        points = [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                            - math.cos(4 * t))) for t in ts]  # x in [-16, 16], y in [-12, 17]
        return [(cx + r * x / 16, cy + r * (y - 2.5) / 14.5) for x, y in points]
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int, jitter: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Image.Image:
    """The scene as a size x size RGB image, drawn 4x larger and downsampled (anti-aliased edges).
    `jitter`: (dx, dy, dscale), offsets in fractions of the image and a relative change of size."""
    big = 4 * size
    fx, fy = POSITIONS[scene.position]
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    outline = shape_outline(scene.shape, (fx + jitter[0]) * big, (fy + jitter[1]) * big,
                            SIZES[scene.size] * (1 + jitter[2]) * big)
    ImageDraw.Draw(image).polygon(outline, fill=COLOURS[scene.colour])
    return image.resize((size, size), Image.BOX)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: random.Random) -> str:
    """One caption of the scene: the grammar above, or one of its paraphrases; the size, the position
    and the background are each named with probability OPTIONAL_PART."""
    size = scene.size if rng.random() < OPTIONAL_PART else None
    position = scene.position if rng.random() < OPTIONAL_PART else None
    background = scene.background if rng.random() < OPTIONAL_PART else None
    noun = " ".join(filter(None, (size, scene.colour, scene.shape)))
    where = f"in the {position}" if position else ""
    on = f"on {article(background)} {background} background" if background else ""
    template = rng.choice(("{a} {noun} {where} {on}", "{a} {noun} {where} {on}", "{a} {noun} {on} {where}",
                           "a picture of {a} {noun} {where} {on}", "{noun} {where} {on}",
                           "there is {a} {noun} {where} {on}"))
    return " ".join(template.format(a=article(noun), noun=noun, where=where, on=on).split())


def vocabulary() -> list[str]:
    """Every word the captions use, sorted."""
    words = {"a", "an", "picture", "of", "in", "the", "on", "background", "there", "is", *SIZES, *BACKGROUNDS,
             *SHAPES, *(w for p in POSITIONS for w in p.split())}
    return sorted(words)


class CaptionedShapes:
    """The endless captioned-shapes set: `sample(i)` is (image, caption, scene), the same for the same
    seed and index."""

    def __init__(self, image_size: int = 64, seed: int = 0):
        self.image_size = image_size
        self.seed = seed
        self.pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT]

    def scene(self, rng: random.Random) -> Scene:
        colour, shape = rng.choice(self.pairs)
        background = rng.choice([b for b in BACKGROUNDS if b != colour])
        return Scene(shape, colour, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)), background)

    def sample(self, index: int) -> tuple[Image.Image, str, Scene]:
        rng = random.Random(self.seed * 1_000_003 + index)
        scene = self.scene(rng)
        jitter = (rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER), rng.uniform(-3 * JITTER, 3 * JITTER))
        return render(scene, self.image_size, jitter), caption(scene, rng), scene

    def caption_of(self, scene: Scene, index: int) -> str:
        """A fresh caption of a scene seen before (a caption is drawn anew each time an image is reused)."""
        return caption(scene, random.Random(self.seed * 1_000_003 + index))


class CaptionFolder:
    """Images with captions from a folder: `name.png` + `name.txt`. Every problem is an `InputError`
    naming the file."""

    def __init__(self, folder: str | Path, image_size: int):
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"dataset folder {folder} not found; give a folder of images with captions "
                             f"(name.png beside name.txt)")
        self.folder = folder
        self.image_size = image_size
        self.images = sorted(own_file(p, folder, "image") for p in folder.iterdir()
                             if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.images:
            raise InputError(f"dataset folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); put "
                             f"name.png beside name.txt for each")
        self.captions = [self.read_caption(p) for p in self.images]

    def read_caption(self, image: Path) -> str:
        path = image.with_suffix(".txt")
        return read_caption(path, self.folder, InputError(f"caption {path} not found for image {image}; write the "
                                                          f"caption into {path.name}"))

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, index: int) -> tuple[Image.Image, str, None]:
        image = open_image(self.images[index % len(self.images)])
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((self.image_size,) * 2, Image.LANCZOS)
        return image, self.captions[index % len(self.images)], None


def own_file(path: Path, folder: Path, what: str, missing: InputError | None = None) -> Path:
    """`path`, a readable file whose real path is inside `folder`: a link out of it is refused, so that nothing
    from elsewhere ends up in the trained model or its metadata."""
    return inside(readable_file(path, what, missing), folder, f"{what} of dataset folder {folder}",
                  "copy the file into the folder")


def read_caption(path: Path, folder: Path, missing: InputError | None = None) -> str:
    """The caption file `path` of dataset folder `folder` (`own_file`), its whitespace runs made single spaces;
    `missing`: the error where there is none."""
    own_file(path, folder, "caption", missing)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CAPTION_BYTES + 1)  # bounded: a caption is a line, not a book
        if len(raw) > MAX_CAPTION_BYTES:
            raise InputError(f"caption {path} is over {MAX_CAPTION_BYTES // 1024} kB; a caption is a short text "
                             f"(CLIP reads its first 75 tokens): shorten it")
        return " ".join(raw.decode("utf-8").split())
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read caption {path}: {e}; save it as UTF-8 text") from None


def unreadable_image(path: Path, error: Exception) -> InputError:
    return InputError(f"cannot read image {path}: {error}; replace or remove it")


IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)  # what PIL raises on a file that is no image


def open_image(path: Path) -> Image.Image:
    """The image file `path` as RGB; an `InputError` naming it if it cannot be read."""
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except IMAGE_ERRORS as e:
        raise unreadable_image(path, e) from None


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image file `path`, from its header (nothing decoded)."""
    try:
        with Image.open(path) as opened:
            return opened.size
    except IMAGE_ERRORS as e:
        raise unreadable_image(path, e) from None


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images -> (B, 3, H, W) float32 in [-1, 1]."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0  # (B, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
