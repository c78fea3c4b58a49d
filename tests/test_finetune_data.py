"""`sd.finetune_data`: kohya's buckets, folders, repeats and class balancing, the epochs' batches, caption
shuffling, class images made by our pipeline, and cached latents. Tiny images written in tmp_path."""

import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import sd.finetune_data as fd
from sd.datasets import MAX_CAPTION_BYTES
from sd.errors import InputError
from sd.finetune_data import (BucketOptions, CaptionOptions, FineTuneData, Item, cache_latents, ensure_class_images,
                              fit_to_bucket, make_buckets, nearest_bucket, rank_slice)
from sd.pipeline import StableDiffusion
from tests.tiny import write_tiny_checkpoint

SMALL = BucketOptions(resolution=32, min_side=16, max_side=64, step=8)  # buckets for images of a few dozen pixels


def write_image(path: Path, size: tuple[int, int], caption: str | None = None, colour=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def one_line_error(call, *words: str) -> str:
    with pytest.raises(InputError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)
    return message


# ---- buckets -------------------------------------------------------------------------------------------------

def brute_force_buckets(opts: BucketOptions) -> set[tuple[int, int]]:
    """The rule of kohya's make_bucket_resolutions by enumeration: for every width on the step grid the tallest
    height on it with width * height <= resolution², kept if within the sides, both orientations, and the square
    (resolution rounded down to the step)."""
    sides = range(opts.min_side, opts.max_side + 1, opts.step)
    area = opts.resolution ** 2
    found = {(opts.resolution // opts.step * opts.step,) * 2}
    for w in sides:
        fitting = [h for h in sides if w * h <= area]
        if fitting:
            found |= {(w, max(fitting)), (max(fitting), w)}
    return found


@pytest.mark.parametrize("opts", [BucketOptions(), BucketOptions(768, 256, 1024, 64),
                                  BucketOptions(1024, 512, 2048, 64),
                                  BucketOptions(512, 320, 768, 32), SMALL])
def test_buckets_follow_kohyas_rule(opts):
    buckets = make_buckets(opts)
    assert buckets == sorted(set(buckets))
    assert set(buckets) == brute_force_buckets(opts)
    assert (opts.resolution, opts.resolution) in buckets
    for w, h in buckets:
        assert w * h <= opts.resolution ** 2
        assert w % opts.step == 0 and h % opts.step == 0
        assert opts.min_side <= w <= opts.max_side and opts.min_side <= h <= opts.max_side
        assert (h, w) in buckets


def test_default_buckets_hold_the_figures_users_quote():
    """Sizes kohya users see for SD1 at 512 (derived from the rule above, which checks them too)."""
    quoted = {(512, 512), (576, 448), (448, 576), (640, 384), (768, 320), (256, 1024)}
    assert quoted <= set(make_buckets(BucketOptions()))


def test_without_buckets_one_square():
    assert make_buckets(BucketOptions(resolution=768, enabled=False)) == [(768, 768)]


@pytest.mark.parametrize("options, flag", [
    (dict(resolution=500), "--resolution"), (dict(resolution=0), "--resolution"),
    (dict(resolution=True), "--resolution"),
    (dict(resolution=1088), "--resolution"), (dict(min_side=250), "--min-bucket-side"),
    (dict(max_side=1000), "--max-bucket-side"), (dict(step=60), "--bucket-step"), (dict(step=4), "--bucket-step"),
    (dict(min_side=576), "--min-bucket-side"), (dict(resolution=512.0), "--resolution"),
])
def test_bad_bucket_options(options, flag):
    one_line_error(lambda: BucketOptions(**options), flag)


def test_nearest_bucket_over_many_sizes():
    buckets = make_buckets(BucketOptions())
    rng = random.Random(0)
    for _ in range(500):
        size = (rng.randint(1, 4000), rng.randint(1, 4000))
        chosen = nearest_bucket(size, buckets)
        ratio = math.log(size[0] / size[1])
        assert all(abs(ratio - math.log(chosen[0] / chosen[1])) <= abs(ratio - math.log(w / h)) for w, h in buckets)
        transposed = nearest_bucket(size[::-1], buckets)  # the log distance is symmetric: the mirror image's bucket
        assert abs(math.log(transposed[0] / transposed[1]) + math.log(chosen[0] / chosen[1])) < 1e-12


def disc_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the bright region's bounding box."""
    mask = np.asarray(image) > 127
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1


def test_fit_to_bucket_size_and_no_distortion():
    """A round disc in images of many shapes, fitted to buckets of any shape (the nearest or not), stays round, of
    the diameter that covering the bucket scales it to; the output is exactly the bucket's size. The disc (a fifth
    of the image's short side) lies inside any centred crop of aspect ratio up to 4 and is at least 51 pixels wide
    after fitting."""
    buckets = make_buckets(BucketOptions())
    rng = random.Random(1)
    for k in range(60):
        w, h = rng.randint(100, 1500), rng.randint(100, 1500)
        image = Image.new("L", (w, h), 0)
        r = min(w, h) / 10
        ImageDraw.Draw(image).ellipse((w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r), fill=255)
        bucket = nearest_bucket((w, h), buckets) if k % 2 else rng.choice(buckets)
        fitted = fit_to_bucket(image, bucket)
        assert fitted.size == bucket
        scale = max(bucket[0] / w, bucket[1] / h)
        (width, height), (drawn_w, drawn_h) = disc_size(fitted), disc_size(image)
        assert abs(width - drawn_w * scale) <= 2 and abs(height - drawn_h * scale) <= 2, (w, h, bucket)


# ---- folders -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, repeats, caption", [("10_sks dog", 10, "sks dog"), ("1_dog", 1, "dog"),
                                                    ("3_a photo of x", 3, "a photo of x"), ("2_sks_dog", 2, "sks_dog"),
                                                    ("010_cat", 10, "cat")])
def test_good_folder_names(tmp_path, name, repeats, caption):
    write_image(tmp_path / name / "a.png", (40, 30))
    write_image(tmp_path / name / "b.png", (30, 40), caption="own caption")
    data = FineTuneData(tmp_path, SMALL)
    assert [(i.path.name, i.caption, i.repeats, i.is_class) for i in data.items] == [
        ("a.png", caption, repeats, False), ("b.png", "own caption", repeats, False)]
    assert data.num_instance_images == 2


@pytest.mark.parametrize("name, reading", [("dogs", "no repeat count"), ("0_dog", "0 repeats"),
                                           ("-1_dog", "-1 repeats"), ("x_dog", "no repeat count"),
                                           ("10dog", "10 repeats and no '_' after them"),
                                           ("10", "10 repeats and no '_'"),
                                           ("99999_dog", "99999 repeats, more than 10000")])
def test_bad_folder_names(tmp_path, name, reading):
    write_image(tmp_path / "1_good" / "a.png", (32, 32))
    write_image(tmp_path / name / "a.png", (32, 32))
    one_line_error(lambda: FineTuneData(tmp_path, SMALL), "--data", repr(name), "<repeats>_<caption>",
                   f"read as: {reading}", "rename it like '10_sks dog'")


def test_images_mixed_into_root(tmp_path):
    write_image(tmp_path / "10_dog" / "a.png", (32, 32))
    write_image(tmp_path / "stray.png", (32, 32), caption="x")
    one_line_error(lambda: FineTuneData(tmp_path, SMALL), "--data", "stray.png", "10_dog", "move the images")


def test_folder_without_images(tmp_path):
    write_image(tmp_path / "10_dog" / "a.png", (32, 32))
    (tmp_path / "2_cat").mkdir()
    (tmp_path / "2_cat" / "notes.txt").write_text("hi")
    one_line_error(lambda: FineTuneData(tmp_path, SMALL), "'2_cat'", "holds no images")
    one_line_error(lambda: FineTuneData(tmp_path / "nothing", SMALL), "--data", "is not a folder")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: FineTuneData(tmp_path / "empty", SMALL), "holds no images", "no subfolders")


