"""What LCM sampling saves and what a LoRA costs, on the full SD v1.5 architecture (random weights).

    python -m benchmarks.lora_lcm [--size 512] [--rank 32] [--threads T]

- images: seconds to a whole image (text encoding, denoising, decoding) with our default sampler
  (dpmpp_2m_karras, 25 steps, guidance 7.5) against 4 LCM steps at guidance 1 (no classifier-free
  guidance: one UNet call per step, as LCM-LoRAs are used), same prompt, size and machine, one run
  each, alternating after a warm-up;
- LoRA: a random kohya LoRA of rank --rank over every attention, feed-forward and proj_in/out layer of
  the UNet and every layer of the text encoder (the layers common LoRAs train): seconds to read and
  merge it, seconds to unload it, the growth of the process's resident memory while it is merged, and
  the bytes of the layers it touches (the originals kept for unloading) and of the file.
Writes the table to benchmarks/out/lora_lcm.md and prints it.
"""

import argparse
import re
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.assets import cpu_name, rss_bytes
from sd.checkpoint import StableDiffusionModels
from sd.clip import CLIPTextModel
from sd.lora import lora_targets
from sd.pipeline import StableDiffusion
from sd.unet import UNet
from sd.vae import AutoencoderKL

OUT = Path(__file__).resolve().parent / "out" / "lora_lcm.md"
PROMPT = "a photograph of an astronaut riding a horse on the moon, 4k"
TRAINED = re.compile(r"(transformer_blocks_\d+_(attn\d|ff)|proj_(in|out)|lora_te_)")  # what common LoRAs train


def random_models(seed: int = 0) -> StableDiffusionModels:
    torch.manual_seed(seed)
    return StableDiffusionModels(clip=CLIPTextModel(), vae=AutoencoderKL(), unet=UNet())


def image_seconds(sd: StableDiffusion, size: int) -> dict[str, float]:
    runs = {"dpmpp_2m_karras, 25 steps, guidance 7.5": dict(sampler="dpmpp_2m_karras", steps=25, guidance_scale=7.5),
            "lcm, 4 steps, guidance 1": dict(sampler="lcm", steps=4, guidance_scale=1.0)}
    sd.text_to_image(PROMPT, steps=1, width=size, height=size, seed=0, progress=False)  # warm-up
    seconds = {}
    for name, settings in runs.items():
        start = time.perf_counter()
        sd.text_to_image(PROMPT, width=size, height=size, seed=0, progress=False, **settings)
        seconds[name] = time.perf_counter() - start
    return seconds


def random_lora(models: StableDiffusionModels, rank: int, path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    state, picked = {}, set()
    for name, module in lora_targets(models).items():  # each layer by the first of its names (kohya's)
        if name.startswith("lora_") and TRAINED.search(name) and module not in picked:
            picked.add(module)
            w = module.weight
            state[f"{name}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=gen) * 0.01
            state[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], rank, *(1,) * (w.dim() - 2), generator=gen) * 0.01
            state[f"{name}.alpha"] = torch.tensor(rank / 2)
    save_file(state, path)


def lora_costs(sd: StableDiffusion, rank: int) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        random_lora(sd.models, rank, path)
        before = rss_bytes()
        start = time.perf_counter()
        lora = sd.load_lora(path)
        load = time.perf_counter() - start
        growth = rss_bytes() - before
        touched = sum(m.weight.numel() * m.weight.element_size() for m in sd.loras.originals)
        start = time.perf_counter()
        sd.unload_lora()
        unload = time.perf_counter() - start
        return {"layers": str(len(lora.layers)), "file": f"{path.stat().st_size / 2**20:.0f} MiB",
                "read and merge": f"{load:.2f} s", "unload": f"{unload:.2f} s",
                "resident memory growth while merged": f"{growth / 2**20:.0f} MiB",
                "originals kept (the layers touched)": f"{touched / 2**20:.0f} MiB"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sd = StableDiffusion(random_models())
    lora = lora_costs(sd, args.rank)
    images = image_seconds(sd, args.size)
    base = images["dpmpp_2m_karras, 25 steps, guidance 7.5"]
    lines = [f"# LCM and LoRA on {cpu_name()}, {args.threads} threads, "
             f"torch {torch.__version__}", "", f"Whole {args.size}x{args.size} image (one run each):", "",
             "| run | seconds | speed-up |", "|---|---|---|"]
    lines += [f"| {name} | {s:.1f} | {base / s:.1f}x |" for name, s in images.items()]
    lines += ["", f"Random kohya LoRA, rank {args.rank}, over the attention, feed-forward and proj layers of the UNet "
                  f"and all layers of the text encoder:", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in lora.items()]
    text = "\n".join(lines) + "\n"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
