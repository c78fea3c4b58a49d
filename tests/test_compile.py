"""torch.compile (`StableDiffusion.compile`, `--compile`): the compiled UNet and VAE decoder give the eager
images within float rounding, DeepCache and token merging included; where no C++ compiler works, one
line `warning: ...` and the uncompiled image."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sd.pipeline import StableDiffusion
from sd.unet import UNetConfig
from sd.vae import VAEConfig
from tests.tiny import TINY_CLIP, write_tiny_checkpoint

pytestmark = pytest.mark.slow  # compiling takes minutes on a CPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smallest networks with every kind of block (compiling costs time per block, not per weight): a UNet of
# two levels, attention on the first, one res block each; a VAE of the four levels its factor 8 needs.
SMALL = dict(unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0,),
                             context_dim=TINY_CLIP.width),
             vae=VAEConfig(base_channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1))
# The same image in both tests, so that one compile serves both (Inductor's disk cache); DeepCache and token
# merging make the UNet's full and shallow calls, merging tokens.
OPTIONS = dict(steps=3, seed=1, width=64, height=48, deep_cache=2, token_merging=0.5)
FLAGS = ["--steps", "3", "--seed", "1", "--width", "64", "--height", "48", "--deep-cache", "2", "--tome", "0.5"]


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_equals_eager(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "tiny.safetensors", **SMALL)
    expected = StableDiffusion.from_checkpoint(path).text_to_image("a cat", output_type="np", progress=False, **OPTIONS)
    compiled = StableDiffusion.from_checkpoint(path)
    assert compiled.compile()
    before = graphs()
    images = compiled.text_to_image("a cat", output_type="np", progress=False, **OPTIONS)
    assert graphs() >= before + 3  # compiled code ran: the UNet's full and shallow calls and the decoder
    assert np.abs(images - expected).max() < 1e-4, np.abs(images - expected).max()


def start_cli(tmp_path, name: str, *flags: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run_demo.py", "--checkpoint", str(tmp_path / "tiny.safetensors"),
                             "--prompt", "a cat", "--no-progress", "--output", str(tmp_path / name),
                             *FLAGS, *flags],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_the_command_line_compiles_or_warns_and_runs_uncompiled(tmp_path):
    write_tiny_checkpoint(tmp_path / "tiny.safetensors", **SMALL)
    cache = tmp_path / "inductor-cache"  # empty: nothing compiled before can stand in for the compiler
    # Independent runs (each its own output file; the last its own empty cache), so they run at once: most of
    # each is starting Python and importing torch, which leaves the other core idle.
    runs = [start_cli(tmp_path, "eager.png"), start_cli(tmp_path, "compiled.png", "--compile"),
            start_cli(tmp_path, "uncompiled.png", "--compile", CXX="/nonexistent/c++",
                      TORCHINDUCTOR_CACHE_DIR=str(cache))]
    eager, compiled, missing = (finish(run) for run in runs)
    assert eager.returncode == compiled.returncode == 0, (eager.stderr, compiled.stderr)
    assert "note: --compile: the UNet and the VAE decoder compile during the first image" in compiled.stderr
    assert compiled.stdout.splitlines()[-1].startswith(f"wrote {tmp_path / 'compiled.png'} (seed 1, ")
    pixels = {name: np.asarray(Image.open(tmp_path / name), dtype=int) for name in ("eager.png", "compiled.png")}
    assert np.abs(pixels["compiled.png"] - pixels["eager.png"]).max() <= 1

    assert missing.returncode == 0, missing.stderr
    warnings = [line for line in missing.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: torch.compile cannot run on cpu here (") and \
        "the models stay uncompiled" in warnings[0], missing.stderr
    assert "Traceback" not in missing.stderr
    assert (tmp_path / "uncompiled.png").read_bytes() == (tmp_path / "eager.png").read_bytes()
