"""What the fine-tuning commands teach the shipped tiny shapes model, read by the shapes checker on fresh seeds:
a LoRA teaches it the cross it never saw (and at weight 0 or unloaded the model draws what it drew before, bit
for bit); DreamBooth's prior preservation keeps the class prompt drawing its class, which without it drifts to
the instance; textual inversion teaches a new token a colour. The runs are `benchmarks/finetune_meaning.py`'s (`tests/finetune_experiments.py`), at
fewer images; the floors sit well inside what that benchmark measured (benchmarks/RESULTS.md), so a broken
trainer, loader or loss fails them and seed noise does not."""

from pathlib import Path

import pytest

from sd.pipeline import StableDiffusion

pytest.importorskip("scipy")  # the image checker's tool
from tests.finetune_experiments import ALL_SHAPES, EVAL_SEED, NEW, TOKEN, draw, run, same_images, write_folder
from tests.shapes_checker import adherence, generations, prompt_of, scenes  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "data" / "tiny-shapes.safetensors"
IMAGES = 40  # generations per measurement
TRAIN_IMAGES = 32


def test_a_lora_teaches_the_cross_and_at_weight_0_or_unloaded_the_model_draws_as_before(tmp_path):
    data = write_folder(tmp_path / "data" / "1_cross", draw(TRAIN_IMAGES, seed=0, shape=NEW, size="large"),
                        captions=True)
    run("lora", MODEL, data.parent, tmp_path / "run", 200)
    pipe = StableDiffusion.from_checkpoint(MODEL)
    crosses, seen = draw(IMAGES, seed=1, shape=NEW, size="large"), scenes(IMAGES, held_out=False, seed=2)
    before, base = adherence(pipe, crosses, EVAL_SEED, shapes=ALL_SHAPES), generations(pipe, seen, EVAL_SEED)
    pipe.load_lora(tmp_path / "run" / "out.safetensors")
    after = adherence(pipe, crosses, EVAL_SEED, shapes=ALL_SHAPES)
    assert before["shape"] <= 0.35 and after["shape"] >= 0.6, (before, after)
    assert after["colour"] >= 0.9 and after["position"] >= 0.9, after  # the prompt's other words still hold
    pipe.unload_lora()
    assert same_images(generations(pipe, seen, EVAL_SEED), base)
    pipe.load_lora(tmp_path / "run" / "out.safetensors", weight=0.0)
    assert same_images(generations(pipe, seen, EVAL_SEED), base)


def test_dreambooths_prior_preservation_keeps_the_class_prompt_drawing_its_class(tmp_path):
    data = write_folder(tmp_path / "data" / "1_a large red sks square",
                        draw(TRAIN_IMAGES, seed=0, shape=NEW, colour="red", size="large"), captions=False)
    squares = draw(IMAGES, seed=3, shape="square", colour="red", size="large")
    instance = draw(IMAGES, seed=4, shape=NEW, colour="red", size="large")
    rates = {}
    for name in ("dreambooth, prior preservation", "dreambooth, no prior preservation"):
        run(name, MODEL, data.parent, tmp_path / name.split()[1], 300)
        pipe = StableDiffusion.from_checkpoint(tmp_path / name.split()[1] / "out.safetensors")
        rates[name] = (adherence(pipe, instance, EVAL_SEED, shapes=ALL_SHAPES, prompt=lambda s: "a large red sks square"
                                 )["shape"], adherence(pipe, squares, EVAL_SEED, shapes=ALL_SHAPES)["shape"])
    (kept_instance, kept_class), (drift_instance, drift_class) = rates.values()
    assert kept_instance >= 0.5 and drift_instance >= 0.8, rates  # both learned the instance: red crosses
    assert kept_class >= 0.8 and drift_class <= 0.2, rates  # "a large red square ...": squares only with the prior


def test_textual_inversion_teaches_a_new_token_a_colour(tmp_path):
    data = write_folder(tmp_path / "data" / "1_hue", draw(TRAIN_IMAGES, seed=0, colour="blue"), captions=True,
                        rename=("blue", TOKEN))
    run("textual-inversion", MODEL, data.parent, tmp_path / "run", 300)
    pipe = StableDiffusion.from_checkpoint(MODEL)
    pipe.load_embedding(tmp_path / "run" / "out.safetensors")
    blue = draw(IMAGES, seed=1, colour="blue")
    rates = adherence(pipe, blue, EVAL_SEED, prompt=lambda s: prompt_of(s).replace("blue", TOKEN))
    assert rates["colour"] >= 0.8, rates  # initialised from "red"
