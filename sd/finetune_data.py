"""Fine-tuning data as users of kohya's sd-scripts prepare it: folders, repeats, aspect-ratio buckets, captions.

Folders (kohya's DreamBooth convention): `--data ROOT` holds subfolders named `<repeats>_<class caption>`,
e.g. `10_sks dog`: each image in it is seen 10 times an epoch, captioned by its caption file (`name.txt`,
the extension configurable) or else by the folder's caption, "sks dog" (everything after the first "_").
A ROOT of images and no subfolders is one set: repeats 1, every image with its caption file. Hidden
entries (names starting with ".") are not read; folders inside a `<repeats>_<caption>` folder neither (kohya
reads one level). Where kohya skips a folder it cannot parse with a warning, here it is refused: a folder
trained on silently less than it holds is worse than an error.

Class images (DreamBooth prior preservation; kohya's `--reg_data_dir`): a second root in the same convention
(`1_dog`), or a plain folder whose images without a caption file take the class prompt. Kohya's balancing
rule, followed here: once, before training, the class images are taken in order, each with its folder's
repeats, until they hold at least as many samples as the instance images do with theirs; the class images
after that point are not used; if the first round falls short, further rounds add one repeat to each image
in order until the counts match. So the class samples equal the instance samples, or exceed them by less
than the last taken image's repeats (with `1_dog`, always equal).

Buckets (kohya's `make_bucket_resolutions`): for each width from the smallest side to the largest in steps,
the tallest height (a multiple of the step, within the sides) whose area is at most resolution², both
orientations, plus the square. Each image goes to the bucket of the nearest aspect ratio (distance of the
logarithms, so that 2:1 and 1:2 are equally far from 1:1; kohya takes the plain difference of w/h), is
scaled to cover it and centre-cropped: never distorted.

Epochs: within each bucket the samples (each item `repeats` times) are shuffled; a bucket's last, short
batch is filled by wrapping around to the start of its shuffled list (kohya's stays short: here every batch
is exactly the batch size, so each process of a distributed run takes an equal slice); then the batches
of all buckets are shuffled. The order is a pure function of (seed, epoch).

Captions (kohya's `--shuffle_caption`, `--keep_tokens`): comma-separated tags, the first `keep_tokens`
kept in front in place, the rest shuffled, joined again with ", ".
"""

import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from sd.cli import printable
from sd.datasets import IMAGE_SUFFIXES, own_file, open_image, read_caption, read_image_size
from sd.errors import InputError
from sd.files import write_atomically
from sd.paths import exists, inside
from sd.settings import LATENT_DTYPE, VAE_FACTOR

DATA_FLAG = "--data"
CLASS_DATA_FLAG = "--class-data"
FALLBACK_FLAGS = {DATA_FLAG: "--instance-prompt", CLASS_DATA_FLAG: "--class-prompt"}  # whose prompt captions the rest
BUCKET_FLAGS = {"resolution": "--resolution", "min_side": "--min-bucket-side", "max_side": "--max-bucket-side",
                "step": "--bucket-step"}
CAPTION_FLAGS = {"keep_tokens": "--keep-tokens", "separator": "--caption-separator",
                 "caption_extension": "--caption-extension"}
MAX_REPEATS = 10_000  # a folder's repeat count; more would make one epoch of a few images millions of samples
FOLDER_NAME = re.compile(r"([+-]?[0-9]+)(_?)(.*)", re.DOTALL)  # <repeats>_<caption>
CLASS_IMAGE = "class-{:04d}"  # the names of generated class images, numbered from 0
EXAMPLE = "10_sks dog"


