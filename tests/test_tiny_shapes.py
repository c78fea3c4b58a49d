"""Tests of meaning: the shipped tiny model (`data/tiny-shapes.safetensors`, trained by `sd.train`) draws
what its prompts say, read back by the image checker of `tests/shapes_checker.py`.

Thresholds sit below the figures measured on the shipped file (`benchmarks/RESULTS.md`, measured
by `python -m benchmarks.tiny_shapes` on 200 images each: colour 99.5%, shape 81%, position 99.5%),
far above chance: 1/8 for colour, 1/5 for shape and position.

The v-prediction model is the shipped one fine-tuned by `sd.train --prediction v` in the test (`V_FINE_TUNE`,
150 steps, about a minute on 2 cores): 17 MB in fp16 would double the repository's weights for what a minute
of training gives. Its thresholds sit below the figures measured on the same command's output by
`python -m benchmarks.tiny_shapes --model runs/tiny-shapes-v.safetensors --samplers`."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from sd import train
from sd.datasets import Scene, render
from sd.pipeline import StableDiffusion
from sd.samplers import SAMPLERS
pytest.importorskip("scipy")  # the image checker's tool
from tests.shapes_checker import adherence, prompt_of, read, scenes  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "data" / "tiny-shapes.safetensors"


V_FINE_TUNE = ["diffusion", "--init", str(MODEL), "--prediction", "v", "--steps", "150", "--batch-size", "32",
               "--lr", "5e-4", "--no-progress", "--sample-every", "1000"]


@pytest.fixture(scope="module")
def pipe():
    return StableDiffusion.from_checkpoint(MODEL)


@pytest.fixture(scope="module")
def v_model(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tiny-shapes-v")
    assert train.main([*V_FINE_TUNE, "--run-dir", str(run_dir), "--output", str(run_dir / "v.safetensors")]) == 0
    return run_dir / "v.safetensors"


@pytest.fixture(scope="module")
def v_pipe(v_model):
    return StableDiffusion.from_checkpoint(v_model)


BOTH_MODELS = ["pipe", pytest.param("v_pipe", marks=pytest.mark.slow)]


def test_the_shipped_model_is_what_the_demo_expects(pipe):
    assert MODEL.stat().st_size <= 30 * 2**20
    assert pipe.models.image_size == 64 and pipe.models.scale_factor != 0.18215
    assert pipe.unseen_words("a large red circle in the top left") == []
    assert pipe.unseen_words("an astronaut riding a horse") == ["astronaut", "riding", "horse"]


def test_seen_pairs_are_drawn_as_prompted(pipe):
    rates = adherence(pipe, scenes(100, held_out=False, seed=1), seed=1000)
    assert rates["colour"] >= 0.9 and rates["position"] >= 0.9 and rates["shape"] >= 0.65, rates


def test_held_out_pairs_generalise(pipe):
    """Colour-shape pairs never drawn in training: the model composes colour and shape it learnt apart."""
    rates = adherence(pipe, scenes(50, held_out=True, seed=2), seed=2000)
    assert rates["colour"] >= 0.9 and rates["position"] >= 0.9 and rates["all"] >= 0.6, rates


@pytest.mark.parametrize("speed_ups", [dict(deep_cache=2), dict(token_merging=0.5),
                                       dict(deep_cache=2, token_merging=0.5)])
def test_speed_ups_keep_the_drawing_as_prompted(pipe, speed_ups):
    """DeepCache N=2 and token merging 0.5 hold the seen-pairs figures (measured on 200 images: colour 99%,
    shape 83%, position 98.5% with DeepCache N=2; N=3 drops to 91.5/73.5/94%, see RESULTS.md)."""
    rates = adherence(pipe, scenes(100, held_out=False, seed=1), seed=1000, **speed_ups)
    assert rates["colour"] >= 0.9 and rates["position"] >= 0.9 and rates["shape"] >= 0.65, (speed_ups, rates)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "heun", "lms", "plms"])
def test_every_kind_of_sampler_works_with_the_trained_model(pipe, sampler):
    rates = adherence(pipe, scenes(30, held_out=False, seed=3), seed=3000, sampler=sampler, steps=20)
    assert rates["position"] >= 0.5, (sampler, rates)  # lms and plms lose the colour at 20 steps: see RESULTS.md


@pytest.mark.slow
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_draws_the_prompt_with_the_v_model(v_pipe, sampler):
    """Measured on 30 images at 20 steps (LCM: 4 steps, guidance 1.5): position 87-97% for every sampler, colour
    70-97% except lms and plms (23-33%, as on the epsilon model)."""
    assert v_pipe.models.prediction_type == "v_prediction"
    options = dict(steps=4, guidance_scale=1.5) if sampler == "lcm" else dict(steps=20)
    rates = adherence(v_pipe, scenes(30, held_out=False, seed=3), seed=3000, sampler=sampler, **options)
    assert rates["position"] >= 0.7, (sampler, rates)
    assert sampler in ("lms", "plms") or rates["colour"] >= 0.5, (sampler, rates)


@pytest.mark.slow
def test_the_v_model_read_as_epsilon_draws_nothing_as_prompted(v_model, v_pipe):
    """The same weights under the other parameterization: what the prediction rule decides is what makes the
    image (measured colour+position: 70% as v, 20% as epsilon)."""
    chosen = scenes(30, held_out=False, seed=3)
    as_epsilon = StableDiffusion.from_checkpoint(v_model, prediction="epsilon")
    right = adherence(v_pipe, chosen, seed=3000)["colour+position"]
    wrong = adherence(as_epsilon, chosen, seed=3000)["colour+position"]
    assert right >= wrong + 0.3, (right, wrong)


@pytest.mark.parametrize("model", BOTH_MODELS)
def test_guidance_raises_adherence(request, model):
    """Measured, all three right: 81% guided against 61% unguided (epsilon), 61% against 39% (v)."""
    pipe = request.getfixturevalue(model)
    chosen = scenes(100, held_out=False, seed=4)
    guided = adherence(pipe, chosen, seed=4000, guidance_scale=7.5)
    unguided = adherence(pipe, chosen, seed=4000, guidance_scale=1.0)
    assert guided["all"] >= unguided["all"] + 0.1, (guided, unguided)


@pytest.mark.parametrize("model", BOTH_MODELS)
def test_image_to_image_recolours_and_keeps_the_position(request, model):
    pipe = request.getfixturevalue(model)
    kept = 0
    cases = scenes(12, held_out=False, seed=5)
    for i, scene in enumerate(cases):
        target = Scene(scene.shape, "blue" if scene.colour != "blue" else "red", "large", scene.position,
                       scene.background if scene.background not in ("blue", "red") else "gray")
        source = render(Scene(target.shape, scene.colour, "large", scene.position, target.background), 64)
        [image] = pipe.image_to_image(prompt_of(target), source, strength=0.7, seed=i, progress=False)
        reading = read(image)
        kept += reading.colour == target.colour and reading.position == target.position
    assert kept >= 0.75 * len(cases), kept


@pytest.mark.parametrize("model", BOTH_MODELS)
def test_inpainting_draws_inside_the_mask_and_keeps_the_rest(request, model):
    """A shape in the top left is kept; the right half is repainted with the prompted one. The kept half's
    latents are the image's own, exactly (the decoder's attention is global, so its pixels move a little)."""
    pipe = request.getfixturevalue(model)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    drawn = 0
    cases = scenes(10, held_out=False, seed=6)
    for i, scene in enumerate(cases):
        wanted = Scene(scene.shape, scene.colour, "small", "bottom right", scene.background)
        keep = Scene("square" if scene.shape != "square" else "circle", scene.colour, "small", "top left",
                     scene.background)
        source = render(keep, 64)
        [image] = pipe.inpaint(prompt_of(wanted), source, mask, seed=i, progress=False)
        right = read(image.crop((32, 0, 64, 64)))
        drawn += right.found and right.colour == wanted.colour
        latents = pipe.inpaint(prompt_of(wanted), source, mask, seed=i, progress=False, output_type="latent")
        image_latents = pipe.image_to_image(prompt_of(wanted), source, strength=0.0, seed=i, output_type="latent")
        assert torch.equal(latents[..., :4], image_latents[..., :4])  # latent columns 0-3: the kept half
        assert not torch.equal(latents[..., 4:], image_latents[..., 4:])
    assert drawn >= 0.3 * len(cases), drawn  # measured 5 of 10; the right colour by chance: 1 in 8
