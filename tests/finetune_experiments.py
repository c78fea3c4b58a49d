"""The fine-tuning experiments on the tiny shapes model, shared by `tests/test_finetune_meaning.py` and
`benchmarks/finetune_meaning.py` (which says what each measures): the scenes they train on and prompt with,
their training folders, and `sd.train`'s commands with their flags."""

import random
import time
from pathlib import Path

from sd import train
from sd.datasets import BACKGROUNDS, COLOURS, HELD_OUT, NEW_SHAPES, POSITIONS, SHAPES, SIZES, Scene, caption, render

NEW = NEW_SHAPES[0]  # "cross"
ALL_SHAPES = SHAPES + NEW_SHAPES  # what the checker chooses from
TOKEN = "<hue>"
EVAL_SEED = 10_000  # generation seeds far from every seed the training used
RUN = ["--resolution", "64", "--bucket-step", "8", "--batch-size", "8", "--device", "cpu", "--no-progress"]
COMMANDS = {  # experiment: sd.train's command and its flags
    "lora": ["lora", "--rank", "8", "--alpha", "8", "--unet-lr", "1e-3", "--text-encoder-lr", "1e-4"],
    "dreambooth, prior preservation": ["dreambooth", "--lr", "1e-4", "--class-prompt", "a large red square",
                                       "--num-class-images", "32", "--prior-loss-weight", "1"],
    "dreambooth, no prior preservation": ["dreambooth", "--lr", "1e-4"],
    "textual-inversion": ["textual-inversion", "--token", TOKEN, "--init-word", "red", "--vectors", "1",
                          "--lr", "5e-3"],
}


def draw(n: int, seed: int, **fixed: str) -> list[Scene]:
    """n seeded scenes with the `fixed` parts (shape, colour, size), the others drawn: never a held-out pair, never
    the shape's colour as background."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        scene = Scene(fixed.get("shape") or rng.choice(SHAPES), fixed.get("colour") or rng.choice(list(COLOURS)),
                      fixed.get("size") or rng.choice(list(SIZES)), rng.choice(list(POSITIONS)),
                      rng.choice(list(BACKGROUNDS)))
        if scene.background != scene.colour and (scene.colour, scene.shape) not in HELD_OUT:
            out.append(scene)
    return out


def write_folder(folder: Path, scene_list: list[Scene], captions: bool, rename: tuple[str, str] = ("", "")) -> Path:
    """The scenes as 64x64 PNGs, each with a caption of the dataset's grammar with `rename`'s word replaced (or
    none: the folder's name is the caption)."""
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for i, scene in enumerate(scene_list):
        render(scene, 64).save(folder / f"{i:03d}.png")
        if captions:
            words = caption(scene, rng).split()
            (folder / f"{i:03d}.txt").write_text(" ".join(rename[1] if w == rename[0] else w for w in words))
    return folder


def run(name: str, model: Path, data: Path, run_dir: Path, steps: int, resume: bool = False) -> float:
    """Wall seconds of `python -m sd.train` for experiment `name`, trained (or extended) to `steps` steps."""
    flags = [*COMMANDS[name], "--init", str(model), "--data", str(data), *RUN, "--steps", str(steps),
             "--run-dir", str(run_dir), "--output", str(run_dir / "out.safetensors"), *(["--resume"] * resume)]
    start = time.perf_counter()
    if train.main(flags) != 0:
        raise SystemExit(f"sd.train {' '.join(flags)} failed")
    return time.perf_counter() - start


def same_images(a, b) -> bool:
    return len(a) == len(b) and all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