def test_empty_folder_caption_needs_caption_files(tmp_path):
    """`10_` (kohya: an empty class caption) is read when every image has its caption file, refused otherwise."""
    write_image(tmp_path / "10_" / "a.png", (32, 32), caption="tagged")
    assert [i.caption for i in FineTuneData(tmp_path, SMALL).items] == ["tagged"]
    write_image(tmp_path / "10_" / "b.png", (32, 32))
    one_line_error(lambda: FineTuneData(tmp_path, SMALL), "b.txt", "names no caption", "rename the folder")


def test_hidden_entries_ignored(tmp_path):
    write_image(tmp_path / "1_dog" / "a.png", (32, 32))
    write_image(tmp_path / ".cache" / "x.png", (32, 32))
    write_image(tmp_path / "1_dog" / "._a.png", (32, 32))
    assert [i.path.name for i in FineTuneData(tmp_path, SMALL).items] == ["a.png"]


def test_plain_folder_needs_every_caption(tmp_path):
    write_image(tmp_path / "a.png", (32, 32), caption="a red square")
    data = FineTuneData(tmp_path, SMALL)
    assert [(i.caption, i.repeats) for i in data.items] == [("a red square", 1)]
    assert "one set of captioned images" in data.describe()
    write_image(tmp_path / "b.png", (32, 32))
    one_line_error(lambda: FineTuneData(tmp_path, SMALL), str(tmp_path / "b.txt"), "write the caption into b.txt",
                   "read as one set")


