"""One measurement in a fresh process, so that its peak RSS is its own: load a checkpoint, or load it and
make one image at its size (512x512 for SD v1.5, 1024x1024 for SDXL). Run by bench.py and sdxl.py; prints one
JSON line.

    python -m benchmarks.child load ours|diffusers CHECKPOINT [--dtype fp32|bf16] [--threads T]
    python -m benchmarks.child txt2img ours|diffusers CHECKPOINT --steps N [--dtype fp32|bf16] [--threads T]
    python -m benchmarks.child decode ours CHECKPOINT --size 1024 [--tiled]

Peak RSS is VmHWM from /proc/self/status. After the imports the peak is reset (writing 5 to
/proc/self/clear_refs), so it covers the load (and run) only; the RSS after the imports is reported
too, as `base`. If the reset is not allowed, the peak includes the imports (`reset: false`).
"""

import argparse
import json
import time

import torch

from benchmarks import assets  # noqa: F401  (sets the offline environment first)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPT = "a photograph of an astronaut riding a horse on the moon, 4k"


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def touch(modules) -> None:
    """Read every page of every weight. Weights memory-mapped from a file are read lazily, on first use;
    touching them makes a load comparable with one that copies, and its RSS count the weights."""
    with torch.inference_mode():
        for module in modules:
            for tensor in (*module.parameters(), *module.buffers()):
                tensor.reshape(-1)[::512].float().sum()


def networks(impl: str, model) -> list[torch.nn.Module]:
    if impl == "ours":
        return [*model.models.text_towers, model.models.vae, model.models.unet]
    return [model.text_encoder, model.vae, model.unet]


def load_ours(path: str, dtype: torch.dtype):
    from sd.pipeline import StableDiffusion
    return StableDiffusion.from_checkpoint(path, dtype=dtype)


def load_diffusers(path: str, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_single_file(
        path, config=str(assets.write_diffusers_config()), local_files_only=True, torch_dtype=dtype,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_to_image(impl: str, model, steps: int, seed: int = 0):
    """One image at the model's size (SD v1.5: 512x512) with guidance 7.5 and the default sampler of ours
    (diffusers: the same scheduler)."""
    if impl == "ours":
        return model.text_to_image(PROMPT, steps=steps, seed=seed, guidance_scale=7.5, output_type="np",
                                   progress=False)
    return model(PROMPT, num_inference_steps=steps, guidance_scale=7.5, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(seed)).images


def decode_large(model, size: int, tiled: bool):
    """Our VAE decoding one size x size image, whole or in tiles."""
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))  # (1, 4, size/8, size/8)
    return model.decode(z, "np", tiled=tiled)


LOADERS = {"ours": load_ours, "diffusers": load_diffusers}


def import_modules(impl: str) -> None:
    """Import what the load needs beforehand: imports are not part of the load."""
    if impl == "diffusers":
        from diffusers import StableDiffusionPipeline  # noqa: F401
        from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401
        assets.write_diffusers_config()
    else:
        import sd.pipeline  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("task", choices=["load", "txt2img", "decode"])
    parser.add_argument("impl", choices=list(LOADERS))
    parser.add_argument("checkpoint")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tiled", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assets.quiet()
    import_modules(args.impl)

    base = status_kib("VmRSS")
    reset = reset_peak_rss()
    start = time.perf_counter()
    model = LOADERS[args.impl](args.checkpoint, DTYPES[args.dtype])
    result = {"load_s": time.perf_counter() - start}
    touch(networks(args.impl, model))
    result.update(ready_s=time.perf_counter() - start, loaded_rss_kib=status_kib("VmRSS"),
                  loaded_anon_kib=status_kib("RssAnon"))
    if args.task == "txt2img":
        start = time.perf_counter()
        with torch.inference_mode():
            text_to_image(args.impl, model, args.steps)
        result["run_s"] = time.perf_counter() - start
    if args.task == "decode":
        start = time.perf_counter()
        decode_large(model, args.size, args.tiled)
        result["run_s"] = time.perf_counter() - start
    result.update(base_kib=base, peak_kib=status_kib("VmHWM"), reset=reset)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
