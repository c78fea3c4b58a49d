"""Every mistake a user can make with `python run_demo.py` is answered by one line `error: ...` on stderr
that names the value and the fix, exit status 2, no traceback, and no file in the output folder; Ctrl-C
exits with status 130 and leaves no partial file; a failed write leaves none either."""

import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import run_demo
from sd.checkpoint import read_state_dict
from sd.errors import InputError, SDError
from sd.pipeline import StableDiffusion
from tests.bad_files import BAD_FILES
from tests.tiny import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    return {4: write_tiny_checkpoint(folder / "tiny.safetensors"),
            9: write_tiny_checkpoint(folder / "tiny-inpainting.safetensors", in_channels=9)}


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """The output folder; each test checks it is still empty."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def command(*args) -> list[str]:
    return [sys.executable, str(ROOT / "run_demo.py"), "--no-progress", *map(str, args)]


def assert_refused(result: subprocess.CompletedProcess, out_dir: Path, *fragments: str, status: int = 2) -> None:
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr and "wrote" not in result.stdout
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert os.listdir(out_dir) == []


def refused(out_dir: Path, *args, fragments=(), status: int = 2) -> None:
    result = subprocess.run(command("--output", out_dir / "image.png", *args), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert_refused(result, out_dir, *fragments, status=status)


def write_image(path: Path, size=(64, 48)) -> Path:
    Image.new("RGB", size, "gray").save(path)
    return path


# ---- the checkpoint -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["missing", "truncated_safetensors", "truncated_ckpt", "garbage_ckpt", "no_tensors",
                                  "other_model", "sd2_partial_tower", "sd2_unfused_in_proj", "sd2_no_tower", "sdxl", "malicious"])
def test_bad_checkpoint(tmp_path, out_dir, name):
    make, _, fragment = BAD_FILES[name]
    folder = tmp_path / "in"
    folder.mkdir()
    path = make(folder)
    refused(out_dir, "--prompt", "a cat", "--checkpoint", path, fragments=(str(path), fragment))
    assert not (folder / "pwned").exists()  # the malicious pickle's code never ran


def test_missing_default_checkpoint_says_what_to_get(tmp_path, out_dir, monkeypatch, capsys):
    monkeypatch.setattr(run_demo, "DATA_DIR", tmp_path / "data")
    assert run_demo.main(["--prompt", "a cat", "--output", str(out_dir / "image.png")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: checkpoint not found: {tmp_path}/data/v1-5-pruned-emaonly.safetensors. Download "
                   f"v1-5-pruned-emaonly.safetensors (the official Stable Diffusion v1.5 weights, from the "
                   f"stable-diffusion-v1-5 repository on Hugging Face) and put it in {tmp_path}/data/, or pass "
                   f"--checkpoint PATH.\n")
    assert os.listdir(out_dir) == []


def test_non_finite_weights_are_refused_before_sampling(tmp_path, out_dir):
    """A checkpoint with an inf weight (here in the decoder) is refused when read, naming the key; no image."""
    from tests.compvis import VAE_PREFIX, save_checkpoint
    from tests.tiny import tiny_compvis_state
    state = tiny_compvis_state()
    state[VAE_PREFIX + "decoder.conv_out.bias"][0] = float("inf")
    path = save_checkpoint(state, tmp_path / "overflowing.safetensors")
    refused(out_dir, "--prompt", "a cat", "--checkpoint", path, "--steps", "1", "--width", "64", "--height", "64",
            fragments=(VAE_PREFIX + "decoder.conv_out.bias holds inf values", "get a trusted copy"))


def test_inpainting_checkpoint_needs_a_mask(out_dir, checkpoints):
    refused(out_dir, "--prompt", "a cat", "--checkpoint", checkpoints[9], "--steps", "1", "--width", "64",
            "--height", "64", fragments=("inpainting checkpoint", "--mask"))


# ---- arguments ------------------------------------------------------------------------------------

BAD_ARGUMENTS = {  # name: (arguments, fragments of the message); {ckpt}, {tmp}, {image} are filled in
    "width_not_multiple_of_8": (["--width", "100"], ["--width must be a positive multiple of 8 up to 16384, got 100"]),
    "height_zero": (["--height", "0"], ["--height must be a positive multiple of 8 up to 16384, got 0"]),
    "too_large": (["--width", "16384", "--height", "16384"], ["16384x16384 needs about", "GiB free",
                                                               "lower --width and --height"]),
    "zero_steps": (["--steps", "0"], ["--steps must be a whole number between 1 and 1000, got 0"]),
    "too_many_steps": (["--steps", "1001"], ["--steps must be a whole number between 1 and 1000, got 1001"]),
    "steps_not_a_number": (["--steps", "ten"], ["argument --steps: invalid int value: 'ten'", "--help"]),
    "strength_above_1": (["--image", "{image}", "--strength", "1.5"], ["--strength must be between 0 and 1, got 1.5"]),
    "strength_without_image": (["--strength", "0.5"], ["--strength 0.5 needs --image"]),
    "unknown_sampler": (["--sampler", "k_euler"], ["unknown sampler 'k_euler'", "ddim", "dpmpp_2m_karras", "euler_a"]),
    "mask_without_image": (["--mask", "{image}"], ["--mask needs --image: the image to inpaint"]),
    "missing_image": (["--image", "{tmp}/nowhere.png"], ["init image not found: {tmp}/nowhere.png"]),
    "unreadable_image": (["--image", "{tmp}/garbage.png"], ["cannot read init image {tmp}/garbage.png"]),
    "decompression_bomb": (["--image", "{tmp}/bomb.png"], ["cannot read init image {tmp}/bomb.png",
                                                          "decompression bomb"]),
    "output_is_a_folder": (["--output", "{tmp}"], ["--output {tmp} is a folder"]),
    "missing_mask": (["--image", "{image}", "--mask", "{tmp}/nowhere.png"], ["mask not found: {tmp}/nowhere.png"]),
    "unknown_device": (["--device", "tpu"], ["device 'tpu' is unknown or not available", "use one of: cpu"]),
    "fp16_on_cpu": (["--device", "cpu", "--dtype", "fp16"],
                    ["fp16 is slow and inaccurate on the CPU; use --dtype bf16 or fp32"]),
    "unknown_dtype": (["--dtype", "float8"], ["argument --dtype: invalid choice: 'float8'"]),
    "negative_seed": (["--seed", "-1"], ["--seed must be between 0 and 2**64-1, got -1"]),
    "no_images": (["--num-images", "0"], ["--num-images must be a whole number between 1 and 10000, got 0"]),
    "too_many_images": (["--num-images", "100000000"], ["--num-images must be a whole number between 1 and 10000, got 100000000"]),
    "seed_runs_past_the_end": (["--seed", "18446744073709551615", "--num-images", "2"],
                               ["--seed 18446744073709551615 with --num-images 2 runs past 2**64-1"]),
    "guidance_not_a_number": (["--guidance-scale", "nan"], ["--guidance-scale must be between -100 and 100, got nan"]),
    "prompt_with_the_negative_mark": (["--prompt", "a cat\nNegative prompt: dogs"],
                                      ["--prompt holds a line starting 'Negative prompt:'", "--negative-prompt"]),
    "unknown_flag": (["--cfg", "7"], ["unrecognized arguments: --cfg 7"]),
    "output_in_missing_folder": (["--output", "{tmp}/no/such/image.png"],
                                 ["output folder {tmp}/no/such does not exist"]),
    "output_not_png": (["--output", "{tmp}/out/image.jpg"], ["--output {tmp}/out/image.jpg must end in .png"]),
    "from_png_missing": (["--from-png", "{tmp}/nowhere.png"], ["--from-png {tmp}/nowhere.png not found"]),
    "from_png_without_parameters": (["--from-png", "{image}"], ["{image} holds no generation parameters"]),
}


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_bad_argument(tmp_path, out_dir, checkpoints, name):
    args, fragments = BAD_ARGUMENTS[name]
    image = write_image(tmp_path / "image.png")
    (tmp_path / "garbage.png").write_bytes(b"<html>404</html>")
    (tmp_path / "bomb.png").write_bytes(png_header(40_000, 40_000))  # 1.6 G pixels announced in 45 bytes
    fill = {"ckpt": checkpoints[4], "tmp": tmp_path, "image": image}
    prompt = [] if name.startswith("from_png") else ["--prompt", "a cat"]
    refused(out_dir, *prompt, "--checkpoint", checkpoints[4], *(a.format(**fill) for a in args),
            fragments=[f.format(**fill) for f in fragments])


def png_header(width: int, height: int) -> bytes:
    """The start of a PNG announcing width x height RGB pixels: its signature, IHDR and an empty IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", b"")