def test_caption_extension(tmp_path):
    image = write_image(tmp_path / "2_dog" / "a.png", (32, 32), caption="from txt")
    image.with_suffix(".caption").write_text("from caption")
    assert FineTuneData(tmp_path, SMALL, caption_extension=".caption").items[0].caption == "from caption"
    one_line_error(lambda: FineTuneData(tmp_path, SMALL, caption_extension="txt"), "--caption-extension")


def test_bad_captions_and_links(tmp_path):
    data = tmp_path / "data"
    image = write_image(data / "1_dog" / "a.png", (32, 32))
    image.with_suffix(".txt").write_bytes(b"x" * (MAX_CAPTION_BYTES + 1))
    one_line_error(lambda: FineTuneData(data, SMALL), "a.txt", "shorten it")
    image.with_suffix(".txt").write_bytes(b"\xff\xfe")
    one_line_error(lambda: FineTuneData(data, SMALL), "a.txt", "UTF-8")
    image.with_suffix(".txt").unlink()
    outside = write_image(tmp_path / "elsewhere" / "b.png", (32, 32))
    (data / "1_dog" / "b.png").symlink_to(outside)
    one_line_error(lambda: FineTuneData(data, SMALL), "b.png", "outside", "copy the file into the folder")
    (data / "1_dog" / "b.png").unlink()
    (data / "2_cat").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    one_line_error(lambda: FineTuneData(data, SMALL), "2_cat", "outside", "copy the folder")


def test_unreadable_image(tmp_path):
    (tmp_path / "1_dog").mkdir()
    (tmp_path / "1_dog" / "a.png").write_bytes(b"not a png")
    one_line_error(lambda: FineTuneData(tmp_path, SMALL), "a.png", "replace or remove it")


# ---- epochs --------------------------------------------------------------------------------------------------

@pytest.fixture
def mixed(tmp_path) -> FineTuneData:
    """7 images in 3 buckets, repeats 3 and 2."""
    sizes = [(40, 30), (40, 30), (30, 40), (32, 32), (32, 32), (32, 32), (64, 20)]
    for k, size in enumerate(sizes):
        write_image(tmp_path / ("3_dog" if k % 2 else "2_cat") / f"{k}.png", size)
    return FineTuneData(tmp_path, SMALL)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 8])
def test_epoch_batches(mixed, batch_size):
    batches = mixed.epoch_batches(0, seed=7, batch_size=batch_size)
    assert len(batches) == mixed.batches_per_epoch(batch_size)
    assert all(len(b) == batch_size for b in batches)
    assert all(len({mixed.items[i].bucket for i in b}) == 1 for b in batches)
    counts = Counter(i for b in batches for i in b)
    for bucket, group in mixed.groups.items():
        samples = sum(mixed.items[i].repeats for i in group)
        extra = [counts[i] - mixed.items[i].repeats for i in group]
        assert min(extra) >= 0 and sum(extra) == -samples % batch_size  # only the last batch's fill is extra
    if batch_size == 1:
        assert counts == {i: item.repeats for i, item in enumerate(mixed.items)}


def test_epochs_are_a_function_of_seed_and_epoch(mixed):
    first = mixed.epoch_batches(3, seed=1, batch_size=2)
    assert first == mixed.epoch_batches(3, seed=1, batch_size=2)
    assert first != mixed.epoch_batches(4, seed=1, batch_size=2)
    assert first != mixed.epoch_batches(3, seed=2, batch_size=2)


