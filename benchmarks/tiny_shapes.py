"""What the shipped tiny model means and costs: adherence to prompts, generation time, training speed.

    python -m benchmarks.tiny_shapes [--model data/tiny-shapes.safetensors] [--images 200] [--train-steps 20]
                                     [--samplers]

- adherence: --images generated images each for seen and held-out colour-shape pairs (default
  sampler and steps, guidance 7.5, seeds 0, 1, ...), and the seen ones again at guidance 1, read by
  the checker of tests/shapes_checker.py: share of colour, shape, position and all three right; and
  the same scenes rendered and passed through the model's VAE, the best the diffusion model can reach;
- with --samplers: seen pairs at 20 steps for every sampler (LCM: 4 steps, guidance 1.5), as the tests run them;
- demo: wall time of `python run_demo.py --prompt "a large red circle in the top left"` in a fresh
  process (loading included), the README's first command;
- training: samples per second of each stage of the tiny-shapes preset on this machine (CPU, or CUDA
  when there is one), from --train-steps timed steps after one warm-up step.
Writes the table to benchmarks/out/tiny_shapes.md and prints it.
"""

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sd.pipeline import StableDiffusion
from sd.samplers import SAMPLERS
from sd.train import PRESETS, Stage, dataset, initial_models, parse_args
from sd.datasets import render, to_tensor
from tests.shapes_checker import adherence, scenes, score

ROOT = Path(__file__).resolve().parent.parent


def demo_seconds() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "run_demo.py", "--prompt", "a large red circle in the top left", "--output",
                        str(Path(tmp) / "demo.png"), "--no-progress"], cwd=ROOT, check=True, capture_output=True)
        return time.perf_counter() - start


@torch.no_grad()
def reconstructions(pipe: StableDiffusion, scene_list: list) -> list:
    """Rendered scenes through the model's VAE (the latent means, decoded): the best the diffusion model can draw."""
    images = [render(scene, pipe.models.image_size) for scene in scene_list]
    mean, _ = pipe.models.vae.encode(to_tensor(images).to(pipe.device, pipe.models.vae.dtype))  # (N, 4, h, w)
    return pipe.decode(mean.float() * pipe.models.scale_factor)


def training_speed(stage: str, steps: int) -> float:
    """Samples per second of `stage` of the tiny-shapes preset."""
    with tempfile.TemporaryDirectory() as tmp:
        args = parse_args([stage if stage == "vae" else "all", "--run-dir", tmp, "--output", f"{tmp}/x.safetensors",
                           "--no-progress"])
        models = initial_models(args, PRESETS[args.preset])
        cfg = getattr(PRESETS[args.preset], f"{stage}_stage")
        runner = Stage(stage, models, dataset(args, models.image_size), cfg, args)
        runner.prepare()
        runner.loss(0, torch.Generator().manual_seed(0)).backward()
        start = time.perf_counter()
        for step in range(steps):
            runner.optimizer.zero_grad()
            runner.loss(step, torch.Generator().manual_seed(step)).backward()
            runner.optimizer.step()
        return steps * cfg.batch_size / (time.perf_counter() - start)


def sampler_row(pipe: StableDiffusion, name: str, images: int) -> str:
    options = dict(steps=4, guidance_scale=1.5) if name == "lcm" else dict(steps=20)
    rates = adherence(pipe, scenes(images, held_out=False, seed=3), seed=3000, sampler=name, **options)
    return (f"| {name}, seen pairs, {options['steps']} steps ({images} images) | {rates['colour']:.1%} | "
            f"{rates['shape']:.1%} | {rates['position']:.1%} | {rates['all']:.1%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "data" / "tiny-shapes.safetensors")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--samplers", action="store_true", help="also every sampler at 20 steps on the seen pairs")
    args = p.parse_args()
    pipe = StableDiffusion.from_checkpoint(args.model)
    rows = [sampler_row(pipe, name, args.images) for name in (SAMPLERS if args.samplers else ())]
    start = time.perf_counter()
    seen = adherence(pipe, scenes(args.images, held_out=False, seed=10), seed=0)
    per_image = (time.perf_counter() - start) / args.images
    held_out = adherence(pipe, scenes(args.images, held_out=True, seed=11), seed=0)
    unguided = adherence(pipe, scenes(args.images, held_out=False, seed=10), seed=0, guidance_scale=1.0)
    rebuilt = score(reconstructions(pipe, scenes(args.images, held_out=False, seed=10)),
                    scenes(args.images, held_out=False, seed=10))
    for name, rates in (("seen pairs, guidance 7.5", seen), ("held-out pairs, guidance 7.5", held_out),
                        ("seen pairs, guidance 1", unguided), ("the VAE's reconstructions of rendered scenes", rebuilt)):
        rows.append(f"| {name} ({args.images} images) | {rates['colour']:.1%} | {rates['shape']:.1%} | "
                    f"{rates['position']:.1%} | {rates['all']:.1%} |")
    lines = [f"# Tiny shapes model: {args.model.name}", "",
             f"- machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}", "",
             "| images | colour right | shape right | position right | all three |", "| --- | --- | --- | --- | --- |",
             *rows, "",
             f"- generation: {per_image * 1000:.0f} ms per 64x64 image in batches of 50 (25 steps of the default "
             f"sampler, guidance 7.5)",
             f"- `python run_demo.py --prompt \"a large red circle in the top left\"`: {demo_seconds():.1f} s wall "
             f"time, loading included"]
    for stage in ("vae", "diffusion"):
        lines.append(f"- training, {stage} stage: {training_speed(stage, args.train_steps):.0f} samples/s")
    text = "\n".join(lines) + "\n"
    out = ROOT / "benchmarks" / "out" / "tiny_shapes.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
