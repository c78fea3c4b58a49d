"""LoRA training at the full SD v1.5 size (random weights): samples per second and peak memory, ours against
diffusers + PEFT doing the same steps.

    python -m benchmarks.lora_training [--size 512] [--steps 2] [--rank 4] [--threads T]

- ours: `python -m sd.train lora` on the benchmark's random SD v1.5 checkpoint (`benchmarks/assets.py`), four
  --size images in a kohya folder, batch 1, a LoRA of rank --rank on the UNet's transformers and the text
  encoder (kohya's targets), AdamW; also with --gradient-checkpointing;
- diffusers + PEFT: the same checkpoint through `from_single_file`, LoRA adapters of the same rank on the same
  layers (`add_adapter`), the same images' latents encoded once, the same loss and optimizer, as diffusers'
  `train_text_to_image_lora.py` steps.
Each run is a fresh process, once with 1 step and once with 1 + --steps: the difference of their wall times
is the time of --steps steps alone (loading, latent caching and the first step's allocations cancel). Peak
memory is the longer run's VmHWM, loading included. Writes benchmarks/out/lora_training.md and prints it.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks import assets
from benchmarks.child import load_diffusers, status_kib

OUT = Path(__file__).resolve().parent / "out" / "lora_training.md"
CAPTION = "a photo of sks dog"
IMAGES = 4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def write_images(folder: Path, size: int) -> Path:
    """kohya's folder '1_<CAPTION>' of IMAGES noise images of size x size."""
    images = folder / f"1_{CAPTION}"
    images.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(IMAGES):
        pixels = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{i}.png")
    return folder


def ours(args, data: Path, run_dir: Path, steps: int) -> None:
    from sd import train
    extra = ["--gradient-checkpointing"] if args.impl == "ours-checkpointing" else []
    code = train.main(["lora", "--init", str(args.checkpoint), "--data", str(data), "--resolution", str(args.size),
                       "--steps", str(steps), "--batch-size", "1", "--rank", str(args.rank), "--alpha",
                       str(args.rank), "--device", "cpu", "--no-progress", "--save-every", str(steps + 1),
                       "--run-dir", str(run_dir), "--output", str(run_dir / "lora.safetensors"), *extra])
    if code:
        sys.exit(code)


def diffusers_peft(args, data: Path, run_dir: Path, steps: int) -> None:
    from peft import LoraConfig
    pipe = load_diffusers(str(args.checkpoint), torch.float32)
    for net in (pipe.unet, pipe.vae, pipe.text_encoder):
        net.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=UNET_TARGETS))
    pipe.text_encoder.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TEXT_TARGETS))
    params = [p for net in (pipe.unet, pipe.text_encoder) for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    paths = sorted((data / f"1_{CAPTION}").glob("*.png"))
    with torch.no_grad():
        pixels = [torch.from_numpy(np.asarray(Image.open(p))).permute(2, 0, 1)[None].float() / 127.5 - 1
                  for p in paths]  # 4 x (1, 3, size, size)
        latents = [pipe.vae.encode(x).latent_dist for x in pixels]
    ids = pipe.tokenizer(CAPTION, padding="max_length", max_length=77, return_tensors="pt").input_ids  # (1, 77)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        x0 = latents[step % len(latents)].sample(gen) * pipe.vae.config.scaling_factor  # (1, 4, h, w)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (1,), generator=gen)
        noisy = pipe.scheduler.add_noise(x0, noise, t)
        context = pipe.text_encoder(ids)[0]  # (1, 77, 768)
        loss = torch.nn.functional.mse_loss(pipe.unet(noisy, t, context).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


IMPLS = {"ours": ours, "ours-checkpointing": ours, "diffusers+peft": diffusers_peft}


def child(args) -> None:
    torch.set_num_threads(args.threads)
    assets.quiet()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        IMPLS[args.impl](args, args.data, Path(tmp) / "run", args.child_steps)
        print(json.dumps({"wall_s": time.perf_counter() - start, "peak_kib": status_kib("VmHWM")}))


def run(args, impl: str, data: Path, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.lora_training", "--child", impl, "--child-steps",
                          str(steps), "--data", str(data), "--checkpoint", str(args.checkpoint), "--size",
                          str(args.size), "--rank", str(args.rank), "--threads", str(args.threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--child", choices=IMPLS, dest="impl", help=argparse.SUPPRESS)
    p.add_argument("--child-steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        return child(args)
    args.checkpoint = assets.ensure_checkpoints(variants=("fp32.safetensors",))["fp32.safetensors"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_images(Path(tmp) / "data", args.size)
        for impl in IMPLS:
            short, long = run(args, impl, data, 1), run(args, impl, data, 1 + args.steps)
            per_step = (long["wall_s"] - short["wall_s"]) / args.steps
            rows.append(f"| {impl} | {per_step:.1f} | {1 / per_step:.3f} | {long['peak_kib'] / 2**20:.1f} |")
    table = "\n".join([
        f"LoRA training, SD v1.5 size (random weights), {args.size}x{args.size}, batch 1, rank {args.rank}, UNet + "
        f"text encoder, {args.threads} threads on {assets.cpu_name()}; {args.steps} timed steps",
        "", "| implementation | s / step | samples / s | peak memory (GiB) |", "| --- | --- | --- | --- |", *rows])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