def test_batch_at_walks_the_epochs(mixed):
    n = mixed.batches_per_epoch(2)
    expected = [(e, b) for e in range(3) for b in mixed.epoch_batches(e, seed=5, batch_size=2)]
    assert [mixed.batch_at(step, 5, 2) for step in range(3 * n)] == expected
    assert mixed.batch_at(n + 1, 5, 2) == expected[n + 1]  # back and forth: the cache keeps nothing stale


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_rank_slices_partition_the_batch(world):
    batch = list(range(100, 108))
    slices = [rank_slice(batch, r, world) for r in range(world)]
    assert sum(slices, []) == batch and {len(s) for s in slices} == {8 // world}


def test_rank_slice_refuses_uneven_batches():
    one_line_error(lambda: rank_slice(list(range(6)), 0, 4), "multiple of 4")
    one_line_error(lambda: rank_slice(list(range(4)), 4, 4), "rank")


# ---- class images --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("class_folder, n_class, expected", [
    ("1_dog", 5, [4, 4, 4, 4, 4]),  # 20 instance samples: rounds of one repeat each until 20
    ("1_dog", 30, [1] * 20 + [0] * 10),  # more than needed: the first 20 used once, the rest not at all
    ("10_dog", 3, [10, 10, 0]),  # kohya's first round takes whole repeats: 20 samples, overshooting by 5 of 15
    ("3_dog", 2, [8, 7]),  # 15 instance samples: 3 + 3 in the first round, then +1 each in turn: 8 + 7
])
def test_class_balancing_follows_kohya(tmp_path, class_folder, n_class, expected):
    instance_repeats = {"1_dog": 10, "10_dog": 5, "3_dog": 5}[class_folder]
    instance_images = {"1_dog": 2, "10_dog": 3, "3_dog": 3}[class_folder]
    for k in range(instance_images):
        write_image(tmp_path / "data" / f"{instance_repeats}_sks dog" / f"{k}.png", (32, 32))
    for k in range(n_class):
        write_image(tmp_path / "reg" / class_folder / f"{k:02d}.png", (40, 30))
    data = FineTuneData(tmp_path / "data", SMALL, class_root=tmp_path / "reg")
    assert [i.repeats for i in data.items if i.is_class] == [r for r in expected if r]
    assert all(i.caption == "dog" for i in data.items if i.is_class)
    assert data.num_class_images == n_class
    assert "class" in data.describe() and "\n" not in data.describe()


def test_plain_class_folder_takes_the_class_prompt(tmp_path):
    write_image(tmp_path / "data" / "2_sks dog" / "a.png", (32, 32))
    write_image(tmp_path / "reg" / "x.png", (32, 32))
    write_image(tmp_path / "reg" / "y.png", (32, 32), caption="a dog on grass")
    data = FineTuneData(tmp_path / "data", SMALL, class_root=tmp_path / "reg", class_caption="a dog")
    assert [(i.caption, i.repeats, i.is_class) for i in data.items] == [
        ("sks dog", 2, False), ("a dog", 1, True), ("a dog on grass", 1, True)]
    one_line_error(lambda: FineTuneData(tmp_path / "data", SMALL, class_root=tmp_path / "reg"), "--class-data",
                   "x.txt", "give --class-prompt")


def test_items_images_and_description(mixed):
    for i, item in enumerate(mixed.items):
        assert isinstance(item, Item) and mixed.image(i).size == item.bucket
    text = mixed.describe()
    assert "\n" not in text and "kohya" in text and "'3_dog': 3 images x3" in text and "'2_cat': 4 images x2" in text
    counts = Counter(item.bucket for item in mixed.items)
    assert all(f"{w}x{h}: {n}" in text for (w, h), n in counts.items())


# ---- captions ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, 1, 3, 10])
def test_caption_shuffling_keeps_the_first_tags(keep):
    tags = [f"tag{k}" for k in range(8)]
    caption = ",".join(f"  {t} " for t in tags)  # kohya strips each tag
    options = CaptionOptions(shuffle_tags=True, keep_tokens=keep)
    rng = random.Random(0)
    seen = set()
    for _ in range(50):
        out = options.apply(caption, rng).split(", ")
        assert out[:keep] == tags[:keep] and sorted(out) == sorted(tags)
        seen.add(tuple(out))
    assert len(seen) > 1 if keep < len(tags) - 1 else len(seen) == 1


