"""What DeepCache, token merging, torch.compile and channels-last buy on the full SD v1.5 architecture (the
tests' seeded random weights, memory-mapped from a checkpoint file), and what the first two cost the
shipped tiny shapes model in adherence to its prompts.

    python -m benchmarks.speedups [--parts images,sizes,compile,tiny] [--size 512] [--steps 25] [--threads T]
                                  [--fresh]

Parts:
  images   a whole image (prompt, --steps guided steps of the default sampler, decode) with full compute,
           DeepCache N = 2, 3, 5 (branch 0), token merging 0.3 and 0.5, and DeepCache 3 with token merging
           0.5: seconds to the final latents and in all, the speed-up of the first, and how far the image is
           from the full one (mean |difference| of the 8-bit pixels; relative L2 of the final latents).
           One run each after a one-step warm-up. Each run is kept in benchmarks/out/speedups/ as it ends
           and a rerun skips what is there (--fresh starts over).
  sizes    one guided UNet call (batch 2) at 512, 768 and 1024 px, full and with token merging 0.5
           (median of 3, 2, 1 calls after a warm-up call).
  compile  one guided UNet call at --size: eager, eager channels-last, compiled (the first call is the
           compile's warm-up), compiled channels-last; and the resident memory channels-last adds.
  tiny     the tiny shapes model's adherence (seen pairs, guidance 7.5, 200 images, the checker of
           tests/shapes_checker.py) with each speed-up.
Writes benchmarks/out/speedups.md (the parts run) and prints it.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.assets import cpu_name, ensure_checkpoints, rss_bytes
from benchmarks.bench import time_alternating
from sd.pipeline import StableDiffusion
from sd.token_merging import TokenMerging
from sd.unet import Speedups
from tests.shapes_checker import adherence, scenes

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
RUNS = OUT / "speedups"
PROMPT = "a photograph of an astronaut riding a horse on the moon, 4k"
OPTIONS = {  # name: generate() options
    "full compute": {},
    "DeepCache N=2": dict(deep_cache=2),
    "DeepCache N=3": dict(deep_cache=3),
    "DeepCache N=5": dict(deep_cache=5),
    "ToMe 0.3": dict(token_merging=0.3),
    "ToMe 0.5": dict(token_merging=0.5),
    "DeepCache N=3 + ToMe 0.5": dict(deep_cache=3, token_merging=0.5),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def full_size() -> StableDiffusion:
    path = ensure_checkpoints(log, variants=("fp32.safetensors",))["fp32.safetensors"]
    return StableDiffusion.from_checkpoint(path)


def images(sd: StableDiffusion, size: int, steps: int) -> list[str]:
    RUNS.mkdir(parents=True, exist_ok=True)
    sd.text_to_image(PROMPT, steps=1, width=size, height=size, seed=0, progress=False)  # warm-up
    for name, options in OPTIONS.items():
        record = RUNS / f"{name}.json"
        if record.exists():
            continue
        log(f"images: {name}")
        start = time.perf_counter()
        latents = sd.text_to_image(PROMPT, steps=steps, width=size, height=size, seed=0, output_type="latent",
                                   progress=False, **options)  # (1, 4, h, w)
        denoised = time.perf_counter()
        [image] = sd.decode(latents)
        done = time.perf_counter()
        torch.save(latents, RUNS / f"{name}.pt")
        image.save(RUNS / f"{name}.png")
        record.write_text(json.dumps({"denoise": denoised - start, "total": done - start}))
    full = json.loads((RUNS / "full compute.json").read_text())
    full_latents = torch.load(RUNS / "full compute.pt")
    full_pixels = np.asarray(Image.open(RUNS / "full compute.png"), dtype=np.float64)
    rows = [f"Whole {size}x{size} image, {steps} steps of dpmpp_2m_karras, guidance 7.5 (one run each):", "",
            "| run | s to the latents | s in all | speed-up (latents) | pixels off (mean, of 255) | latents off (rel. L2) |",
            "|---|---|---|---|---|---|"]
    for name in OPTIONS:
        run = json.loads((RUNS / f"{name}.json").read_text())
        latents = torch.load(RUNS / f"{name}.pt")
        pixels = np.asarray(Image.open(RUNS / f"{name}.png"), dtype=np.float64)
        rows.append(f"| {name} | {run['denoise']:.1f} | {run['total']:.1f} | {full['denoise'] / run['denoise']:.2f}x | "
                    f"{np.abs(pixels - full_pixels).mean():.2f} | "
                    f"{float((latents - full_latents).norm() / full_latents.norm()):.3f} |")
    return rows


def call_seconds(call, repeats: int) -> float:
    """Median seconds of `call()` over `repeats` calls, after one untimed call."""
    return time_alternating({"call": call}, repeats, warmup=1)["call"].median


def first_call(call) -> tuple[float, torch.Tensor]:
    """Seconds of one call (with torch.compile: the compiling), and its output."""
    start = time.perf_counter()
    output = call()
    return time.perf_counter() - start, output


def unet_call(sd: StableDiffusion, size: int, speedups: Speedups | None = None):
    """One guided UNet call (batch 2) on `size` px latents, as a function of no arguments."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size // 8, size // 8, generator=generator)  # (2, 4, h, w)
    context = torch.randn(2, 77, 768, generator=generator)  # (2, 77, 768)
    return torch.inference_mode()(lambda: sd.models.unet(x, 500, context, speedups=speedups))