@dataclass(frozen=True)
class BucketOptions:
    """The aspect-ratio buckets (kohya's --resolution, --min_bucket_reso, --max_bucket_reso,
    --bucket_reso_steps, --enable_bucket). Without buckets, every image is centre-cropped to a square."""

    resolution: int = 512  # the training area is resolution²
    min_side: int = 256
    max_side: int = 1024
    step: int = 64
    enabled: bool = True

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise InputError(f"buckets enabled must be True or False, got {self.enabled!r}")
        for name, flag in BUCKET_FLAGS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < VAE_FACTOR:
                raise InputError(f"{flag} must be a whole number of pixels, at least {VAE_FACTOR}, got {value!r}")
        if self.step % VAE_FACTOR:
            raise InputError(f"--bucket-step {self.step} must be a multiple of {VAE_FACTOR} (the VAE's factor); "
                             f"64 is kohya's default")
        for name in ("min_side", "max_side", "resolution"):
            if getattr(self, name) % self.step:
                raise InputError(f"{BUCKET_FLAGS[name]} {getattr(self, name)} must be a multiple of --bucket-step "
                                 f"{self.step}")
        if self.enabled and not self.min_side <= self.resolution <= self.max_side:
            raise InputError(f"--resolution {self.resolution} must lie between --min-bucket-side {self.min_side} and "
                             f"--max-bucket-side {self.max_side}; change one of them")


