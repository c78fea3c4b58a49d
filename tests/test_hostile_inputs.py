"""Numbers held to their ranges (`sd.settings.RANGES`, `check_range`) on the three ways in: the library's
arguments, the command line's flags and a PNG's parameters through --from-png. Every value of the family
(NaN, inf, 1e308, huge and negative whole numbers, past either end, wrong types) is one SettingError or one
`error:` line before any work: no model is loaded (the checkpoint named does not even exist). The memory
budget (`sd.devices.memory_budget`): the process's address-space limit and its cgroup's, not only the
machine's free memory, and images made at once."""

import math
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import run_demo
from sd import devices
from sd.errors import InputError, SettingError
from sd.outputs import write_png
from sd.pipeline import StableDiffusion
from sd.settings import MAX_SIDE, RANGES, check_hires, check_upscaled, settle
from tests.tiny import write_tiny_checkpoint

NON_FINITE = [math.nan, math.inf, -math.inf, 1e308, -1e308]
HUGE_WHOLE = [2**70, -(2**70), 10**400, -(10**400)]
WRONG_TYPES = ["1", True, 1j, [1], b"1"]


def past_the_ends(name: str) -> list:
    """Values just outside the row's range, and one that is not a whole number where it must be."""
    bounds = RANGES[name]
    step = 1 if bounds.whole else 0.01
    return ([bounds.low - step * (not bounds.above), bounds.high + step * (not bounds.below), -1e308]
            + [1.5] * bounds.whole)


def bad_values(name: str) -> list:
    return NON_FINITE + HUGE_WHOLE + WRONG_TYPES + past_the_ends(name)


IMAGE = Image.new("RGB", (16, 16))
NEEDS = {"strength": {"image": IMAGE}}  # what a setting needs beside it to be read
HIRES = {"hires_scale": 2.0, "hires_strength": 0.5, "hires_steps": None}
LORA = "lora_weight"  # read by load_lora and the tags, not by settle
REFINER = "refiner_switch"  # read by generate, where a refiner is given
SETTLED = [name for name in RANGES if name not in HIRES and name not in (LORA, REFINER)]


@pytest.mark.parametrize("name, value", [(name, value) for name in SETTLED for value in bad_values(name)],
                         ids=lambda v: repr(v)[:20])
def test_the_library_refuses_a_number_out_of_range(name, value):
    with pytest.raises(SettingError, match=f"^{name} must be "):
        settle("a fox", image_size=64, **NEEDS.get(name, {}), **{name: value})


@pytest.mark.parametrize("name, value", [(name, value) for name in HIRES for value in bad_values(name)],
                         ids=lambda v: repr(v)[:20])
def test_the_hires_fix_refuses_a_number_out_of_range(name, value):
    settings = HIRES | {name: value}
    with pytest.raises(SettingError, match=f"^{name} must be "):
        check_hires(settings["hires_scale"], settings["hires_strength"], settings["hires_steps"], "latent", 1000)


