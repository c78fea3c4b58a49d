"""AUTOMATIC1111's hires fix (`StableDiffusion.hires_fix`, `--hires-scale`) on a tiny model: the second pass
is our own image-to-image of the upscaled first pass, with the same seed; the sizes and the PNG's
parameters are AUTOMATIC1111's, and --from-png makes the image again; bad settings are one line."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import run_demo
from sd.errors import SettingError
from sd.pipeline import StableDiffusion
from tests.tiny import write_tiny_checkpoint

PROMPT = "a red circle"
BASE = dict(steps=4, seed=7, width=64, height=48, progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("hires") / "tiny.safetensors")


@pytest.fixture(scope="module")
def sd(checkpoint):
    return StableDiffusion.from_checkpoint(checkpoint)


def test_latent_hires_fix_is_image_to_image_of_the_upscaled_latents(sd):
    ours = sd.hires_fix(PROMPT, hires_scale=1.5, hires_strength=0.6, hires_steps=5, output_type="latent", **BASE)
    base = sd.generate(PROMPT, output_type="latent", **BASE)  # (1, 4, 6, 8)
    upscaled = F.interpolate(base, size=(9, 12), mode="bilinear")  # 72x96: 1.5 times, multiples of 8
    second = {**BASE, "steps": 5}
    del second["width"], second["height"]
    expected = sd.generate(PROMPT, image_latents=upscaled, strength=0.6, output_type="latent", **second)
    assert ours.shape == (1, 4, 9, 12) and torch.equal(ours, expected)
    assert not torch.equal(expected, sd.generate(PROMPT, image_latents=upscaled, strength=0.6, output_type="latent",
                                                 **{**second, "seed": 8}))


def test_lanczos_hires_fix_redraws_the_decoded_image(sd):
    ours = sd.hires_fix(PROMPT, hires_scale=2, hires_upscaler="lanczos", output_type="np", **BASE)
    first = sd.generate(PROMPT, **BASE)[0]
    expected = sd.generate(PROMPT, image=first, strength=0.55, output_type="np",
                           **{**BASE, "width": 128, "height": 96})
    assert ours.shape == (1, 96, 128, 3) and np.array_equal(ours, expected)


def test_hires_settings_are_checked_before_the_first_pass(sd):
    for settings, message in (({"hires_scale": 1.0}, "hires_scale must be a number above 1"),
                              ({"hires_strength": -0.1}, "hires_strength must be between 0 and 1"),
                              ({"hires_steps": 0}, "hires_steps must be a whole number between 1 and 1000"),
                              ({"hires_upscaler": "bicubic"}, "hires_upscaler must be one of latent, lanczos")):
        with pytest.raises(SettingError, match=message):
            sd.hires_fix(PROMPT, **settings, **BASE)
    with pytest.raises(SettingError, match="lanczos redraws one image at a time"):
        sd.hires_fix(PROMPT, hires_upscaler="lanczos", num_images=2, **BASE)


def test_the_command_line_writes_automatic1111_parameters_and_remakes_the_image(checkpoint, tmp_path, capsys):
    common = ["--checkpoint", checkpoint, "--no-progress", "--steps", "3", "--width", "64", "--height", "48"]
    args = [*common, "--prompt", PROMPT, "--seed", "2", "--hires-scale", "1.5", "--hires-steps", "2",
            "--output", tmp_path / "hires.png"]
    assert run_demo.main(list(map(str, args))) == 0
    assert "then hires fix to 96x72" in capsys.readouterr().out
    with Image.open(tmp_path / "hires.png") as image:
        assert image.size == (96, 72)
        parameters = image.text["parameters"]
    assert parameters.endswith("Size: 64x48, Model hash: " + run_demo.model_hash(checkpoint) + ", Model: tiny, "
                               "Denoising strength: 0.55, Hires upscale: 1.5, Hires upscaler: Latent, Hires steps: 2")
    assert run_demo.main(list(map(str, [*common, "--from-png", tmp_path / "hires.png", "--output",
                                        tmp_path / "again.png"]))) == 0
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "hires.png").read_bytes()
    capsys.readouterr()
    for extra, message in ((["--hires-scale", "0.5"], "--hires-scale must be a number above 1"),
                           (["--hires-scale", "2", "--hires-strength", "1.5"], "--hires-strength must be between 0 and 1"),
                           (["--hires-scale", "2", "--image", tmp_path / "hires.png"], "leave out --image"),
                           (["--hires-scale", "100000"], "--hires-scale must be a number above 1, at most 8"),
                           (["--hires-steps", "5"], "--hires-steps sets the hires fix, which --hires-scale S turns on")):
        assert run_demo.main(list(map(str, [*common, "--prompt", PROMPT, *extra, "--output", tmp_path / "bad.png"]))) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "bad.png").exists()


def test_automatic1111_hires_parameters_are_read(tmp_path):
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a castle\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, "
                                "Denoising strength: 0.7, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent")
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    found = run_demo.read_parameters(tmp_path / "a1111.png")
    assert (found["hires_scale"], found["hires_strength"], found["hires_steps"], found["hires_upscaler"]) == \
        (2.0, 0.7, 10, "latent") and "strength" not in found