def make_buckets(opts: BucketOptions) -> list[tuple[int, int]]:
    """The (width, height) buckets of `opts`, sorted: for each width the tallest height that fits the area, both
    orientations, and the square; (resolution, resolution) alone when buckets are off."""
    if not opts.enabled:
        return [(opts.resolution, opts.resolution)]
    area = opts.resolution ** 2
    square = math.isqrt(area) // opts.step * opts.step
    buckets = {(square, square)}
    for width in range(opts.min_side, opts.max_side + 1, opts.step):
        height = min(opts.max_side, area // width // opts.step * opts.step)
        if height >= opts.min_side:
            buckets |= {(width, height), (height, width)}
    return sorted(buckets)


def aspect_distance(size: tuple[int, int], bucket: tuple[int, int]) -> float:
    """|log(w/h) - log(bw/bh)|: how far apart two aspect ratios are, the same for a ratio and its inverse."""
    return abs(math.log(size[0] / size[1]) - math.log(bucket[0] / bucket[1]))


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest to that of an image of `size` (width, height); of equally near
    ones the first."""
    return min(buckets, key=lambda bucket: aspect_distance(size, bucket))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """`image` scaled (Lanczos) to cover `bucket` (width, height), keeping its aspect ratio, and centre-cropped to
    it: the centred box of the bucket's aspect ratio is resampled in one step."""
    width, height = image.size
    if width * bucket[1] > height * bucket[0]:  # wider than the bucket: its full height, the middle of its width
        box_w, box_h = height * bucket[0] / bucket[1], height
    else:
        box_w, box_h = width, width * bucket[1] / bucket[0]
    left, top = (width - box_w) / 2, (height - box_h) / 2
    return image.resize(bucket, Image.LANCZOS, box=(left, top, left + box_w, top + box_h))


@dataclass(frozen=True)
class Item:
    """One image of the training data: its caption (before `CaptionOptions`), how often an epoch shows it, its
    bucket (width, height), and whether it is a class (regularization) image."""

    path: Path
    caption: str
    repeats: int
    bucket: tuple[int, int]
    is_class: bool = False


@dataclass(frozen=True)
class ImageSet:
    """One folder as read: its images, their captions, how many of those came from caption files (the others are
    `fallback`, the folder's caption or the class prompt)."""

    folder: Path
    repeats: int
    images: list[Path]
    captions: list[str]
    from_files: int
    fallback: str | None

    def summary(self, root: Path) -> str:
        shown = "." if self.folder == root else f"'{self.folder.name}'"
        others = len(self.images) - self.from_files
        return (f"{shown}: {len(self.images)} images x{self.repeats} ({self.from_files} captions from files"
                + (f", {others} {self.fallback!r}" if others else "") + ")")


def visible(folder: Path, flag: str) -> list[Path]:
    """The entries of `folder` not hidden, sorted by name."""
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise InputError(f"{flag}: cannot read folder {folder}: {e.strerror or e}; check its permissions") from None


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def parse_folder_name(name: str, flag: str, root: Path) -> tuple[int, str]:
    """(repeats, caption) of a folder named `<repeats>_<caption>`; refused, saying how it was read, otherwise."""
    match = FOLDER_NAME.fullmatch(name)
    reading = ("no repeat count" if match is None else f"{match[1]} repeats" if int(match[1]) < 1 else
               f"{int(match[1])} repeats, more than {MAX_REPEATS}" if int(match[1]) > MAX_REPEATS else
               f"{int(match[1])} repeats and no '_' after them" if not match[2] else None)
    if reading:
        raise InputError(f"{flag} {printable(str(root))}: folder {printable(repr(name))} does not follow kohya's "
                         f"'<repeats>_<caption>' naming (read as: {reading}); rename it like '{EXAMPLE}' (repeats "
                         f"1 to {MAX_REPEATS})")
    return int(match[1]), match[3].strip()


def read_images(folder: Path, flag: str, root: Path) -> list[Path]:
    images = [own_file(p, folder, "image") for p in visible(folder, flag) if is_image(p)]
    if not images:
        raise InputError(f"{flag} {printable(str(root))}: folder {printable(repr(folder.name))} holds no images "
                         f"({', '.join(IMAGE_SUFFIXES)}); put the images in it or remove it")
    return images


def caption_path(image: Path, extension: str) -> Path:
    return image.with_name(image.stem + extension)


def read_set(folder: Path, repeats: int, fallback: str | None, extension: str, flag: str, root: Path,
             fix: str) -> ImageSet:
    """The images of `folder` with their captions: the caption file's, else `fallback`, else refused with `fix`."""
    images, captions, from_files = read_images(folder, flag, root), [], 0
    for image in images:
        path = caption_path(image, extension)
        if exists(path) or path.is_symlink():
            captions.append(read_caption(path, folder))
            from_files += 1
        elif fallback:
            captions.append(fallback)
        else:
            raise InputError(f"{flag} {printable(str(root))}: caption {printable(str(path))} not found for image "
                             f"{printable(image.name)}; {fix.replace('{caption}', path.name)}")
    return ImageSet(folder, repeats, images, captions, from_files, fallback)


def read_sets(root: Path, flag: str, extension: str, fallback: str | None) -> tuple[list[ImageSet], bool]:
    """The image sets of `root` and whether it was read in kohya's naming (subfolders) rather than as one set;
    `fallback`: the caption of images without a caption file where the folder's name gives none (the instance or
    class prompt)."""
    if not root.is_dir():
        raise InputError(f"{flag} {printable(str(root))} is not a folder; give a folder of subfolders like "
                         f"'{EXAMPLE}' (kohya's naming) or of images with their caption files")
    entries = visible(root, flag)
    folders = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if is_image(p)]
    if folders and loose:
        raise InputError(f"{flag} {printable(str(root))} holds both images ({printable(loose[0].name)}) and subfolders "
                         f"({printable(folders[0].name)}); kohya's naming reads images only in subfolders "
                         f"'<repeats>_<caption>': move the images into one like '1_<caption>'")
    if not folders:
        if not loose:
            raise InputError(f"{flag} {printable(str(root))} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no "
                             f"subfolders; put images with caption files in it, or subfolders like '{EXAMPLE}'")
        fix = (f"write the caption into {{caption}}, or give {FALLBACK_FLAGS[flag]} (the folder has no subfolders, "
               f"so it is read as one set of captioned images, repeats 1)")
        return [read_set(root, 1, fallback, extension, flag, root, fix)], False
    sets = []
    for folder in folders:
        inside(folder, root, f"{flag} {root}", "copy the folder into it")
        repeats, caption = parse_folder_name(folder.name, flag, root)
        fix = (f"write the caption into {{caption}} (folder {printable(repr(folder.name))} names no caption after its "
               f"repeat count), or rename the folder like '{repeats}_sks dog'")
        sets.append(read_set(folder, repeats, caption or fallback, extension, flag, root, fix))
    return sets, True


