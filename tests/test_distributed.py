"""Several processes (torchrun, gloo on the CPU): two processes of half the batch each train what one process
with the whole batch trains (DDP averages the gradients; every process draws the whole batch's random numbers
and takes its part), a two-process state resumes in one process, and a world size that does not divide the
batch is refused before any process group is joined."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sd import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def init(micro_init):
    return micro_init


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """kohya's folder: 4 images of '2_sks', two of them with their own caption."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "2_sks shape"
    folder.mkdir()
    for i, colour in enumerate(["red", "blue", "green", "yellow"]):
        Image.new("RGB", (40, 32), colour).save(folder / f"{i}.png")
        if i % 2:
            (folder / f"{i}.txt").write_text(f"sks shape, {colour}")
    return root


def lora_args(init, data, run_dir, steps: int) -> list[str]:
    return ["lora", "--init", str(init), "--data", str(data), "--resolution", "32", "--bucket-step", "8",
            "--batch-size", "4", "--steps", str(steps), "--lr", "1e-2", "--rank", "2", "--device", "cpu",
            "--no-progress", "--run-dir", str(run_dir), "--output", str(run_dir / "lora.safetensors")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "sd.train", *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def close(a: dict, b: dict) -> None:
    """Equal up to the order of the gradient sums: Adam divides by a gradient's size, so a near-zero one's rounding
    moves a weight by up to ~1e-5 here, while a wrong share of the batch moves it by about --lr (1e-2)."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")


def test_two_processes_train_what_one_process_trains_with_the_whole_batch(init, images, tmp_path):
    two = torchrun(2, lora_args(init, images, tmp_path / "two", 3))
    assert two.returncode == 0, two.stderr
    assert train.main(lora_args(init, images, tmp_path / "one", 3)) == 0
    a, b = load_file(tmp_path / "two" / "lora.safetensors"), load_file(tmp_path / "one" / "lora.safetensors")
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in a.items())  # it trained
    close(a, b)


def test_a_two_process_state_resumes_in_one_process(init, images, tmp_path):
    two = torchrun(2, lora_args(init, images, tmp_path / "run", 2))
    assert two.returncode == 0, two.stderr
    assert train.main([*lora_args(init, images, tmp_path / "run", 4), "--resume"]) == 0
    assert train.main(lora_args(init, images, tmp_path / "straight", 4)) == 0
    close(load_file(tmp_path / "run" / "lora.safetensors"), load_file(tmp_path / "straight" / "lora.safetensors"))


def test_a_world_size_that_does_not_divide_the_batch_is_refused_before_joining(init, images, tmp_path, monkeypatch,
                                                                                capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    assert train.main(lora_args(init, images, tmp_path / "run", 2)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch-size 4 cannot be split among torchrun's 3 processes" in err
    assert not (tmp_path / "run").exists()
