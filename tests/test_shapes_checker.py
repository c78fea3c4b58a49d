"""The captioned-shapes reader of `tests/shapes_checker.py`, validated on rendered ground truth before the
tests of the trained model rely on it."""

import pytest
from PIL import ImageFilter

from sd.datasets import COLOURS, NEW_SHAPES, POSITIONS, SHAPES, SIZES, CaptionedShapes, Scene, render
pytest.importorskip("scipy")  # the image checker's tool
from tests.shapes_checker import read  # noqa: E402

PARTS = ("background", "colour", "shape", "size", "position")


def test_reads_every_part_of_rendered_images():
    data = CaptionedShapes(64, seed=123)
    for i in range(300):
        image, _, scene = data.sample(i)
        reading = read(image)
        assert [getattr(reading, p) for p in PARTS] == [getattr(scene, p) for p in PARTS], (i, scene, reading)


def test_reads_every_colour_shape_size_and_position_held_out_pairs_included():
    for colour in COLOURS:
        for shape in SHAPES:
            for position in POSITIONS:
                for size in SIZES:
                    scene = Scene(shape, colour, size, position, "gray")
                    assert read(render(scene, 64)).matches(scene, PARTS[1:]) == dict.fromkeys(PARTS[1:], True), scene


def test_with_the_new_shapes_among_the_choices_every_shape_of_every_colour_and_position_is_read():
    for shape in SHAPES + NEW_SHAPES:
        for colour in COLOURS:
            for position in POSITIONS:
                for size in SIZES:
                    scene = Scene(shape, colour, size, position, "gray")
                    reading = read(render(scene, 64), SHAPES + NEW_SHAPES)
                    assert reading.matches(scene, PARTS[1:]) == dict.fromkeys(PARTS[1:], True), (scene, reading)


def test_mild_blur_does_not_change_the_reading():
    data = CaptionedShapes(64, seed=5)
    for i in range(100):
        image, _, scene = data.sample(i)
        assert read(image.filter(ImageFilter.GaussianBlur(0.7))).matches(scene) == dict.fromkeys(
            ("colour", "shape", "position"), True), (i, scene)


def test_an_empty_image_has_no_shape():
    image = render(Scene("circle", "red", "small", "center", "red"), 64)  # red on red
    assert not read(image).found
