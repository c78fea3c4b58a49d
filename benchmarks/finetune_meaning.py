"""What the fine-tuning commands teach the tiny shapes model, and how long they take to teach it.

    python -m benchmarks.finetune_meaning [--model data/tiny-shapes.safetensors] [--images 100]
                                          [--train-images 32] [--checkpoints 50,100,200,400]

The tiny model was trained on 5 shapes; a cross (`NEW_SHAPES` of sd/datasets.py) it never saw, and "cross" is a
word of its tokenizer that no caption used. (A new colour cannot be taught: the tiny VAE, trained on 8 colours,
decodes pink as green and cyan, lime or teal as their nearest old colour, so no latent the UNet learns can
show one. Its large crosses come back as crosses.) Each experiment renders --train-images scenes, runs
`sd.train`'s command on them as a user would, and reads --images generations on fresh seeds with the shapes
checker, the cross among the shapes it can read:
- lora: large crosses of every colour, captioned in the dataset's grammar; a LoRA of rank 8 on the UNet and the
  text encoder, extended with `--resume --steps` to each of --checkpoints; "a large <colour> cross ..." prompts
  before and after; the model's own prompts (seen colour-shape pairs) with the LoRA at weight 1, at weight 0
  and unloaded (the last two: the base images bit for bit, or the row says not);
- dreambooth: kohya's folder '1_a large red sks square' of red crosses, a full UNet fine-tune with prior
  preservation (class prompt "a large red square", class images drawn by the base model) and without: the
  instance prompt's crosses, and the class: "a large red square ..." prompts, still squares or not;
- textual-inversion: a new token <hue> (1 vector, initialised from "red"), only its row trained, on blue scenes
  captioned with <hue> for blue: the colour the token draws.
Training times are the commands' wall time in this process (class images and latent caching included).
Writes benchmarks/out/finetune_meaning.md and prints it.
"""

import argparse
import platform
import tempfile
from pathlib import Path

import torch

from sd.pipeline import StableDiffusion
from tests.finetune_experiments import (ALL_SHAPES, EVAL_SEED, NEW, TOKEN, draw, run, same_images,
                                        write_folder)
from tests.shapes_checker import adherence, generations, prompt_of, scenes, score

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out" / "finetune_meaning.md"


def row(what: str, rates: dict[str, float], note: str = "") -> str:
    return (f"| {what} | {rates['colour']:.0%} | {rates['shape']:.0%} | {rates['position']:.0%} | "
            f"{rates['all']:.0%} | {note} |")


def lora(model: Path, tmp: Path, args) -> list[str]:
    pipe = StableDiffusion.from_checkpoint(model)
    crosses, seen = draw(args.images, seed=1, shape=NEW, size="large"), scenes(args.images, held_out=False, seed=2)
    base_seen = generations(pipe, seen, EVAL_SEED)
    rows = [row("base model, cross prompts", adherence(pipe, crosses, EVAL_SEED, shapes=ALL_SHAPES)),
            row("base model, seen pairs", score(base_seen, seen, ALL_SHAPES))]
    data = write_folder(tmp / "lora-data" / "1_cross", draw(args.train_images, seed=0, shape=NEW, size="large"),
                        captions=True)
    seconds = 0.0
    for i, steps in enumerate(args.checkpoints):
        seconds += run("lora", model, data.parent, tmp / "lora", steps, resume=i > 0)
        pipe.load_lora(tmp / "lora" / "out.safetensors")
        rows.append(row(f"LoRA after {steps} steps, cross prompts",
                        adherence(pipe, crosses, EVAL_SEED, shapes=ALL_SHAPES), f"{seconds:.0f} s of training"))
        if steps == args.checkpoints[-1]:
            rows.append(row(f"LoRA after {steps} steps, seen pairs", adherence(pipe, seen, EVAL_SEED, shapes=ALL_SHAPES)))
        pipe.unload_lora()
    unloaded = generations(pipe, seen, EVAL_SEED)
    pipe.load_lora(tmp / "lora" / "out.safetensors", weight=0.0)
    zero = generations(pipe, seen, EVAL_SEED)
    for what, images in (("LoRA at weight 0", zero), ("LoRA unloaded", unloaded)):
        rows.append(row(f"{what}, seen pairs", score(images, seen, ALL_SHAPES),
                        f"base images bit for bit: {'yes' if same_images(images, base_seen) else 'NO'}"))
    return rows


