"""Speed and memory of this implementation against diffusers 0.42 / transformers 5, same weights, same inputs.

    python -m benchmarks.bench [--checkpoint PATH] [--dtype fp32|bf16|all] [--steps N] [--repeats R]
                               [--threads T] [--quick] [--out benchmarks/out/results.md] [--only clip,unet,...]

Parts (names for --only):
  clip     CLIP text encoder, batch 2 (token ids -> hidden states; tokenizing is not timed)
  unet     one UNet call, batch 2 (a guided step), 64x64 latents, timestep 500
  decode   VAE decode, latents (1, 4, 64, 64) -> image (1, 3, 512, 512)
  encode   VAE encode, image (1, 3, 512, 512) -> latent mean and log-variance (1, 4, 64, 64)
  txt2img  a whole 512x512 image: prompt, N steps of dpmpp_2m_karras with guidance 7.5, decode
  load     checkpoint load time and peak RSS, fp32/fp16 x .safetensors/.ckpt to fp32 (and fp32.safetensors
           to bf16 when bf16 is benchmarked), each in a fresh process
  run      peak RSS of a whole N-step 512x512 image (load included), each in a fresh process
  bigdecode  our VAE decoding a 1024x1024 image, whole and tiled (--tiled-decode): time and peak RSS
  gpu      (only when CUDA is available) fp16 UNet it/s with guidance, batch 1, and a 50-step image
The first four and txt2img run in this process, for each --dtype, ours and diffusers alternating
(the order flips every repeat), after warm-up, under torch.inference_mode, with the same thread count;
the table gives medians and the relative difference of the outputs (a check that both did the same work).

Modes       steps  repeats (components / txt2img / load)  warm-up   time on 2 cores
  --quick     1      1 / 1 / 1                              0         about 9 min
  default     8      5 / 2 / 2                              1         about 30-35 min
--steps and --repeats override them (--repeats sets the component repeats; txt2img and load take
half of it, at least 1). Load times are with the file in the page cache (it is read once before).

Without --checkpoint, a full-size SD v1.5 checkpoint with seeded random weights is written once to
benchmarks/out/checkpoints/ (see assets.py; 13 GB of disk, 2 more minutes on the first run) and used; diffusers loads it with
`StableDiffusionPipeline.from_single_file(path, config=<local diffusers config folder>, local_files_only=True)`.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks import assets
from benchmarks.child import DTYPES as ALL_DTYPES
from benchmarks.child import load_diffusers, load_ours, networks, text_to_image, touch

COMPONENTS = {"clip", "unet", "decode", "encode", "txt2img"}  # timed in this process
PARTS = ("clip", "unet", "decode", "encode", "txt2img", "load", "run", "bigdecode", "gpu")
DTYPES = {name: ALL_DTYPES[name] for name in ("fp32", "bf16")}  # on the CPU
PROMPTS = ["a photograph of an astronaut riding a horse on the moon, 4k", "watercolor fox in the snow"]
MODES = {"quick": dict(steps=1, repeats=1, warmup=0), "full": dict(steps=8, repeats=5, warmup=1)}
GIB = 2**30


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- timing -------------------------------------------------------------------------------------

@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)
    output: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_alternating(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                     sync: Callable[[], None] = lambda: None) -> dict[str, Timing]:
    """Run each call `warmup` times untimed, then `repeats` times timed, taking turns and flipping the
    order every round so that neither side always runs first. Keeps the last output of each."""
    timings = {name: Timing() for name in calls}
    for _ in range(warmup):
        for call in calls.values():
            call()
    names = list(calls)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            sync()
            start = time.perf_counter()
            output = calls[name]()
            sync()
            timings[name].seconds.append(time.perf_counter() - start)
            timings[name].output = output
    return timings


def rel_diff(ours: Any, theirs: Any) -> float:
    """max |ours - theirs| / max(1, max |theirs|), as the parity tests measure it."""
    ours, theirs = (torch.as_tensor(x).float() for x in (ours, theirs))
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1.0))


# ---- the components, in this process --------------------------------------------------------------

@dataclass
class Case:
    name: str
    ours: Callable[[], Any]  # each returns the output to compare
    theirs: Callable[[], Any]
    heavy: bool = False  # a whole image: fewer repeats, no warm-up


def cases(sd, pipe, dtype: torch.dtype, steps: int) -> list[Case]:
    """The timed calls of both implementations on the same inputs."""
    gen = torch.Generator().manual_seed(0)
    ids = sd.tokenizer(PROMPTS)  # (2, 77)
    context = torch.randn(2, 77, 768, generator=gen).to(dtype)
    latents = torch.randn(2, 4, 64, 64, generator=gen).to(dtype)
    t = torch.tensor(500)
    z = torch.randn(1, 4, 64, 64, generator=gen).to(dtype)
    image = (torch.rand(1, 3, 512, 512, generator=gen) * 2 - 1).to(dtype)
    m = sd.models
    return [
        Case("clip", lambda: m.clip(ids), lambda: pipe.text_encoder(ids).last_hidden_state),
        Case("unet", lambda: m.unet(latents, t, context),
             lambda: pipe.unet(latents, t, encoder_hidden_states=context).sample),
        Case("decode", lambda: m.vae.decode(z), lambda: pipe.vae.decode(z).sample),
        Case("encode", lambda: m.vae.encode(image)[0], lambda: pipe.vae.encode(image).latent_dist.mean),
        Case("txt2img", lambda: text_to_image("ours", sd, steps), lambda: text_to_image("diffusers", pipe, steps),
             heavy=True),
    ]


def time_components(path: Path, dtype_name: str, args) -> list[list[str]]:
    """Rows (component, dtype, ours s, diffusers s, ratio, rel. diff) for one dtype."""
    if not COMPONENTS & args.only:
        return []
    dtype = DTYPES[dtype_name]
    log(f"{dtype_name}: loading ours and diffusers from {path.name}")
    # Only time_cases' frame holds the models: both are freed when it returns.
    return time_cases(load_ours(str(path), dtype), load_diffusers(str(path), dtype), dtype_name, args)


@torch.inference_mode()
def time_cases(sd, pipe, dtype_name: str, args) -> list[list[str]]:
    touch(networks("ours", sd) + networks("diffusers", pipe))
    rows = []
    for case in cases(sd, pipe, DTYPES[dtype_name], args.steps):
        if case.name not in args.only:
            continue
        repeats, warmup = (half(args.repeats), 0) if case.heavy else (args.repeats, args.warmup)
        log(f"{dtype_name} {case.name}: {warmup} warm-up + {repeats} timed rounds")
        timing = time_alternating({"ours": case.ours, "diffusers": case.theirs}, repeats, warmup)
        ours, theirs = timing["ours"], timing["diffusers"]
        log(f"  ours {fmt_list(ours.seconds)}  diffusers {fmt_list(theirs.seconds)}")
        name = f"txt2img {args.steps} steps" if case.heavy else case.name
        rows.append([name, dtype_name, f"{ours.median:.3f}", f"{theirs.median:.3f}",
                     f"{ours.median / theirs.median:.2f}", f"{rel_diff(ours.output, theirs.output):.1e}"])
    return rows


def half(n: int) -> int:
    return max(1, n // 2)


def fmt_list(seconds: list[float]) -> str:
    return "[" + ", ".join(f"{s:.2f}" for s in seconds) + "]"


# ---- load and whole-run memory, each in a fresh process ---------------------------------------------

def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 * 2**20):
            pass


def run_child(task: str, impl: str, path: Path, args, dtype: str = "fp32", extra: tuple[str, ...] = ()) -> dict:
    """Run benchmarks.child in a fresh interpreter; its JSON result, or {"error": ...}."""
    warm_page_cache(path)
    command = [sys.executable, "-m", "benchmarks.child", task, impl, str(path), "--steps", str(args.steps),
               "--dtype", dtype, "--threads", str(args.threads), *extra]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        log(f"  {task} {impl} {path.name} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
        return {"error": f"exit {done.returncode}"}
    return json.loads(lines[-1])


def median_of_runs(task: str, impl: str, path: Path, args, dtype: str, runs: int) -> dict:
    """Median of each number over `runs` fresh processes (peaks vary little; times do)."""
    results = [run_child(task, impl, path, args, dtype) for _ in range(runs)]
    good = [r for r in results if "error" not in r]
    if not good:
        return results[0]
    return {key: statistics.median(r[key] for r in good) if not isinstance(good[0][key], bool) else good[0][key]
            for key in good[0]}


def gib(kib: float) -> str:
    return f"{kib * 1024 / GIB:.2f}"


def load_rows(paths: dict[str, Path], main_variant: str, args) -> list[list[str]]:
    """Rows (file, tensors GiB, to, loader, load s, ready s, peak rise GiB, ratio, after load GiB, anon GiB):
    every file loaded to fp32, and the main file to bf16 when bf16 is benchmarked."""
    rows = []
    cases = [(v, "fp32") for v in paths] + ([(main_variant, "bf16")] if "bf16" in args.dtypes else [])
    for variant, dtype in cases:
        path = paths[variant]
        tensors = assets.tensor_bytes(path)
        for impl in ("ours", "diffusers"):
            log(f"load {variant} to {dtype} with {impl}")
            r = median_of_runs("load", impl, path, args, dtype, half(args.repeats))
            row = [variant, f"{tensors / GIB:.2f}", dtype, impl]
            if "error" in r:
                rows.append(row + [r["error"]] + [""] * 5)
                continue
            rise = r["peak_kib"] - r["base_kib"] if r["reset"] else r["peak_kib"]
            rows.append(row + [f"{r['load_s']:.1f}", f"{r['ready_s']:.1f}", gib(rise), f"{rise * 1024 / tensors:.2f}",
                               gib(r["loaded_rss_kib"] - r["base_kib"]), gib(r["loaded_anon_kib"])])
    return rows


def run_rows(path: Path, args) -> list[list[str]]:
    """Rows (implementation, steps, load s, run s, peak RSS GiB, base GiB) of a whole fp32 image."""
    rows = []
    for impl in ("ours", "diffusers"):
        log(f"whole {args.steps}-step image with {impl} in a fresh process")
        r = run_child("txt2img", impl, path, args)
        if "error" in r:
            rows.append([impl, str(args.steps), r["error"], "", "", ""])
            continue
        rows.append([impl, str(args.steps), f"{r['load_s']:.1f}", f"{r['run_s']:.1f}",
                     gib(r["peak_kib"]), gib(r["base_kib"])])
    return rows


def bigdecode_rows(path: Path, args, size: int = 1024) -> list[list[str]]:
    """Rows (size, mode, decode s, peak RSS GiB, weights GiB) of our VAE decoding one large image."""
    rows = []
    for mode, extra in (("whole", ()), ("tiled", ("--tiled",))):
        log(f"decode {size}x{size} {mode} with ours in a fresh process")
        r = run_child("decode", "ours", path, args, extra=("--size", str(size), *extra))
        if "error" in r:
            rows.append([f"{size}x{size}", mode, r["error"], "", ""])
            continue
        rows.append([f"{size}x{size}", mode, f"{r['run_s']:.1f}", gib(r["peak_kib"]), gib(r["loaded_rss_kib"])])
    return rows


# ---- GPU ------------------------------------------------------------------------------------------

def gpu_rows(path: Path, device: str = "cuda", dtype: torch.dtype = torch.float16, unet_calls: int = 50,
             image_steps: int = 50, image_repeats: int = 3) -> list[list[str]]:
    """On the GPU, fp16 and SDPA on both sides: UNet calls per second at batch 2 (one guided 512x512 step),
    and whole images with their peak allocated memory; then the same with the UNet and the VAE decoder of
    both compiled (torch.compile), with the seconds of the first compiled call (the compile's warm-up).
    (device="cpu" only smoke-tests this code.)"""
    from sd.pipeline import StableDiffusion
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sd = StableDiffusion.from_checkpoint(path, device=device, dtype=dtype)
    pipe = load_diffusers(str(path), dtype).to(device)
    gen = torch.Generator().manual_seed(0)
    latents, context = (torch.randn(shape, generator=gen).to(device, dtype) for shape in ((2, 4, 64, 64), (2, 77, 768)))
    t = torch.tensor(500, device=device)
    calls = {"ours": lambda: sd.models.unet(latents, t, context),
             "diffusers": lambda: pipe.unet(latents, t, encoder_hidden_states=context)}
    rows = []
    with torch.inference_mode():
        for mode in ("eager", "compiled"):
            warmups = {}
            if mode == "compiled":
                sd.compile()
                pipe.unet.compile()
                pipe.vae.decoder.compile()
                for impl, call in calls.items():
                    start = time.perf_counter()
                    call()
                    sync()
                    warmups[impl] = f"{time.perf_counter() - start:.0f}"
            unet = time_alternating(calls, repeats=unet_calls, warmup=min(5, unet_calls), sync=sync)
            for impl, model in (("ours", sd), ("diffusers", pipe)):
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                image = time_alternating({impl: lambda: text_to_image(impl, model, image_steps)},
                                         repeats=image_repeats, warmup=1, sync=sync)[impl]
                peak = torch.cuda.max_memory_allocated() / GIB if cuda else float("nan")
                rows.append([impl, mode, f"{1 / unet[impl].median:.1f}", str(image_steps), f"{image.median:.2f}",
                             f"{image_steps / image.median:.1f}", f"{peak:.2f}", warmups.get(impl, "")])
    return rows


# ---- report ---------------------------------------------------------------------------------------

def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def machine_header(args, checkpoint: str) -> str:
    cpu = assets.cpu_name()
    ram = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal")) * 1024 / GIB
    import diffusers
    import transformers
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"# Benchmark: ours vs diffusers\n\n"
            f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}\n"
            f"- machine: {cpu}, {os.cpu_count()} cores, {ram:.1f} GiB RAM{gpu}\n"
            f"- software: Python {platform.python_version()}, torch {torch.__version__}, diffusers "
            f"{diffusers.__version__}, transformers {transformers.__version__}; {args.threads} threads on both sides\n"
            f"- mode: {'quick' if args.quick else 'full'}: {args.steps} steps, {args.repeats} repeats "
            f"(txt2img and load: {half(args.repeats)}), {args.warmup} warm-up\n"
            f"- checkpoint: {checkpoint}\n")


def report(args, checkpoint: str, sections: list[tuple[str, str, list[str], list[list[str]]]]) -> str:
    parts = [machine_header(args, checkpoint)]
    for title, note, headers, rows in sections:
        if rows:
            parts.append(f"## {title}\n\n{note}\n\n{markdown_table(headers, rows)}\n")
    return "\n".join(parts)


COMPONENT_HEADERS = ["component", "dtype", "ours median s", "diffusers median s", "ours/diffusers", "rel. diff"]
COMPONENT_NOTE = ("Medians of alternating runs in one process. rel. diff = max |ours - diffusers| / "
                  "max(1, max |diffusers|) of the outputs.")
LOAD_HEADERS = ["file", "tensors GiB", "to", "loader", "load s", "ready s", "peak RSS rise GiB", "rise / tensors",
                "RSS after load GiB", "anonymous GiB"]
LOAD_NOTE = ("Each load in a fresh process, file in the page cache. load s: the load call; ready s: plus reading "
             "every weight once (memory-mapped weights are read lazily). peak RSS rise: peak RSS during the load "
             "minus RSS after the imports; the least possible is the loaded weights (1 x tensors when the file "
             "already has the target dtype, 2 x for fp16 to fp32, 0.5 x for fp32 to bf16), more where the file's "
             "pages are counted too. anonymous: RSS not backed by the file (RssAnon, imports included), which is "
             "what the load costs the machine: file pages can be dropped by the kernel.")
RUN_HEADERS = ["implementation", "steps", "load s", "run s", "peak RSS GiB", "RSS after imports GiB"]
RUN_NOTE = "fp32 load and one 512x512 image with guidance, each in a fresh process."
BIGDECODE_HEADERS = ["image", "decode", "decode s", "peak RSS GiB", "RSS of the loaded model GiB"]
BIGDECODE_NOTE = ("Our fp32 VAE decoding one image from random latents in a fresh process, after loading the whole "
                  "checkpoint; peak RSS includes the loaded weights (all three networks).")
GPU_HEADERS = ["implementation", "mode", "UNet it/s (batch 2)", "steps", "image s", "image it/s", "peak allocated GiB",
               "first compiled UNet call s"]
GPU_NOTE = ("fp16 on CUDA, scaled_dot_product_attention on both sides, 512x512, batch 1 with guidance (UNet batch 2). "
            "UNet it/s: median of 50 calls; image: median of 3, decode included; peak allocated during the images. "
            "Compiled: torch.compile of the UNet and the VAE decoder of both, default mode.")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="an SD v1 checkpoint (default: a random one, made once)")
    parser.add_argument("--dtype", choices=[*DTYPES, "all"], default="all")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="few repeats and steps: checks that the tool works")
    parser.add_argument("--out", type=Path, default=assets.OUT_DIR / "results.md")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = parser.parse_args(argv)
    mode = MODES["quick" if args.quick else "full"]
    args.steps = args.steps or mode["steps"]
    args.repeats = args.repeats or mode["repeats"]
    args.warmup = mode["warmup"]
    args.only = set(args.only.split(","))
    if args.only - set(PARTS):
        parser.error(f"--only: unknown parts {', '.join(sorted(args.only - set(PARTS)))}; choose from {', '.join(PARTS)}")
    args.dtypes = list(DTYPES) if args.dtype == "all" else [args.dtype]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    assets.quiet()
    start = time.perf_counter()
    assets.write_diffusers_config()
    if args.checkpoint:
        paths, main_variant = {args.checkpoint.name: args.checkpoint}, args.checkpoint.name
    else:
        paths, main_variant = assets.ensure_checkpoints(log), "fp32.safetensors"
    main_path = paths[main_variant]

    # Fresh-process measurements first, while this process holds no model.
    sections = [
        ("Load", LOAD_NOTE, LOAD_HEADERS, load_rows(paths, main_variant, args) if "load" in args.only else []),
        ("Whole image, peak memory", RUN_NOTE, RUN_HEADERS, run_rows(main_path, args) if "run" in args.only else []),
        ("Large image decode", BIGDECODE_NOTE, BIGDECODE_HEADERS,
         bigdecode_rows(main_path, args) if "bigdecode" in args.only else []),
    ]
    component_rows = [row for name in args.dtypes for row in time_components(main_path, name, args)]
    sections.insert(0, ("Speed", COMPONENT_NOTE, COMPONENT_HEADERS, component_rows))
    if "gpu" in args.only and torch.cuda.is_available():
        log("GPU: fp16, ours and diffusers")
        sections.append(("GPU", GPU_NOTE, GPU_HEADERS, gpu_rows(main_path)))
    elif "gpu" in args.only:
        log("no CUDA device: the GPU part is skipped")

    text = report(args, str(args.checkpoint or "random SD v1.5 weights (benchmarks/assets.py)"), sections)
    text += f"\nTotal benchmark time: {(time.perf_counter() - start) / 60:.1f} min.\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    log(f"written to {args.out}")


if __name__ == "__main__":
    main()
