"""The training loop's schedule: the warm-up and each schedule's shape, and a finished run extended with
`--resume --steps MORE`, which goes on at the schedule's last rate: the same weights as a run whose schedule
spans the first run's steps trained to MORE steps at once."""

import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file

from sd import train, training
from sd.checkpoint import load_checkpoint

MICRO = ["--preset", "micro", "--save-every", "1000", "--sample-every", "1000", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def init(micro_init):
    return micro_init


@pytest.fixture(autouse=True)
def small_pool(monkeypatch):
    micro = train.PRESETS["micro"]
    monkeypatch.setitem(train.PRESETS, "micro", dataclasses.replace(
        micro, diffusion_stage=dataclasses.replace(micro.diffusion_stage, pool=4)))


def cfg(**kw) -> training.StageConfig:
    return training.StageConfig(**{"steps": 10, "batch_size": 1, "lr": 1.0, "warmup": 2, **kw})


@pytest.mark.parametrize("schedule, last", [("cosine", 0.1), ("linear", 0.1), ("constant", 1.0)])
def test_each_schedule_warms_up_then_falls_to_its_last_rate_and_stays_there(schedule, last):
    c = cfg(schedule=schedule)
    factors = [training.schedule_factor(c, step) for step in range(30)]
    assert factors[:2] == [0.5, 1.0]  # linear warm-up over 2 steps
    assert factors[2] == pytest.approx(1.0)
    assert all(a >= b - 1e-12 for a, b in zip(factors[2:], factors[3:]))  # never rises after the warm-up
    assert factors[10:] == [pytest.approx(last)] * 20  # from the schedule's end on: its last rate
    extended = dataclasses.replace(c, steps=30, schedule_steps=10)
    assert [training.schedule_factor(extended, step) for step in range(30)] == factors


def test_cosine_is_the_half_cosine_to_a_tenth():
    c = cfg(warmup=0, steps=100)
    for step in (0, 25, 50, 75):
        assert training.schedule_factor(c, step) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * step / 100)))


def test_a_finished_run_extended_goes_on_at_the_schedules_last_rate(init, tmp_path, capsys):
    args = ["diffusion", *MICRO, "--init", str(init), "--lr-schedule", "cosine", "--warmup", "1",
            "--run-dir", str(tmp_path), "--output", str(tmp_path / "out.safetensors")]
    assert train.main([*args, "--steps", "3"]) == 0
    capsys.readouterr()
    assert train.main([*args, "--steps", "5", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "steps 5 (was 3); steps past 3 run at the schedule's last learning rate" in err

    parsed = train.parse_args([*args, "--steps", "5"])
    parsed.prediction = "epsilon"
    models = load_checkpoint(init)
    stage_cfg = dataclasses.replace(train.stage_config(train.PRESETS["micro"], "diffusion", parsed), schedule_steps=3)
    parsed.run_dir = tmp_path / "at-once"
    parsed.run_dir.mkdir()
    at_once = training.Stage("diffusion", models, train.dataset(parsed, models.image_size), stage_cfg, parsed).run(False)
    extended = load_file(tmp_path / "out.safetensors")
    ours = {k: v for k, v in at_once.unet.state_dict().items()}
    assert all(torch.equal(extended["model.diffusion_model." + k], v) for k, v in ours.items())
