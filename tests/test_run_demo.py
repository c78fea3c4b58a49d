"""`python run_demo.py` as a user meets it, on tiny checkpoints: the three modes write PNGs of the right
size whose "parameters" chunk (AUTOMATIC1111's form) makes --from-png regenerate them bit for bit;
several images, numbered names instead of overwriting, --overwrite, --help, empty and long prompts."""

import functools
import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import run_demo
from sd.hashing import model_hash
from sd.outputs import write_png
from sd.samplers import SAMPLERS
from tests.tiny import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SIZE = ["--width", "64", "--height", "48"]


def run_cli(*args, checkpoint=None, cwd=ROOT) -> subprocess.CompletedProcess:
    extra = ["--checkpoint", checkpoint] if checkpoint else []
    return subprocess.run([sys.executable, ROOT / "run_demo.py", "--no-progress", "--steps", "2", *extra,
                           *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


def succeeded(result) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, Path]:
    """Tiny checkpoints by UNet input channels: 4 (text-to-image) and 9 (inpainting)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    return {4: write_tiny_checkpoint(folder / "tiny.safetensors"),
            9: write_tiny_checkpoint(folder / "tiny-inpainting.safetensors", in_channels=9)}


def parameters(path: Path) -> str:
    with Image.open(path) as image:
        return image.text["parameters"]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gradient(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8))


def make_inputs(folder: Path, image_mode: str, mask_size: tuple[int, int] | None):
    """An init image of 70x53 (not a multiple of 8) in `image_mode`, and a mask (white square = repaint)."""
    image = gradient(70, 53)
    image = image.convert("P") if image_mode == "P" else image.convert(image_mode)
    image.save(folder / "init.png")
    if mask_size is None:
        return [folder / "init.png"]
    mask = Image.new("RGB", mask_size, "black")  # an RGB mask: converted to grayscale
    mask.paste("white", (mask_size[0] // 4, mask_size[1] // 4, mask_size[0] * 3 // 4, mask_size[1] * 3 // 4))
    mask.save(folder / "mask.png")
    return [folder / "init.png", folder / "mask.png"]


# mode: (UNet channels, init image mode, mask size, strength shown, extra arguments)
MODES = {
    "text-to-image": (4, None, None, None, ["--prompt", "a red bicycle, golden hour", "--negative-prompt",
                                             "blurry: café ☕", "--seed", "7", *SIZE]),
    "image-to-image": (4, "RGBA", None, "0.75", ["--prompt", "an oil painting", "--seed", "8"]),
    "inpainting-4-channel": (4, "P", (35, 26), "1.0", ["--prompt", "a cat", "--seed", "9"]),
    "inpainting-9-channel": (9, "L", (64, 48), "0.9", ["--prompt", "a cat", "--seed", "10", "--strength", "0.9"]),
}


@dataclass
class Made:
    result: subprocess.CompletedProcess
    out: Path
    inputs: list[Path]  # the init image and the mask, as far as the mode has them
    checkpoint: Path


@pytest.fixture(scope="module")
def made(tmp_path_factory, checkpoints):
    """made(mode) -> the run that made the image of MODES[mode], run once per module."""
    @functools.cache
    def make(mode: str) -> Made:
        channels, image_mode, mask_size, _, args = MODES[mode]
        folder = tmp_path_factory.mktemp(mode)
        inputs = make_inputs(folder, image_mode, mask_size) if image_mode else []
        out = folder / "out" / "image.png"
        out.parent.mkdir()
        flags = [a for flag, path in zip(("--image", "--mask"), inputs) for a in (flag, path)]
        return Made(run_cli(*args, *flags, "--output", out, checkpoint=checkpoints[channels]), out, inputs,
                    checkpoints[channels])

    return make


@pytest.mark.parametrize("mode", list(MODES))
def test_modes_write_pngs_with_their_parameters(made, mode):
    _, image_mode, mask_size, strength, args = MODES[mode]
    run = made(mode)
    result, out, inputs, checkpoint = run.result, run.out, run.inputs, run.checkpoint
    succeeded(result)
    assert result.stdout.startswith(f"{mode.removesuffix('-4-channel').removesuffix('-9-channel')}, 64x48, 2 steps")
    seed = args[args.index("--seed") + 1]
    assert result.stdout.endswith(f"wrote {out} (seed {seed})\n")
    assert pixels(out).shape == (48, 64, 3)  # the init image's 70x53, rounded down to multiples of 8
    assert os.listdir(out.parent) == ["image.png"]  # no temporary file left
    if image_mode:
        assert f"note: init image {inputs[0]} is 70x53; resized to 64x48" in result.stderr
    if mask_size == (35, 26):
        assert f"note: mask {inputs[1]} is 35x26; resized to 64x48" in result.stderr

    lines = parameters(out).split("\n")
    settings = (f"Steps: 2, Sampler: dpmpp_2m_karras, CFG scale: 7.5, Seed: {seed}, Size: 64x48, "
                f"Model hash: {sha256(checkpoint)[:10]}, Model: {checkpoint.stem}")
    if strength:
        settings += f", Denoising strength: {strength}, Init image: ../{inputs[0].name}"  # from the PNG's folder
    if mask_size:
        settings += f", Mask: ../{inputs[1].name}"
    if mode == "text-to-image":
        assert lines == ["a red bicycle, golden hour", "Negative prompt: blurry: café ☕", settings]
    else:
        assert lines == [args[1], settings]


@pytest.mark.parametrize("mode", ["text-to-image", "inpainting-9-channel"])
def test_from_png_regenerates_bit_for_bit(made, mode):
    first = made(mode)
    again = first.out.with_name("again.png")
    succeeded(run_cli("--from-png", first.out, "--output", again, checkpoint=first.checkpoint))
    assert np.array_equal(pixels(again), pixels(first.out))
    assert parameters(again) == parameters(first.out)


def test_from_png_finds_the_init_image_from_anywhere(made, tmp_path):
    first = made("inpainting-9-channel")
    again = first.out.with_name("from-elsewhere.png")
    succeeded(run_cli("--from-png", first.out, "--output", again, checkpoint=first.checkpoint, cwd=tmp_path))
    assert np.array_equal(pixels(again), pixels(first.out))


def test_flags_override_the_png(made, tmp_path):
    first, second = made("text-to-image"), tmp_path / "second.png"
    succeeded(run_cli("--from-png", first.out, "--seed", "2", "--sampler", "euler", "--output", second,
                      checkpoint=first.checkpoint))
    assert parameters(second) == parameters(first.out).replace("Sampler: dpmpp_2m_karras", "Sampler: euler").replace(
        "Seed: 7", "Seed: 2")
    assert not np.array_equal(pixels(first.out), pixels(second))


def test_num_images_writes_numbered_files_with_consecutive_seeds(tmp_path, checkpoints):
    result = succeeded(run_cli("--prompt", "a fox", "--num-images", "2", "--seed", "5", *SIZE,
                               "--output", tmp_path / "fox.png", checkpoint=checkpoints[4]))
    assert sorted(os.listdir(tmp_path)) == ["fox-1.png", "fox-2.png"]
    assert result.stdout.splitlines()[1:] == [f"wrote {tmp_path / 'fox-1.png'} (seed 5)",
                                              f"wrote {tmp_path / 'fox-2.png'} (seed 6)"]
    assert "Seed: 5," in parameters(tmp_path / "fox-1.png") and "Seed: 6," in parameters(tmp_path / "fox-2.png")
    assert not np.array_equal(pixels(tmp_path / "fox-1.png"), pixels(tmp_path / "fox-2.png"))


def test_existing_file_is_kept_unless_overwrite(tmp_path, checkpoints):
    out = tmp_path / "out.png"
    out.write_bytes(b"precious")
    result = succeeded(run_cli("--prompt", "a boat", *SIZE, "--output", out, checkpoint=checkpoints[4]))
    assert f"note: {out} exists; writing {tmp_path / 'out-1.png'} instead (--overwrite replaces)" in result.stderr
    assert out.read_bytes() == b"precious" and pixels(tmp_path / "out-1.png").shape == (48, 64, 3)

    succeeded(run_cli("--prompt", "a boat", *SIZE, "--output", out, "--overwrite", checkpoint=checkpoints[4]))
    assert pixels(out).shape == (48, 64, 3)
    assert sorted(os.listdir(tmp_path)) == ["out-1.png", "out.png"]


def test_a_file_that_appears_during_the_run_is_kept(tmp_path):
    """The name is claimed when the image is written, not only checked before: another run's file that
    took the name meanwhile is kept, and this image goes to the next free numbered name."""
    out = tmp_path / "out.png"
    out.write_bytes(b"made by another run meanwhile")
    (tmp_path / "out-1.png").write_bytes(b"and another")
    image = Image.new("RGB", (8, 8), "red")
    written = write_png(image, out, "a boat\nSteps: 1", overwrite=False)
    assert written == tmp_path / "out-2.png" and pixels(written).shape == (8, 8, 3)
    assert out.read_bytes() == b"made by another run meanwhile"
    assert sorted(os.listdir(tmp_path)) == ["out-1.png", "out-2.png", "out.png"]  # no temporary file left
    assert write_png(image, out, "a boat\nSteps: 1", overwrite=True) == out and pixels(out).shape == (8, 8, 3)


def test_help_documents_every_flag_with_its_default():
    result = subprocess.run([sys.executable, ROOT / "run_demo.py", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: python run_demo.py")
    options = result.stdout.split("\noptions:\n")[1]
    entries = [" ".join(entry.split()) for entry in re.split(r"^  (?=-)", options, flags=re.M)[1:]]  # unwrapped
    assert [entry.split()[0].rstrip(",") for entry in entries] == [
        "-h", "--prompt", "--negative-prompt", "--checkpoint", "--image", "--mask", "--invert", "--strength", "--steps",
        "--guidance-scale", "--sampler", "--seed", "--width", "--height", "--clip-skip", "--embedding", "--lora",
        "--hires-scale", "--hires-strength", "--hires-steps", "--hires-upscaler", "--deep-cache", "--deep-cache-branch",
        "--tome", "--prediction", "--original-size", "--crop", "--target-size", "--refiner", "--refiner-switch",
        "--aesthetic-score", "--negative-aesthetic-score", "--compile", "--num-images", "--device", "--dtype",
        "--output", "--overwrite", "--no-progress", "--tiled-decode", "--from-png"]
    for entry in entries[1:]:
        assert "(default: " in entry, entry
    assert all(name in options for name in SAMPLERS)


def test_empty_prompt_to_the_default_output(tmp_path, checkpoints):
    """An empty prompt makes an unconditional image; by default it goes to outputs/<date>-<time>.png."""
    result = succeeded(run_cli("--prompt", "", *SIZE, checkpoint=checkpoints[4], cwd=tmp_path))
    [name] = os.listdir(tmp_path / "outputs")
    assert re.fullmatch(r"\d{8}-\d{6}\.png", name) and f"wrote outputs/{name} (seed " in result.stdout
    assert result.stderr == "" and parameters(tmp_path / "outputs" / name).startswith("\nSteps: 2, ")


def test_a_long_prompt_is_read_whole(tmp_path, checkpoints):
    """Past CLIP's 75 tokens the prompt goes on in another chunk (sd.prompt): no warning, and its last
    words change the image."""
    short = "a castle on a hill " * 15  # 75 tokens
    for name, prompt in (("short", short), ("long", short + "with seven purple dragons")):
        result = succeeded(run_cli("--prompt", prompt, *SIZE, "--seed", "3", "--output", tmp_path / f"{name}.png",
                                   checkpoint=checkpoints[4]))
        assert result.stderr == ""
    assert not np.array_equal(pixels(tmp_path / "short.png"), pixels(tmp_path / "long.png"))


def test_default_checkpoint_falls_back_to_ckpt(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_tiny_checkpoint(data / "v1-5-pruned-emaonly.ckpt")
    monkeypatch.setattr(run_demo, "DATA_DIR", data)
    out = tmp_path / "out.png"
    assert run_demo.main(["--prompt", "a tree", "--steps", "1", *SIZE, "--output", str(out), "--no-progress"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert parameters(out).endswith(", Model: v1-5-pruned-emaonly")


def test_model_hash_is_cached_beside_the_checkpoint(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights")
    digest = sha256(checkpoint)
    assert model_hash(checkpoint) == digest[:10]
    sidecar = tmp_path / "model.safetensors.sha256"
    assert sidecar.read_text() == f"{digest}  model.safetensors\n"  # sha256sum's format

    sidecar.write_text(f"{'ab' * 32}  model.safetensors\n")  # a cached digest is trusted while it is current ...
    assert model_hash(checkpoint) == "ab" * 5
    checkpoint.write_bytes(b"other weights")  # ... and recomputed once the file changes
    assert model_hash(checkpoint) == sha256(checkpoint)[:10]


def test_reads_automatic1111_parameters(tmp_path):
    text = ('masterpiece, a "quoted" word\nsecond line\nNegative prompt: ugly\nSteps: 30, Sampler: DPM++ 2M Karras, '
            'CFG scale: 6, Seed: 42, Size: 512x768, Model hash: abcdef0123, Model: v1-5-pruned-emaonly, '
            'Lora hashes: "a: 1, b: 2", Denoising strength: 0.5, Hires upscale: 2, Refiner: sd_xl_refiner_1.0 '
            '[7440042bbd], Refiner switch at: 0.8, Version: v1.10.1')
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    assert run_demo.read_parameters(tmp_path / "a1111.png") == {
        "prompt": 'masterpiece, a "quoted" word\nsecond line', "negative_prompt": "ugly", "steps": 30,
        "sampler": "dpmpp_2m_karras", "guidance_scale": 6.0, "seed": 42, "width": 512, "height": 768,
        "model_hash": "abcdef0123", "model": "v1-5-pruned-emaonly", "lora_hashes": {"a": "1", "b": "2"},
        "hires_scale": 2.0, "hires_strength": 0.5,  # a strength without init image: the hires fix's
        "refiner_model": "sd_xl_refiner_1.0", "refiner_hash": "7440042bbd", "refiner_switch": 0.8}