def balanced_repeats(repeats: list[int], samples: int) -> list[int]:
    """Kohya's repeats of the class images for `samples` instance samples (see the module's docstring): 0 for an
    image not used."""
    result, n, first_round = [0] * len(repeats), 0, True
    while repeats and n < samples:
        for i, r in enumerate(repeats):
            result[i] += r if first_round else 1
            n += r if first_round else 1
            if n >= samples:
                break
        first_round = False
    return result


def check_caption_extension(extension: str) -> str:
    if not isinstance(extension, str) or not re.fullmatch(r"\.[A-Za-z0-9_-]+", extension):
        raise InputError(f"{CAPTION_FLAGS['caption_extension']} must be a file extension like '.txt' or '.caption', "
                         f"got {extension!r}")
    return extension


def check_whole(value, name: str, what: str, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InputError(f"{name} must be a whole number, at least {low} ({what}), got {value!r}")
    return value


class FineTuneData:
    """The training images of `root` (kohya's naming or one captioned folder) and, for DreamBooth, the class
    images of `class_root`, each assigned to an aspect-ratio bucket. Every problem is an `InputError` in one line."""

    def __init__(self, root: str | Path, buckets: BucketOptions, *, caption_extension: str = ".txt",
                 class_root: str | Path | None = None, class_caption: str | None = None,
                 instance_caption: str | None = None):
        self.root = Path(root)
        self.class_root = None if class_root is None else Path(class_root)
        self.buckets = make_buckets(buckets)
        extension = check_caption_extension(caption_extension)
        self.sets, self.kohya = read_sets(self.root, DATA_FLAG, extension, instance_caption)
        self.items = [Item(path, caption, s.repeats, nearest_bucket(read_image_size(path), self.buckets))
                      for s in self.sets for path, caption in zip(s.images, s.captions)]
        self.num_instance_images = len(self.items)
        self.class_sets, self.class_kohya = ([], False) if self.class_root is None else read_sets(
            self.class_root, CLASS_DATA_FLAG, extension, class_caption)
        pairs = [(path, caption, s.repeats) for s in self.class_sets for path, caption in zip(s.images, s.captions)]
        repeats = balanced_repeats([r for _, _, r in pairs], sum(item.repeats for item in self.items))
        self.items += [Item(path, caption, r, nearest_bucket(read_image_size(path), self.buckets), is_class=True)
                       for (path, caption, _), r in zip(pairs, repeats) if r]
        self.num_class_images = len(pairs)
        self.groups: dict[tuple[int, int], list[int]] = {}  # bucket -> its items' indices
        for i, item in enumerate(self.items):
            self.groups.setdefault(item.bucket, []).append(i)
        self.cached: tuple[tuple[int, int, int], list[list[int]]] | None = None  # (epoch, seed, batch size), batches

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int) -> Image.Image:
        """Item i's image, fitted to its bucket."""
        return fit_to_bucket(open_image(self.items[i].path), self.items[i].bucket)

    def samples(self, is_class: bool) -> int:
        return sum(item.repeats for item in self.items if item.is_class == is_class)

    def describe(self) -> str:
        """One line: how the folders were read, the repeats and captions, the buckets used."""
        def how(root: Path, sets: list[ImageSet], kohya: bool) -> str:
            reading = "kohya's '<repeats>_<caption>' naming" if kohya else "one set of captioned images"
            return f"{printable(str(root))} read in {reading}: {printable('; '.join(s.summary(root) for s in sets))}"

        text = f"{DATA_FLAG} {how(self.root, self.sets, self.kohya)}; {self.samples(False)} samples an epoch"
        if self.class_root is not None:
            used = sum(item.is_class for item in self.items)
            text += (f"; {CLASS_DATA_FLAG} {how(self.class_root, self.class_sets, self.class_kohya)}; {used} of "
                     f"{self.num_class_images} used, {self.samples(True)} samples an epoch")
        counts = Counter(item.bucket for item in self.items)
        return text + "; buckets " + ", ".join(f"{w}x{h}: {counts[w, h]}" for w, h in sorted(counts))

    def batches_per_epoch(self, batch_size: int) -> int:
        check_whole(batch_size, "the batch size", "images a step, over all processes", 1)
        return sum(math.ceil(sum(self.items[i].repeats for i in group) / batch_size) for group in self.groups.values())

    def epoch_batches(self, epoch: int, seed: int, batch_size: int) -> list[list[int]]:
        """The global batches of `epoch`: each `batch_size` item indices of one bucket, every item `repeats` times
        (a bucket's last batch filled by wrapping around its shuffled list), in an order fixed by (seed, epoch)."""
        check_whole(epoch, "the epoch", "counted from 0", 0)
        check_whole(batch_size, "the batch size", "images a step, over all processes", 1)
        rng = random.Random(seed * 1_000_003 + epoch)
        batches = []
        for bucket in sorted(self.groups):
            samples = [i for i in self.groups[bucket] for _ in range(self.items[i].repeats)]
            rng.shuffle(samples)
            samples += [samples[k % len(samples)] for k in range(-len(samples) % batch_size)]
            batches += [samples[k:k + batch_size] for k in range(0, len(samples), batch_size)]
        rng.shuffle(batches)
        return batches

    def batch_at(self, step: int, seed: int, batch_size: int) -> tuple[int, list[int]]:
        """(epoch, the global batch) of global step `step` (from 0): the epochs' batches one after another."""
        check_whole(step, "the step", "counted from 0", 0)
        epoch, k = divmod(step, self.batches_per_epoch(batch_size))
        key = (epoch, seed, batch_size)
        if self.cached is None or self.cached[0] != key:
            self.cached = key, self.epoch_batches(epoch, seed, batch_size)
        return epoch, self.cached[1][k]


