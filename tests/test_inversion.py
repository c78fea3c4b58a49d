"""DDIM inversion with the project's trained tiny model (data/tiny-shapes.safetensors): inverting an image
and sampling back with DDIM at guidance 1 gives the image again, nearly as closely as the VAE itself
can; another prompt edits it; bad inputs are one line. (The inverse sampler's steps are checked against
diffusers' DDIMInverseScheduler in test_samplers.py.)"""

import numpy as np
import pytest
import torch
from PIL import Image

import run_demo
from sd.errors import SettingError
from sd.files import DATA_DIR
from sd.pipeline import StableDiffusion
pytest.importorskip("scipy")  # the image checker's tool
from tests.shapes_checker import read  # noqa: E402

PROMPT = "a large red circle in the top left"


@pytest.fixture(scope="module")
def sd():
    return StableDiffusion.from_checkpoint(DATA_DIR / "tiny-shapes.safetensors")


@pytest.fixture(scope="module")
def image(sd):
    return sd.text_to_image(PROMPT, seed=1, progress=False)[0]


@pytest.fixture(scope="module")
def inverted(sd, image):
    """The image's DDIM inversion in 25 steps: the start of both the reconstruction and the edit."""
    return sd.invert(image, PROMPT, steps=25, progress=False)


def error(a, b) -> float:
    """Mean absolute difference of two images, in 0..255."""
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def test_inverting_and_sampling_back_gives_the_image(sd, image, inverted):
    latents = inverted
    assert latents.shape == (1, 4, 8, 8)
    back = sd.text_to_image(PROMPT, latents=latents, sampler="ddim", steps=25, guidance_scale=1.0, progress=False)[0]
    other = sd.text_to_image(PROMPT, sampler="ddim", steps=25, guidance_scale=1.0, seed=5, progress=False)[0]
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    through_vae = sd.decode(sd.encode_image(pixels, torch.Generator().manual_seed(0)))[0]
    # measured: 0.9 (the VAE alone: 0.8, another seed: 142)
    assert error(back, image) < 1.5 * error(through_vae, image) and error(back, image) < 0.02 * error(other, image)


def test_another_prompt_edits_the_inverted_image(sd, image, inverted):
    latents = inverted
    edited = sd.text_to_image(PROMPT.replace("red", "blue"), latents=latents, sampler="ddim", steps=25,
                              guidance_scale=1.0, progress=False)[0]
    original, changed = read(image), read(edited)
    assert (original.colour, original.position) == ("red", "top left")
    assert (changed.colour, changed.position, changed.background) == ("blue", "top left", original.background)


def test_bad_inversions_are_refused(sd, image):
    with pytest.raises(SettingError, match="is 60x60, not a multiple of 8 each way"):
        sd.invert(image.crop((0, 0, 60, 60)), PROMPT)
    assert sd.invert(image.crop((0, 0, 60, 60)), PROMPT, steps=2, width=64, height=64, progress=False).shape == \
        (1, 4, 8, 8)
    with pytest.raises(SettingError, match="must be one text"):
        sd.invert(image, [PROMPT, PROMPT])
    latents = torch.zeros(1, 4, 8, 8)
    with pytest.raises(SettingError, match="give one of image, latents .where text-to-image starts. and image_latents"):
        sd.text_to_image(PROMPT, image=image, latents=latents)
    with pytest.raises(SettingError, match=r"shape \(4, h, w\), \(1, 4, h, w\) or \(1, 4, h, w\), got \(2, 3, 8, 8\)"):
        sd.text_to_image(PROMPT, latents=torch.zeros(2, 3, 8, 8))
    with pytest.raises(SettingError, match="width 32 is not that of the latents, 64"):
        sd.text_to_image(PROMPT, latents=latents, width=32)


def test_the_command_line_inverts_and_remakes_from_its_png(image, tmp_path, capsys):
    image.save(tmp_path / "src.png")
    checkpoint = ["--checkpoint", DATA_DIR / "tiny-shapes.safetensors"]
    args = [*checkpoint, "--no-progress", "--image", tmp_path / "src.png", "--invert", PROMPT, "--prompt", PROMPT,
            "--guidance-scale", "1", "--steps", "10", "--output", tmp_path / "back.png"]
    assert run_demo.main(list(map(str, args))) == 0
    with Image.open(tmp_path / "back.png") as back:
        parameters = back.text["parameters"]
        assert error(back, image) < 3
    assert f"Sampler: ddim" in parameters and f"Inversion prompt: {PROMPT}" in parameters
    assert "Denoising strength" not in parameters
    assert run_demo.main(list(map(str, [*checkpoint, "--no-progress", "--from-png", tmp_path / "back.png",
                                        "--output", tmp_path / "again.png"]))) == 0
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "back.png").read_bytes()
    capsys.readouterr()
    for extra, message in ((["--strength", "0.5"], "--invert needs no --strength"),
                           (["--sampler", "euler"], "--invert needs --sampler ddim")):
        assert run_demo.main(list(map(str, args[:-1] + [tmp_path / "bad.png"] + extra))) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
        assert not (tmp_path / "bad.png").exists()
    image.crop((0, 0, 60, 60)).save(tmp_path / "odd.png")
    assert run_demo.main(list(map(str, [*checkpoint, "--no-progress", "--image", tmp_path / "odd.png", "--invert", PROMPT,
                                        "--prompt", PROMPT, "--output", tmp_path / "odd-out.png"]))) == 2
    assert "is 60x60, not a multiple of 8 each way; crop it, or give --width and --height" in capsys.readouterr().err
