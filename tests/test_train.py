"""`python -m sd.train`: the loss falls, --resume continues exactly, caption folders, and bad input.

All on the "micro" preset (32x32 images, the smallest networks of the same architecture)."""

import csv
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sd import train, training
from sd.checkpoint import load_checkpoint
from sd.datasets import CaptionFolder
from sd.errors import InputError

MICRO = ["--preset", "micro", "--no-progress", "--sample-every", "1000"]


def losses(run_dir, stage: str) -> list[float]:
    with open(run_dir / f"{stage}-loss.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both stages of the micro preset, a few hundred steps in all."""
    run_dir = tmp_path_factory.mktemp("micro")
    assert train.main(["all", *MICRO, "--run-dir", str(run_dir), "--output", str(run_dir / "micro.safetensors")]) == 0
    return run_dir


@pytest.mark.parametrize("stage", ["vae", "diffusion"])
def test_a_few_hundred_steps_lower_the_loss(trained, stage):
    values = losses(trained, stage)
    assert len(values) == 150
    first, last = mean(values[:20]), mean(values[-20:])
    assert last < 0.95 * first, (stage, first, last)  # measured: vae 0.66 -> 0.59, diffusion more


def test_the_output_loads_with_its_scale_size_and_vocabulary(trained):
    models = load_checkpoint(trained / "micro.safetensors")
    assert models.image_size == 32 and models.unet.config == train.PRESETS["micro"].unet
    vae_state = torch.load(trained / "vae-state.pt", weights_only=True)
    assert models.scale_factor == pytest.approx(load_checkpoint(trained / "vae.safetensors").scale_factor)
    assert models.scale_factor != 0.18215 and vae_state["step"] == 150
    assert {"red", "circle", "top", "background"} <= set(models.vocabulary)
    assert (trained / "diffusion-loss.png").is_file() and (trained / "diffusion-samples-000150.png").is_file()
    with Image.open(trained / "vae-samples-000150.png") as grid:
        assert grid.size == (8 * 32, 2 * 32)  # originals over reconstructions


def interrupt_at(monkeypatch, step: int):
    original = training.Stage.loss

    def loss(self, s, gen):
        if s == step:
            raise KeyboardInterrupt
        return original(self, s, gen)

    monkeypatch.setattr(training.Stage, "loss", loss)


def test_resume_after_an_interruption_gives_the_same_weights(trained, tmp_path, monkeypatch, capsys):
    args = ["diffusion", *MICRO, "--init", str(trained / "vae.safetensors"), "--text-encoder", "train",
            "--steps", "12", "--save-every", "5"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main([*args, "--run-dir", str(whole), "--output", str(whole / "out.safetensors")]) == 0

    interrupt_at(monkeypatch, 8)
    assert train.main([*args, "--run-dir", str(parts), "--output", str(parts / "out.safetensors")]) == 130
    assert "continue with --resume" in capsys.readouterr().err
    assert torch.load(parts / "diffusion-state.pt", weights_only=True)["step"] == 5  # the last save is intact
    assert not (parts / "out.safetensors").exists()
    monkeypatch.undo()
    assert train.main([*args, "--run-dir", str(parts), "--output", str(parts / "out.safetensors"), "--resume"]) == 0

    a, b = load_file(whole / "out.safetensors"), load_file(parts / "out.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(whole, "diffusion") == losses(parts, "diffusion")


def test_resume_from_another_configuration_is_refused(trained, tmp_path, capsys):
    args = ["diffusion", *MICRO, "--init", str(trained / "vae.safetensors"), "--steps", "2", "--run-dir",
            str(tmp_path), "--output", str(tmp_path / "out.safetensors")]
    assert train.main(args) == 0
    capsys.readouterr()
    before = (tmp_path / "diffusion-state.pt").read_bytes()
    assert train.main([*args, "--resume", "--prediction", "v"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --resume: ") and "differs in: prediction_type" in err
    assert (tmp_path / "diffusion-state.pt").read_bytes() == before


def test_resume_with_a_lower_lr_and_more_steps(trained, tmp_path, capsys):
    """The README's advice after a NaN loss: a lower --lr, then --resume; and --steps extends a finished run."""
    args = ["diffusion", *MICRO, "--init", str(trained / "vae.safetensors"), "--run-dir", str(tmp_path),
            "--output", str(tmp_path / "out.safetensors")]
    assert train.main([*args, "--steps", "2"]) == 0
    capsys.readouterr()
    assert train.main([*args, "--steps", "3", "--lr", "1e-4", "--resume"]) == 0
    assert "note: resuming the diffusion stage at step 2 with lr 0.0001 (was 0.001), steps 3 (was 2)" in \
        capsys.readouterr().err
    assert torch.load(tmp_path / "diffusion-state.pt", weights_only=True)["step"] == 3
    assert [s for s, _ in map(tuple, enumerate(losses(tmp_path, "diffusion")))] == [0, 1, 2]


def test_a_non_finite_loss_stops_keeping_the_last_good_state(trained, tmp_path, monkeypatch, capsys):
    original = training.Stage.loss
    monkeypatch.setattr(training.Stage, "loss",
                        lambda self, s, gen: original(self, s, gen) * (math.nan if s == 7 else 1.0))
    args = ["diffusion", *MICRO, "--init", str(trained / "vae.safetensors"), "--steps", "10", "--save-every", "5",
            "--run-dir", str(tmp_path), "--output", str(tmp_path / "out.safetensors")]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loss became nan at step 7" in err and "state of step 5 is kept" in err
    assert torch.load(tmp_path / "diffusion-state.pt", weights_only=True)["step"] == 5
    assert not (tmp_path / "out.safetensors").exists()


def write_folder(folder, n=3):
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (48, 40), (40 * i, 100, 200)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a  plain\ncolour {i}\n", encoding="utf-8")
    return folder


def test_caption_folder_reads_images_and_captions(tmp_path):
    data = CaptionFolder(write_folder(tmp_path / "set"), image_size=32)
    assert len(data) == 3 and data.captions[1] == "a plain colour 1"
    image, caption, _ = data.sample(4)  # the set repeats
    assert image.size == (32, 32) and caption == "a plain colour 1"


def test_fine_tuning_on_a_folder(trained, tmp_path):
    folder = write_folder(tmp_path / "set")
    (folder / "img0.txt").write_text("a zebra", encoding="utf-8")
    out = tmp_path / "tuned.safetensors"
    assert train.main(["diffusion", *MICRO, "--init", str(trained / "micro.safetensors"), "--data", str(folder),
                       "--steps", "3", "--run-dir", str(tmp_path / "run"), "--output", str(out)]) == 0
    tuned, base = load_checkpoint(out), load_checkpoint(trained / "micro.safetensors")
    assert "zebra" in tuned.vocabulary
    assert torch.equal(tuned.clip.final_layer_norm.weight, base.clip.final_layer_norm.weight)  # frozen by default
    assert not torch.equal(tuned.unet.out[2].weight, base.unet.out[2].weight)


@pytest.mark.parametrize("case", ["missing", "empty", "no_caption", "bad_image", "bad_caption"])
def test_bad_dataset_folders_are_refused_in_one_line(tmp_path, capsys, case):
    folder = tmp_path / "set"
    if case != "missing":
        write_folder(folder, n=0 if case == "empty" else 2)
    if case == "no_caption":
        (folder / "img1.txt").unlink()
    if case == "bad_image":
        (folder / "img1.png").write_bytes(b"not a png")
    if case == "bad_caption":
        (folder / "img1.txt").write_bytes(b"\xff\xfe\x00bad")
    code = train.main(["vae", *MICRO, "--data", str(folder), "--steps", "2", "--run-dir", str(tmp_path / "run"),
                       "--output", str(tmp_path / "out.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert str(folder) in err and "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()


def test_caption_folder_errors_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="holds no images"):
        CaptionFolder(write_folder(tmp_path / "set", n=0), image_size=32)