def test_prompt_that_is_not_unicode(out_dir, checkpoints):
    result = subprocess.run([*command("--checkpoint", checkpoints[4], "--output", out_dir / "image.png"), "--prompt",
                             b"caf\xe9"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_refused(result, out_dir, "--prompt holds characters that are not valid Unicode", "give UTF-8 text")


def test_a_png_cannot_name_a_model_outside_the_data_folder():
    """--from-png's "Model" picks data/<Model>.safetensors when no --checkpoint is given: a forged path is refused."""
    with pytest.raises(InputError, match=r"--from-png names '../../elsewhere/model', which is not a file name in"):
        run_demo.default_checkpoint("../../elsewhere/model")


def test_an_unreadable_input_is_the_input_s_fault(tmp_path, monkeypatch, capsys):
    """An input that exists but cannot be read (here a folder posing as a file) is named as the input."""
    folder = tmp_path / "model.ckpt"
    folder.mkdir()
    monkeypatch.setattr(Path, "is_file", lambda self: True)
    with pytest.raises(SDError, match=f"cannot read checkpoint {folder}: Is a directory"):
        read_state_dict(folder)


def test_prompt_is_required(out_dir, checkpoints):
    refused(out_dir, "--checkpoint", checkpoints[4], fragments=["give --prompt TEXT", "--from-png PNG"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(out_dir, checkpoints):
    refused(out_dir, "--prompt", "a cat", "--checkpoint", checkpoints[4], "--device", "cuda",
            fragments=["device 'cuda' is unknown or not available on this machine; use one of: cpu"])


def test_output_folder_not_writable(tmp_path, checkpoints):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root may write anywhere but in a read-only file system
        folder = Path("/sys")
    result = subprocess.run(command("--prompt", "a cat", "--checkpoint", checkpoints[4], "--output",
                                    folder / "image.png"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_refused(result, tmp_path / "read-only", f"cannot write into the folder of --output {folder}",
                   "choose a folder you can write to")


# ---- interruptions and failures -------------------------------------------------------------------

def test_ctrl_c_leaves_no_file(out_dir, checkpoints):
    process = subprocess.Popen(command("--prompt", "a cat", "--checkpoint", checkpoints[4], "--steps", "1000",
                                       "--width", "64", "--height", "64", "--output", out_dir / "image.png"),
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # Ctrl-C as in a terminal, also when the test run itself was started in the
                               # background (`cmd &` without job control ignores SIGINT, and children inherit it)
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert process.stdout.readline().startswith("text-to-image, 64x64, 1000 steps")  # generating now
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert_refused(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), out_dir,
                   "interrupted", status=130)


@pytest.mark.parametrize("exception, status", [(KeyboardInterrupt(), 130), (OSError(28, "No space left on device"), 1)])
def test_failure_while_writing_leaves_no_file(out_dir, checkpoints, monkeypatch, capsys, exception, status):
    def save_that_fails(image, path, format=None, **options):
        Path(path).write_bytes(b"half a PNG")
        raise exception

    monkeypatch.setattr(Image.Image, "save", save_that_fails)
    out = out_dir / "image.png"
    assert run_demo.main(["--prompt", "a cat", "--checkpoint", str(checkpoints[4]), "--steps", "1", "--width", "64",
                          "--height", "64", "--output", str(out), "--no-progress"]) == status
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert os.listdir(out_dir) == []


def test_out_of_memory_is_one_line(out_dir, checkpoints, monkeypatch, capsys):
    def generate(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(StableDiffusion, "generate", generate)
    assert run_demo.main(["--prompt", "a cat", "--checkpoint", str(checkpoints[4]), "--output",
                          str(out_dir / "image.png")]) == 2
    assert capsys.readouterr().err == "error: out of GPU memory; lower --width and --height\n"
    assert os.listdir(out_dir) == []