def sizes(sd: StableDiffusion) -> list[str]:
    rows = ["One guided UNet call (batch 2), seconds (median of 3, 2, 1 calls after a warm-up):", "",
            "| size | full | ToMe 0.5 | speed-up |", "|---|---|---|---|"]
    for size, repeats in ((512, 3), (768, 2), (1024, 1)):
        log(f"sizes: {size}")
        full = call_seconds(unet_call(sd, size), repeats)
        merged = call_seconds(unet_call(sd, size, Speedups(token_merging=TokenMerging(0.5))), repeats)
        rows.append(f"| {size}x{size} | {full:.2f} | {merged:.2f} | {full / merged:.2f}x |")
    return rows


def compiled(sd: StableDiffusion, size: int) -> list[str]:
    unet = sd.models.unet
    call = unet_call(sd, size)
    eager = call_seconds(call, 3)
    expected = call()
    before = rss_bytes()
    unet.to(memory_format=torch.channels_last)
    grown = rss_bytes() - before
    log("compile: eager channels-last")
    eager_last = call_seconds(call, 3)
    unet.to(memory_format=torch.contiguous_format)
    unet.compile()
    log("compile: compiling")
    warmup, out = first_call(call)
    error = float((out - expected).abs().max() / expected.abs().max())
    fast = call_seconds(call, 3)
    unet.to(memory_format=torch.channels_last)
    log("compile: compiled channels-last")
    warmup_last, _ = first_call(call)
    fast_last = call_seconds(call, 3)
    return [f"One guided UNet call (batch 2) at {size}x{size}, seconds (median of 3 after a warm-up):", "",
            "| UNet | s per call | speed-up | first call (compiling) |", "|---|---|---|---|",
            f"| eager | {eager:.2f} | 1.00x | |",
            f"| eager, channels-last | {eager_last:.2f} | {eager / eager_last:.2f}x | |",
            f"| compiled | {fast:.2f} | {eager / fast:.2f}x | {warmup:.0f} s |",
            f"| compiled, channels-last | {fast_last:.2f} | {eager / fast_last:.2f}x | {warmup_last:.0f} s |", "",
            f"- compiled against eager: max |difference| / max |eager| = {error:.1e}",
            f"- channels-last copies the UNet's 4-D convolution weights out of the memory-mapped file: resident "
            f"memory +{grown / 2**20:.0f} MiB"]


def tiny() -> list[str]:
    pipe = StableDiffusion.from_checkpoint(ROOT / "data" / "tiny-shapes.safetensors")
    rows = ["Tiny shapes model, seen pairs, guidance 7.5, 200 images:", "",
            "| run | colour right | shape right | position right | all three | s per image |", "|---|---|---|---|---|---|"]
    for name, options in OPTIONS.items():
        log(f"tiny: {name}")
        start = time.perf_counter()
        rates = adherence(pipe, scenes(200, held_out=False, seed=10), seed=0, **options)
        seconds = (time.perf_counter() - start) / 200
        rows.append(f"| {name} | {rates['colour']:.1%} | {rates['shape']:.1%} | {rates['position']:.1%} | "
                    f"{rates['all']:.1%} | {seconds * 1000:.0f} ms |")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="images,sizes,compile,tiny")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    if args.fresh:
        for path in RUNS.glob("*"):
            path.unlink()
    lines = [f"# Speed-ups on {cpu_name()}, {args.threads} threads, torch {torch.__version__}", ""]
    sd = full_size() if {"images", "sizes", "compile"} & set(parts) else None
    for part, run in (("images", lambda: images(sd, args.size, args.steps)), ("sizes", lambda: sizes(sd)),
                      ("compile", lambda: compiled(sd, args.size)), ("tiny", tiny)):
        if part in parts:
            lines += run() + [""]
            (OUT / "speedups.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
