"""A small deterministic reader of captioned-shapes images, to test what a trained model draws.

`read(image)` says which background, colour, shape, size and position an image shows, by plain
image analysis that knows nothing of the model:
- background: the median colour of the image's border, nearest in `BACKGROUNDS`;
- the shape: the largest connected region of pixels far from the background colour; its colour is
  the median of the region's inner pixels, and the region is then redrawn as the pixels more than
  halfway from the background colour to it (so that blur neither fattens nor thins the silhouette);
- colour: that median colour, nearest in `COLOURS`;
- position: its centroid, nearest of the 5 `POSITIONS`; size: its width against the two `SIZES`;
- shape: its silhouette, cropped to its bounding box and resized to 32x32, against the same of each
  shape drawn by `shape_outline`, by intersection over union.
`tests/test_shapes_checker.py` validates it on rendered ground truth before any test relies on it.
"""

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from sd.datasets import (BACKGROUNDS, COLOURS, HELD_OUT, NEW_SHAPES, POSITIONS, SHAPES, SIZES, Scene, article,
                         shape_outline)

TEMPLATE = 32  # silhouettes are compared at this size
FOREGROUND_DISTANCE = 80.0  # RGB distance from the background above which a pixel is foreground


@dataclass(frozen=True)
class Reading:
    """What the checker sees; `found` is False when no foreground region stands out."""

    found: bool
    background: str
    colour: str = ""
    shape: str = ""
    size: str = ""
    position: str = ""
    shape_iou: float = 0.0

    def matches(self, scene: Scene, parts: tuple[str, ...] = ("colour", "shape", "position")) -> dict[str, bool]:
        return {part: self.found and getattr(self, part) == getattr(scene, part) for part in parts}


def nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.array([palette[n] for n in names], dtype=np.float32) - rgb, axis=1)
    return names[int(distances.argmin())]


def silhouette(mask: np.ndarray) -> np.ndarray:
    """A boolean mask cropped to its bounding box and resized to TEMPLATE x TEMPLATE."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    resized = Image.fromarray(crop.astype(np.uint8) * 255).resize((TEMPLATE, TEMPLATE), Image.BILINEAR)
    return np.asarray(resized) >= 128


def templates() -> dict[str, np.ndarray]:
    big = 256
    out = {}
    for shape in SHAPES + NEW_SHAPES:
        canvas = Image.new("L", (big, big), 0)
        ImageDraw.Draw(canvas).polygon(shape_outline(shape, big / 2, big / 2, big * 0.8), fill=255)
        out[shape] = silhouette(np.asarray(canvas) >= 128)
    return out


TEMPLATES = templates()


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (all False if there is none)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    return labels == 1 + int(np.argmax(ndimage.sum(mask, labels, range(1, count + 1))))


def read(image: Image.Image | np.ndarray, shapes: tuple[str, ...] = SHAPES) -> Reading:
    """What `image` shows; its shape the best of `shapes` (SHAPES + NEW_SHAPES to read what fine-tuning taught)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    h, w, _ = pixels.shape
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)
    background = nearest(background_rgb, BACKGROUNDS)
    foreground = np.linalg.norm(pixels - background_rgb, axis=2) > FOREGROUND_DISTANCE  # (H, W)
    region = largest_region(foreground)
    if region.sum() < 9:
        return Reading(False, background)
    inner = ndimage.binary_erosion(region)
    colour_rgb = np.median(pixels[inner if inner.sum() >= 4 else region], axis=0)
    colour = nearest(colour_rgb, COLOURS)
    direction = colour_rgb - background_rgb
    halfway = (pixels - background_rgb) @ direction / max(float(direction @ direction), 1e-6) > 0.5  # (H, W)
    region = largest_region(halfway & ndimage.binary_dilation(region, iterations=2))
    if region.sum() < 9:
        return Reading(False, background)
    ys, xs = np.nonzero(region)
    centre = np.array([xs.mean() / w, ys.mean() / h])
    position = min(POSITIONS, key=lambda p: float(np.linalg.norm(np.array(POSITIONS[p]) - centre)))
    width = (xs.max() - xs.min() + 1) / w
    size = min(SIZES, key=lambda s: abs(SIZES[s] - width))
    shape_mask = silhouette(region)
    ious = {s: float((shape_mask & TEMPLATES[s]).sum() / (shape_mask | TEMPLATES[s]).sum()) for s in shapes}
    shape = max(ious, key=ious.get)
    return Reading(True, background, colour, shape, size, position, ious[shape])


# ---- measuring a model ---------------------------------------------------------------------------

def prompt_of(scene: Scene) -> str:
    """The caption grammar with every optional part."""
    return (f"{article(scene.size)} {scene.size} {scene.colour} {scene.shape} in the {scene.position} on "
            f"{article(scene.background)} {scene.background} background")


def scenes(n: int, held_out: bool, seed: int = 0) -> list[Scene]:
    """n scenes of seen (or of held-out) colour-shape pairs, seeded."""
    rng = random.Random(seed)
    pairs = sorted(HELD_OUT) if held_out else [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT]
    out = []
    for _ in range(n):
        colour, shape = rng.choice(pairs)
        out.append(Scene(shape, colour, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)),
                         rng.choice([b for b in BACKGROUNDS if b != colour])))
    return out


def generations(pipe, scene_list: list[Scene], seed: int = 0, batch: int = 50, prompt=prompt_of,
                **options) -> list[Image.Image]:
    """One image per scene from `prompt(scene)`, in batches of `batch` seeded seed + first index."""
    images = []
    for start in range(0, len(scene_list), batch):
        chunk = scene_list[start:start + batch]
        images += pipe.text_to_image([prompt(s) for s in chunk], seed=seed + start, progress=False, **options)
    return images


def adherence(pipe, scene_list: list[Scene], seed: int = 0, batch: int = 50, shapes=SHAPES, prompt=prompt_of,
              **options) -> dict[str, float]:
    """The share of `generations` whose colour, shape (the best of `shapes`), position, colour and position, and
    all three match their scene."""
    return score(generations(pipe, scene_list, seed, batch, prompt, **options), scene_list, shapes)


def score(images: list[Image.Image], scene_list: list[Scene], shapes=SHAPES) -> dict[str, float]:
    """The share of images whose colour, shape, position, colour and position, and all three match their scene."""
    hits = {"colour": 0, "shape": 0, "position": 0, "colour+position": 0, "all": 0}
    for image, scene in zip(images, scene_list):
        match = read(image, shapes).matches(scene)
        for part, ok in match.items():
            hits[part] += ok
        hits["colour+position"] += match["colour"] and match["position"]
        hits["all"] += all(match.values())
    return {part: count / len(scene_list) for part, count in hits.items()}