def test_caption_options():
    assert CaptionOptions().apply("b, a,c", random.Random(0)) == "b, a,c"
    out = CaptionOptions(shuffle_tags=True, separator="|").apply("x|y|z", random.Random(3))
    assert sorted(out.split(", ")) == ["x", "y", "z"]
    one_line_error(lambda: CaptionOptions(keep_tokens=-1), "--keep-tokens")
    one_line_error(lambda: CaptionOptions(separator=""), "--caption-separator")


# ---- class images made by our pipeline, and latents ------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return StableDiffusion.from_checkpoint(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.safetensors"))


CLASS = dict(seed=11, size=(32, 24), steps=2, progress=False)


@pytest.mark.parametrize("stop_after", [1, 2])  # 1: inside the first group of 2, which is made again whole
def test_class_images_resume_where_they_stopped(pipe, tmp_path, monkeypatch, stop_after):
    whole = ensure_class_images(pipe, "a photo of a dog", tmp_path / "whole", 3, batch=2, **CLASS)
    assert [p.name for p in whole] == ["class-0000.png", "class-0001.png", "class-0002.png"]
    assert all(p.with_suffix(".txt").read_text() == "a photo of a dog" for p in whole)

    images_written = []
    real = fd.write_atomically

    def interrupted(path, write, **kw):
        if path.suffix == ".png":
            if len(images_written) == stop_after:
                raise KeyboardInterrupt
            images_written.append(path)
        real(path, write, **kw)

    monkeypatch.setattr(fd, "write_atomically", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_class_images(pipe, "a photo of a dog", tmp_path / "cut", 3, batch=2, **CLASS)
    monkeypatch.setattr(fd, "write_atomically", real)
    assert sorted(p.name for p in (tmp_path / "cut").glob("*.png")) == [p.name for p in whole[:stop_after]]
    resumed = ensure_class_images(pipe, "a photo of a dog", tmp_path / "cut", 3, batch=2, **CLASS)
    assert [p.name for p in resumed] == [p.name for p in whole[stop_after:]]
    for p in whole:
        assert (tmp_path / "cut" / p.name).read_bytes() == p.read_bytes()
        assert (tmp_path / "cut" / p.name).with_suffix(".txt").read_text() == "a photo of a dog"
    assert ensure_class_images(pipe, "a photo of a dog", tmp_path / "cut", 3, batch=2, **CLASS) == []


def test_class_image_i_is_seed_plus_i(pipe, tmp_path):
    """One at a time, image i is exactly text_to_image's image of seed + i; in batches of 3, the same within the
    rounding of one level (a batch's arithmetic may differ in the last bit)."""
    write_image(tmp_path / "single" / "mine.jpg", (32, 24))  # counts toward the 3
    single = ensure_class_images(pipe, "a cat", tmp_path / "single", 3, batch=1, **CLASS)
    assert [p.name for p in single] == ["class-0000.png", "class-0001.png"]
    batched = ensure_class_images(pipe, "a cat", tmp_path / "batched", 3, batch=3, **CLASS)
    for i, path in enumerate(single):
        direct = np.asarray(pipe.text_to_image("a cat", seed=11 + i, width=32, height=24, steps=2, progress=False)[0])
        assert np.array_equal(np.asarray(Image.open(path)), direct)
        assert np.abs(np.asarray(Image.open(batched[i])).astype(int) - direct).max() <= 1


def test_cache_latents(pipe, mixed):
    from sd.objectives import encode_pool
    latents = cache_latents(pipe.models.vae, mixed, "cpu", batch=2)
    assert len(latents) == len(mixed.items)
    for i, (mean, std) in enumerate(latents):
        w, h = mixed.items[i].bucket
        assert mean.shape == std.shape == (1, 4, h // 8, w // 8) and mean.dtype == torch.float32
        alone = encode_pool(pipe.models.vae, [mixed.image(i)], "cpu")
        torch.testing.assert_close((mean, std), alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [(30, 32), (32, 32.0), (32,), "32x32"])
def test_class_image_size_checked(pipe, tmp_path, size):
    one_line_error(lambda: ensure_class_images(pipe, "a cat", tmp_path, 1, seed=0, size=size, progress=False),
                   "multiples of 8")