def rank_slice(indices: list[int], rank: int, world: int) -> list[int]:
    """Process `rank`'s part of a global batch in a run of `world` processes: the r-th of `world` equal slices."""
    check_whole(world, "the number of processes", "the world size", 1)
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise InputError(f"the rank must be a whole number from 0 to {world - 1}, got {rank!r}")
    if len(indices) % world:
        raise InputError(f"the batch of {len(indices)} images cannot be split evenly over {world} processes; give a "
                         f"batch size that is a multiple of {world}")
    b = len(indices)
    return indices[rank * b // world:(rank + 1) * b // world]


@dataclass(frozen=True)
class CaptionOptions:
    """Kohya's caption processing: with `shuffle_tags` the `separator`-separated tags after the first
    `keep_tokens` are shuffled at each use."""

    shuffle_tags: bool = False
    keep_tokens: int = 0
    separator: str = ","

    def __post_init__(self):
        check_whole(self.keep_tokens, CAPTION_FLAGS["keep_tokens"], "tags kept in front", 0)
        if not isinstance(self.separator, str) or not self.separator.strip():
            raise InputError(f"{CAPTION_FLAGS['separator']} must be a visible text like ',', got {self.separator!r}")

    def apply(self, caption: str, rng: random.Random) -> str:
        """`caption` as one training step sees it: unchanged without shuffling, else its tags (stripped) with all
        but the first `keep_tokens` shuffled, joined with ", "."""
        if not self.shuffle_tags:
            return caption
        tags = [tag.strip() for tag in caption.strip().split(self.separator)]
        kept, rest = tags[:self.keep_tokens], tags[self.keep_tokens:]
        rng.shuffle(rest)
        return ", ".join(kept + rest)


def cache_latents(vae, data: FineTuneData, device, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every item's latent mean and standard deviation, each (1, 4, h/8, w/8) for its bucket, float32 on the CPU:
    encoded once, `batch` images of one bucket at a time."""
    from sd.objectives import encode_pool  # here: sd.objectives may import this module

    check_whole(batch, "the encoding batch", "images per VAE call", 1)
    latents: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(data.items)
    with torch.no_grad():
        for group in data.groups.values():
            for k in range(0, len(group), batch):
                chunk = group[k:k + batch]
                means, stds = encode_pool(vae, [data.image(i) for i in chunk], device, batch)  # 2 x (b, 4, h, w)
                for j, i in enumerate(chunk):
                    latents[i] = means[j:j + 1], stds[j:j + 1]  # (1, 4, h, w) each
    return latents


def existing_images(folder: Path) -> list[Path]:
    return [p for p in visible(folder, CLASS_DATA_FLAG) if is_image(p)]


def ensure_class_images(pipe, prompt: str, folder: Path, count: int, *, seed: int, size: tuple[int, int],
                        steps: int = 30, batch: int = 4, progress: bool = True) -> list[Path]:
    """DreamBooth's class images: while `folder` holds fewer than `count` images (of any names), generate
    `class-0000.png`, `class-0001.png`, ... (names not taken yet) with `pipe` from `prompt`, each beside its caption
    file (the prompt). Image i starts from the noise of seed + i: made one at a time it is the image
    `pipe.text_to_image(prompt, seed=seed + i)` gives; in a batch the same to the last bit of its arithmetic. Images are made `batch` at a time in fixed groups (i // batch), a group always whole,
    up to the last image needed: an interrupted run, resumed, makes the same bytes as one that was not (an image
    already written is made again with its group, not rewritten). Returns the paths written."""
    folder = Path(folder)
    check_whole(count, "the number of class images", "images wanted in the class folder", 0)
    check_whole(batch, "the generation batch", "images per call", 1)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{CLASS_DATA_FLAG}: cannot create folder {folder}: {e.strerror or e}; choose a folder you "
                         f"can write to") from None
    missing, index = count - len(existing_images(folder)), 0
    wanted: list[int] = []
    while len(wanted) < missing:
        if not exists(folder / f"{CLASS_IMAGE.format(index)}.png"):
            wanted.append(index)
        index += 1
    multiple = pipe.models.family.side_multiple
    if (not isinstance(size, tuple) or len(size) != 2 or any(not isinstance(side, int) or isinstance(side, bool)
                                                             or side < multiple or side % multiple for side in size)):
        raise InputError(f"the class images' size (width, height) must be two whole numbers, multiples of {multiple} "
                         f"(the model's), got {size!r}")
    width, height = size
    written = []
    groups, wanted_set = sorted({i // batch for i in wanted}), set(wanted)
    with tqdm(total=len(wanted), desc="class images", disable=not progress) as bar:
        for group in groups:
            members = list(range(group * batch, min((group + 1) * batch, wanted[-1] + 1)))
            noise = torch.cat([torch.randn((1, 4, height // VAE_FACTOR, width // VAE_FACTOR), dtype=LATENT_DTYPE,
                                           generator=torch.Generator().manual_seed(seed + i)) for i in members])
            images = pipe.text_to_image([prompt] * len(members), width=width, height=height, steps=steps,
                                        seed=seed + members[0], latents=noise, progress=False)  # noise: (b, 4, h, w)
            for i, image in zip(members, images):
                if i not in wanted_set:
                    continue
                path = folder / f"{CLASS_IMAGE.format(i)}.png"
                write_atomically(path.with_suffix(".txt"), lambda tmp: tmp.write_text(prompt, encoding="utf-8"))
                write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))
                written.append(path)
                bar.update()
    return written