def class_rows(pipe, label: str, images: int) -> list[str]:
    """The class: "a large red square ..." prompts (full captions, and the bare class prompt) still squares?"""
    squares = draw(images, seed=3, shape="square", colour="red", size="large")
    return [row(f"{label}, \"a large red square ...\"", adherence(pipe, squares, EVAL_SEED, shapes=ALL_SHAPES)),
            row(f"{label}, \"a large red square\"", adherence(pipe, squares, EVAL_SEED, shapes=ALL_SHAPES,
                                                               prompt=lambda s: "a large red square"),
                "position not named")]


def dreambooth(model: Path, tmp: Path, args) -> list[str]:
    instance = draw(args.images, seed=4, shape=NEW, colour="red", size="large")
    rows = class_rows(StableDiffusion.from_checkpoint(model), "base model", args.images)
    data = write_folder(tmp / "db-data" / "1_a large red sks square",
                        draw(args.train_images, seed=0, shape=NEW, colour="red", size="large"), captions=False)
    steps = args.checkpoints[-1]
    for name in ("dreambooth, prior preservation", "dreambooth, no prior preservation"):
        run_dir = tmp / name.replace(" ", "-").replace(",", "")
        seconds = run(name, model, data.parent, run_dir, steps)
        pipe = StableDiffusion.from_checkpoint(run_dir / "out.safetensors")
        rows.append(row(f"{name}, {steps} steps: \"a large red sks square\"",
                        adherence(pipe, instance, EVAL_SEED, shapes=ALL_SHAPES, prompt=lambda s: "a large red sks square"),
                        f"{seconds:.0f} s of training; position not named"))
        rows += class_rows(pipe, name, args.images)
    return rows


def textual_inversion(model: Path, tmp: Path, args) -> list[str]:
    blue = draw(args.images, seed=1, colour="blue")
    data = write_folder(tmp / "ti-data" / "1_hue", draw(args.train_images, seed=0, colour="blue"), captions=True,
                        rename=("blue", TOKEN))
    with_token = lambda s: prompt_of(s).replace("blue", TOKEN)  # noqa: E731
    rows = []
    seconds = 0.0
    for i, steps in enumerate(args.checkpoints):
        seconds += run("textual-inversion", model, data.parent, tmp / "ti", steps, resume=i > 0)
        pipe = StableDiffusion.from_checkpoint(model)
        pipe.load_embedding(tmp / "ti" / "out.safetensors")
        rows.append(row(f"{TOKEN} after {steps} steps, blue scenes", adherence(pipe, blue, EVAL_SEED, prompt=with_token),
                        f"{seconds:.0f} s of training"))
    return rows


EXPERIMENTS = {"lora": lora, "dreambooth": dreambooth, "textual-inversion": textual_inversion}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "data" / "tiny-shapes.safetensors")
    p.add_argument("--images", type=int, default=100, help="generations per row")
    p.add_argument("--train-images", type=int, default=32, help="rendered images each command trains on")
    p.add_argument("--checkpoints", type=lambda s: [int(x) for x in s.split(",")], default=[50, 100, 200, 400],
                   help="step counts at which to measure (a run extended with --resume --steps)")
    p.add_argument("--only", choices=list(EXPERIMENTS), nargs="*", default=list(EXPERIMENTS))
    args = p.parse_args()
    lines = [f"# What fine-tuning teaches the tiny shapes model ({args.model.name})", "",
             f"- machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}; {args.train_images} training images; {args.images} generations per row, "
             f"seeds from {EVAL_SEED}", "",
             "| images | colour right | shape right | position right | all three | note |",
             "| --- | --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            rows = EXPERIMENTS[name](args.model, Path(tmp), args)
            lines += rows
            print("\n".join(rows), flush=True)
    text = "\n".join(lines) + "\n"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
