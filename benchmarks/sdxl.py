"""Memory and time of full-size SDXL on this machine: does an SDXL file load in its own dtype without a copy,
and does fp32 (or bf16) inference fit in 24 GiB?

    python -m benchmarks.sdxl [--steps 1] [--dtypes fp32,bf16,fp16] [--threads T]

An SDXL base checkpoint at the real sizes (UNet 2.57 B parameters, CLIP ViT-L, OpenCLIP bigG, VAE) with seeded
random weights is written once as fp16 .safetensors (6.9 GB) to benchmarks/out/checkpoints/; then, each in a
fresh process (`benchmarks.child`): loading it in each dtype (the fp16 load memory-maps the file: no copy), and a
whole 1024x1024 image (prompt, `--steps` steps with guidance, decode) in each dtype. Peak RSS is VmHWM; the
weights memory-mapped from the file count once touched. On 2 cores one guided SDXL step at 1024x1024 takes
minutes: keep --steps at 1 or 2.
"""

import argparse

import torch

from benchmarks import assets
from benchmarks.bench import GIB, gib, log, markdown_table, run_child

PATH = assets.CHECKPOINT_DIR / "sdxl-random.fp16.safetensors"


def sdxl_state() -> dict[str, torch.Tensor]:
    """The SDXL base file's tensors (fp16, seeded random values of each weight's own scale), under sgm's keys."""
    from sd.clip import CLIPConfig, CLIPTextModel
    from sd.families import SDXL
    from sd.unet import UNet, UNetConfig
    from sd.vae import AutoencoderKL
    from tests.tiny import random_weights
    unet = UNetConfig(channel_mult=(1, 2, 4), attention_levels=(1, 2), context_dim=2048, head_channels=64,
                      linear_proj=True, transformer_depth=(0, 2, 10), adm_in_channels=2816)
    towers = {"clip": CLIPConfig(), "clip_g": CLIPConfig(width=1280, layers=32, heads=20, activation="gelu",
                                                         projection_dim=1280)}
    gen, state = torch.Generator().manual_seed(0), {}
    with torch.device("meta"):
        networks = {"unet": UNet(unet), "vae": AutoencoderKL(), **{n: CLIPTextModel(c) for n, c in towers.items()}}
    for net, model in networks.items():
        weights = random_weights(model, gen, torch.float16)
        weights = SDXL.renames[net].write(weights) if net in SDXL.renames else weights
        state |= {SDXL.prefixes[net][0] + k: v for k, v in weights.items()}
    return state


def ensure_checkpoint() -> None:
    if not PATH.is_file():
        log(f"writing {PATH} (once; a few minutes)")
        PATH.parent.mkdir(parents=True, exist_ok=True)
        assets.save(sdxl_state(), PATH)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    ensure_checkpoint()
    tensors = assets.tensor_bytes(PATH)
    rows = []
    for dtype in args.dtypes.split(","):
        log(f"load in {dtype}, then a 1024x1024 image of {args.steps} step(s)")
        load = run_child("load", "ours", PATH, args, dtype)
        image = run_child("txt2img", "ours", PATH, args, dtype)
        if "error" in load or "error" in image:
            rows.append([dtype, load.get("error", ""), image.get("error", ""), "", "", ""])
            continue
        rows.append([dtype, f"{load['load_s']:.1f}", gib(load["peak_kib"] - load["base_kib"]),
                     gib(load["loaded_anon_kib"]), f"{image['run_s']:.0f}", gib(image["peak_kib"])])
    print(f"SDXL base, fp16 file of {tensors / GIB:.2f} GiB of tensors, {args.threads} threads, "
          f"{assets.cpu_name()}")
    print(markdown_table(["dtype", "load s", "load peak rise GiB", "anonymous after load GiB",
                          f"{args.steps}-step 1024x1024 image s", "image peak RSS GiB"], rows))


if __name__ == "__main__":
    main()