@pytest.fixture(scope="module")
def sdxl_and_refiner(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    return [StableDiffusion.from_checkpoint(write_tiny_checkpoint(folder / f"{family}.safetensors", family=family))
            for family in ("sdxl", "sdxl-refiner")]


@pytest.mark.parametrize("value", bad_values(REFINER), ids=lambda v: repr(v)[:20])
def test_a_refiner_switch_out_of_range_is_refused(sdxl_and_refiner, value):
    base, refiner = sdxl_and_refiner
    with pytest.raises(SettingError, match=f"^{REFINER} must be "):
        base.text_to_image("a fox", width=64, height=64, steps=2, refiner=refiner, refiner_switch=value,
                           progress=False)


def test_a_refiner_switch_without_a_refiner_is_refused(sdxl_and_refiner):
    with pytest.raises(SettingError, match=f"^{REFINER} says when a refiner takes over; give refiner"):
        sdxl_and_refiner[0].text_to_image("a fox", width=64, height=64, steps=2, refiner_switch=0.5, progress=False)


MICRO = {"original_size": (512, 512), "crop": (8, 0), "target_size": (64, 64), "aesthetic_score": 7.0,
         "negative_aesthetic_score": 2.0}
NOT_TAKEN = [(0, name) for name in MICRO] + [(1, "aesthetic_score"), (1, "negative_aesthetic_score"), (2, "target_size")]


@pytest.mark.parametrize("model, name", NOT_TAKEN, ids=[f"{['sd1', 'sdxl', 'refiner'][m]}-{n}" for m, n in NOT_TAKEN])
def test_a_micro_condition_the_model_does_not_take_is_refused(sdxl_and_refiner, tmp_path_factory, model, name):
    """Not silently ignored: SD v1 takes no micro-condition, SDXL's base without a refiner no aesthetic score,
    the refiner no target size."""
    models = [StableDiffusion.from_checkpoint(write_tiny_checkpoint(tmp_path_factory.mktemp("sd1") / "sd1.ckpt")),
              *sdxl_and_refiner] if model == 0 else [None, *sdxl_and_refiner]
    start = dict(image=Image.new("RGB", (64, 64))) if model == 2 else {}
    with pytest.raises(SettingError, match=f"^{name} is a micro-condition of SDXL that this .* does not take"):
        models[model].text_to_image("a fox", width=64, height=64, steps=1, progress=False, **start,
                                    **{name: MICRO[name]})


@pytest.mark.parametrize("width, scale", [(4096, 8), (MAX_SIDE, 1.01), (3000, 6.0)])
def test_an_upscale_past_the_largest_side_is_refused(width, scale):
    with pytest.raises(SettingError, match=f"upscales {width}x64 to .* above {MAX_SIDE} a side"):
        check_upscaled(width, 64, scale)


@pytest.mark.parametrize("name", list(RANGES))
def test_the_ends_of_each_range_are_accepted(name):
    bounds = RANGES[name]
    for value in (bounds.low + (0.5 if bounds.above else 0), min(bounds.high, 512) - (0.5 if bounds.below else 0)):
        assert bounds.holds(value if not bounds.whole else int(value)), value


# flag: (the flags it needs beside it, text values of the flag's type out of range)
FLOATS, WHOLES = ["nan", "inf", "-inf", "1e308", "-1e308"], [str(2**70), str(-(2**70)), "-1"]
FLAGS = {
    "--guidance-scale": ([], FLOATS + ["101"]), "--steps": ([], WHOLES + ["1001"]),
    "--seed": ([], WHOLES + [str(2**64)]), "--width": ([], WHOLES + ["16392"]), "--height": ([], WHOLES + ["0"]),
    "--num-images": ([], WHOLES + ["10001"]), "--deep-cache": ([], WHOLES + ["0"]),
    "--deep-cache-branch": ([], WHOLES), "--tome": ([], FLOATS + ["0.8"]),
    "--hires-scale": ([], FLOATS + ["1", "8.5"]), "--hires-strength": (["--hires-scale", "2"], FLOATS + ["1.01"]),
    "--hires-steps": (["--hires-scale", "2"], WHOLES + ["1001"]),
}


def refused(capsys, args: list[str], fragment: str) -> None:
    assert run_demo.main(["--checkpoint", "no-such-model.safetensors", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert fragment in err, err


@pytest.mark.parametrize("flag, value", [(flag, value) for flag, (_, values) in FLAGS.items() for value in values])
def test_the_command_line_refuses_a_number_out_of_range(capsys, flag, value):
    refused(capsys, ["--prompt", "a fox", *FLAGS[flag][0], f"{flag}={value}"], f"{flag} ")


# a key of the settings line: the values it may hold that are out of range
PNG_FIELDS = {
    "CFG scale": ["nan", "1e30", "-inf"], "Steps": [str(2**70), "-3"], "Seed": ["-5", str(2**64)],
    "Size": ["8x99999999", "0x64", "8x-8"], "Hires upscale": ["1e308", "inf", "100"],
    "Token merging ratio": ["nan", "0.9"], "Deep cache": ["0", str(10**30)], "Clip skip": ["0", str(2**70)],
}


@pytest.mark.parametrize("key, value", [(key, value) for key, values in PNG_FIELDS.items() for value in values])
def test_a_png_s_parameters_out_of_range_are_refused(tmp_path, capsys, key, value):
    line = {"Steps": "4", "Sampler": "Euler a", "CFG scale": "7", "Seed": "1", "Size": "64x64"} | {key: value}
    text = "a fox\n" + ", ".join(f"{k}: {v}" for k, v in line.items())
    png = write_png(Image.new("RGB", (8, 8)), tmp_path / "in.png", text, False)
    refused(capsys, ["--from-png", str(png)], "must be")


# ---- the memory budget ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return StableDiffusion.from_checkpoint(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.safetensors"))


@pytest.mark.parametrize("value", bad_values(LORA), ids=lambda v: repr(v)[:20])
def test_a_lora_weight_out_of_range_is_refused_before_the_file_is_read(tiny, value):
    with pytest.raises(SettingError, match="^weight must be "):
        tiny.load_lora("never-read.safetensors", value)
    assert not tiny.loras.loaded


def test_the_budget_is_the_process_s_address_space_limit():
    """Under `ulimit -v` 8 GiB (far below the machine's free memory), 1536x1536 is refused before loading."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))
    result = subprocess.run([sys.executable, "run_demo.py", "--checkpoint", "no-such-model.safetensors", "--prompt",
                             "x", "--width", "1536", "--height", "1536", "--device", "cpu"], preexec_fn=limit,
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "1536x1536 needs about 9.7 GiB to decode but cpu has" in result.stderr and "free for this process" in result.stderr


@pytest.mark.parametrize("limit, usage, budget", [("1073741824", "536870912", 2**29), ("max", "5", None),
                                                  ("100", "200", 0), ("junk", "1", None)])
def test_the_budget_is_the_cgroup_s_limit_minus_its_usage(tmp_path, monkeypatch, limit, usage, budget):
    (tmp_path / "max").write_text(limit + "\n")
    (tmp_path / "current").write_text(usage + "\n")
    monkeypatch.setattr(devices, "CGROUP_FILES", ((str(tmp_path / "max"), str(tmp_path / "current")),))
    assert devices.cgroup_left() == budget
    if budget is not None:
        assert devices.memory_budget(torch.device("cpu")) <= budget
        with pytest.raises(InputError, match="1024x1024 needs about 4.3 GiB to decode but cpu has 0.[05] GiB free"):
            devices.check_memory(1024, 1024, torch.device("cpu"), torch.float32, False)


def test_the_library_refuses_more_images_at_once_than_memory_holds(tiny):
    before = {key: value.clone() for key, value in tiny.models.unet.state_dict().items()}
    with pytest.raises(InputError, match="10000 images of 512x512 needs about .* make fewer images at once"):
        tiny.text_to_image("a fox", width=512, height=512, num_images=10_000, steps=1, progress=False)
    with pytest.raises(SettingError, match="num_images must be a whole number between 1 and 10000, got 300000"):
        tiny.text_to_image("a fox", num_images=300_000, steps=1, progress=False)
    assert all(torch.equal(value, before[key]) for key, value in tiny.models.unet.state_dict().items())
