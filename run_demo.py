"""Make images with Stable Diffusion v1.x: text-to-image, image-to-image and inpainting.

    python run_demo.py --prompt "a watercolor fox in the snow"                   # text-to-image
    python run_demo.py --prompt "an oil painting" --image photo.png              # image-to-image
    python run_demo.py --prompt "a red sofa" --image room.png --mask mask.png    # inpainting: white is repainted
    python run_demo.py --from-png outputs/20250101-120000.png --steps 50         # the same image, with changes
    python run_demo.py --prompt "a (red:1.3) fox, <my-style>" --embedding my-style.pt --clip-skip 2

Each image is a PNG whose "parameters" text chunk holds its prompt and settings in the form of
AUTOMATIC1111's web UI; --from-png reads them back and makes the image again (bit for bit on the CPU),
the flags given beside it taking precedence. Files appear only when complete, and an existing file is
never replaced without --overwrite. Exit status: 0 on success, 2 for a bad argument or input file
(one line `error: ...` on stderr), 130 when interrupted, 1 if writing fails.
"""

import argparse
import functools
import hashlib
import itertools
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from sd.checkpoint import SD_V1_SIZE, load_checkpoint, read_metadata
from sd.cli import CommandParser, run_command
from sd.embeddings import EMBEDDING_SUFFIXES, Embedding, check_name, read_embedding
from sd.errors import CheckpointError, InputError, SettingError
from sd.files import DATA_DIR, write_atomically
from sd.lora import lora_tags
from sd.pipeline import (DEFAULT_GUIDANCE, DEFAULT_STEPS, MAX_SEED, UPSCALERS, VAE_FACTOR, Settings,
                         StableDiffusion, check_deep_cache_branch, check_hires, check_invertible, settle)
from sd.prompt import NUMBER, PromptParser, check_clip_skip, names_in
from sd.samplers import DEFAULT_SAMPLER, SAMPLERS, NoiseSchedule, make_sampler
from sd.tokenizer import CLIPTokenizer

PROG = "python run_demo.py"
DEFAULT_MODEL = "v1-5-pruned-emaonly"
TINY_MODEL = "tiny-shapes"  # the project's own model (sd/train.py), used when no official file is in data/
EMBEDDINGS_DIR = DATA_DIR / "embeddings"  # textual-inversion files, used when a prompt names them
LORA_DIR = DATA_DIR / "lora"  # LoRA files, used when a prompt holds <lora:NAME:WEIGHT>
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Peak memory of SD's VAE decoder, the largest user of memory: about 1100 numbers per output pixel
# (measured: 4.2 kB per pixel in fp32, at 256x256 and 512x512). Attention needs much less: the fused
# kernels of scaled_dot_product_attention never store the (tokens x tokens) matrices (measured on the
# CPU: 8 heads x 16384 tokens x batch 2, whose 17 GB of matrices left the peak under 0.4 GB).
DECODER_NUMBERS_PER_PIXEL = 1100
TILED_DECODE_PIXELS = (64 * VAE_FACTOR) ** 2  # one tile of AutoencoderKL.decode_tiled's default 64 latents
MAX_IMAGES = 10_000  # per run: each is named (and its name checked) before the first is made
NEGATIVE_MARK = "\nNegative prompt: "  # where the prompt ends and the negative prompt begins in "parameters"
# One "Key: value" of the settings line; values with commas are JSON-quoted (as AUTOMATIC1111 writes them).
SETTING = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def hashes(text: str) -> dict[str, str]:
    """AUTOMATIC1111's "name: hash, name: hash" (TI hashes, Lora hashes) as {name: hash}."""
    return {name.strip(): value.strip() for name, value in (item.rsplit(":", 1) for item in text.split(", "))}


PNG_FIELDS = {  # settings-line key: (our name, type)
    "Steps": ("steps", int), "Sampler": ("sampler", lambda s: s.lower().replace("dpm++", "dpmpp").replace(" ", "_")),
    "CFG scale": ("guidance_scale", float), "Seed": ("seed", int), "Denoising strength": ("strength", float),
    "Init image": ("image", Path), "Mask": ("mask", Path), "Tiled decode": ("tiled_decode", lambda s: s == "True"),
    "Model": ("model", str), "Model hash": ("model_hash", str), "Clip skip": ("clip_skip", int),
    "Inversion prompt": ("invert", str), "Hires upscale": ("hires_scale", float), "Hires steps": ("hires_steps", int),
    "Hires upscaler": ("hires_upscaler", str.lower), "Deep cache": ("deep_cache", int),
    "Deep cache branch": ("deep_cache_branch", int), "Token merging ratio": ("token_merging", float),
    "TI hashes": ("ti_hashes", hashes),
    "Lora hashes": ("lora_hashes", hashes),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags. Settings that --from-png can supply default to None here and are settled in `settle_flags`."""
    p = CommandParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", help="what to draw, of any length, in AUTOMATIC1111's syntax: (more), [less], "
                                    "(text:1.3), BREAK; --prompt '' makes an unconditional image (default: none, "
                                    "required unless --from-png gives one)")
    p.add_argument("--negative-prompt", help="what to steer away from (default: none)")
    p.add_argument("--checkpoint", type=Path, help=f"SD v1.x checkpoint, .safetensors or .ckpt (default: "
                                                   f"data/{DEFAULT_MODEL}.safetensors, else data/{DEFAULT_MODEL}.ckpt, "
                                                   f"else the project's tiny model data/{TINY_MODEL}.safetensors)")
    p.add_argument("--image", type=Path, help="init image: image-to-image, or inpainting with --mask "
                                              "(default: none, text-to-image)")
    p.add_argument("--mask", type=Path, help="inpainting mask for --image: white is repainted, black kept "
                                             "(default: none)")
    p.add_argument("--invert", metavar="TEXT", help="DDIM inversion: turn --image back into the noise that DDIM "
                                                    "sampling with the prompt TEXT makes it from, then sample with "
                                                    "--prompt from there (ddim, the same --steps): with --prompt TEXT "
                                                    "and --guidance-scale 1 it remakes the image, another prompt edits "
                                                    "it (default: off)")
    p.add_argument("--strength", type=float, help="how much of --image is redrawn, from 0 (none) to 1 (all) "
                                                  "(default: 0.75 for image-to-image, 1.0 for inpainting)")
    p.add_argument("--steps", type=int, help=f"denoising steps, 1 to {NoiseSchedule().num_train_timesteps} "
                                             f"(default: {DEFAULT_STEPS})")
    p.add_argument("--guidance-scale", type=float, help=f"how closely to follow the prompt; 1 or less turns "
                                                        f"classifier-free guidance off (default: {DEFAULT_GUIDANCE})")
    p.add_argument("--sampler", help=f"one of {', '.join(SAMPLERS)} (default: {DEFAULT_SAMPLER})")
    p.add_argument("--seed", type=int, help="random seed, 0 to 2**64-1; image i of --num-images uses seed+i-1 "
                                            "(default: a random one, printed and stored in the PNG)")
    for side in ("width", "height"):
        p.add_argument(f"--{side}", type=int, help=f"image {side}, a multiple of {VAE_FACTOR} (default: the model's "
                                                   f"own: 512 for SD v1, 64 for {TINY_MODEL}; or that of --image "
                                                   f"rounded down)")
    p.add_argument("--clip-skip", type=int, metavar="N", help="condition on the hidden states of the text encoder's N-th last "
                                                 "layer, as AUTOMATIC1111's 'Clip skip' (default: 1, its output)")
    p.add_argument("--embedding", action="append", default=[], metavar="PATH[:NAME]",
                   help=f"a textual-inversion embedding (.pt, .safetensors or .bin), used where a prompt says NAME "
                        f"(default name: the token the file names, else its file name); repeatable. Files in "
                        f"data/embeddings/ are loaded by themselves when a prompt names them (default: none)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="a LoRA file (kohya's or diffusers' layout; .safetensors, .pt or .ckpt) merged into the model "
                        "with WEIGHT (default 1); repeatable. It is written into the PNG's prompt as AUTOMATIC1111's "
                        "<lora:NAME:WEIGHT>; such a tag in --prompt loads data/lora/NAME.safetensors (default: none)")
    p.add_argument("--hires-scale", type=float, metavar="S", help="AUTOMATIC1111's hires fix: make the image at "
                                                                  "--width x --height, upscale it S times (S > 1) and "
                                                                  "redraw it at that size (default: off)")
    p.add_argument("--hires-strength", type=float, help="how much the hires fix redraws, 0 to 1 (default: 0.55)")
    p.add_argument("--hires-steps", type=int, help="steps of the hires fix's redraw (default: --steps)")
    p.add_argument("--hires-upscaler", choices=UPSCALERS, help="latent (bilinear in latent space) or lanczos "
                                                               "(decode, Lanczos, encode) (default: latent)")
    p.add_argument("--deep-cache", type=int, metavar="N", help="DeepCache: a full UNet call every N steps, only its "
                                                                "shallow branch in between: faster, a slightly "
                                                                "different image (default: off)")
    p.add_argument("--deep-cache-branch", type=int, metavar="B", help="the skip connection DeepCache's shallow branch "
                                                                      "ends at, 0 the outermost (default: 0)")
    p.add_argument("--tome", type=float, metavar="RATIO", dest="token_merging",
                   help="token merging: merge this share of the image tokens (0 to 0.75, e.g. 0.5) before the "
                        "self-attention of the highest-resolution blocks: faster, a slightly different image "
                        "(default: off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and the VAE decoder: the first "
                   "image takes minutes longer (compiling), later ones and later steps run faster; without a working "
                   "compiler a warning and the uncompiled path (default: off)")
    p.add_argument("--num-images", type=int, default=1, help=f"how many images to make, one after another, 1 to "
                                                             f"{MAX_IMAGES} (default: 1)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if available, else mps, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, help="fp32, bf16 or fp16 (default: fp32 on the CPU, fp16 on "
                                                   "cuda and mps)")
    p.add_argument("--output", type=Path, help="the PNG to write; with --num-images N: NAME-1.png ... NAME-N.png "
                                               "(default: outputs/<date>-<time>.png)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files (default: keep them and "
                                                            "write NAME-1.png, NAME-2.png, ... instead)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: one on stderr)")
    p.add_argument("--tiled-decode", action="store_true", default=None,
                   help="decode the image in overlapping tiles: bounded memory for large images, slightly different "
                        "pixels (default: off)")
    p.add_argument("--from-png", type=Path, metavar="PNG", help="take the prompt and settings stored in PNG (by "
                                                                "this program or AUTOMATIC1111's web UI); the "
                                                                "flags given beside it override them (default: none)")
    return p.parse_args(argv)


# ---- settings ------------------------------------------------------------------------------------

def read_parameters(png: Path) -> dict:
    """The settings in the "parameters" text chunk of `png`, under the names of our flags (plus model,
    model_hash, which the checkpoint is checked against)."""
    if not png.is_file():
        raise InputError(f"--from-png {png} not found; check the path")
    try:
        with Image.open(png) as image:
            text = getattr(image, "text", {}).get("parameters")  # only PNGs have text chunks
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read --from-png {png}: {e}") from None
    lines = (text or "").split("\n")
    prompt, _, negative = "\n".join(lines[:-1]).partition(NEGATIVE_MARK)
    try:
        settings = {key: json.loads(value) if value.startswith('"') else value
                    for key, value in SETTING.findall(lines[-1])}
        found = {PNG_FIELDS[key][0]: PNG_FIELDS[key][1](value) for key, value in settings.items() if key in PNG_FIELDS}
        found["width"], found["height"] = map(int, settings["Size"].split("x"))
    except (KeyError, ValueError):
        raise InputError(f"{png} holds no generation parameters that {PROG} can read (a 'parameters' text chunk "
                         f"ending in a line 'Steps: ..., Size: WxH, ...'); give a PNG made by {PROG}") from None
    found.update(prompt=prompt, negative_prompt=negative)
    for key in ("image", "mask"):  # stored relative to the PNG's folder: found from anywhere
        if key in found and not found[key].is_absolute():
            found[key] = Path(os.path.normpath(png.parent / found[key]))
    if "hires_scale" in found and "strength" in found:  # the strength of AUTOMATIC1111's txt2img "hires fix"
        found["hires_strength"] = found.pop("strength")
    if "image" not in found or "invert" in found:
        found.pop("strength", None)
    return found


GENERATION_FLAGS = ("image", "mask", "strength", "steps", "guidance_scale", "sampler", "seed", "width", "height",
                    "num_images", "clip_skip", "deep_cache", "deep_cache_branch", "token_merging")


def settle_flags(args: argparse.Namespace, stored: dict, image_size: int) -> Settings:
    """Fill the settings not given from the PNG's, then check them and fill the rest with the library's
    defaults (`sd.pipeline.settle`, which needs no weights): all before any slow work."""
    for key, value in stored.items():
        if key in vars(args) and getattr(args, key) is None:
            setattr(args, key, value)
    if args.prompt is None:
        raise InputError("give --prompt TEXT (--prompt '' for an unconditional image) or --from-png PNG")
    if NEGATIVE_MARK in args.prompt:
        raise InputError(f"--prompt holds a line starting {NEGATIVE_MARK.strip()!r}, which the PNG's parameters could "
                         f"not tell apart from the negative prompt; reword that line or use --negative-prompt")
    args.negative_prompt = args.negative_prompt or ""
    args.loras = resolve_loras(args)  # may add <lora:...> tags to args.prompt, which the PNG keeps
    args.text, args.negative_text = lora_tags(args.prompt)[0], lora_tags(args.negative_prompt)[0]  # for the model
    if args.invert is not None:
        check_inversion(args)
    check_hires_flags(args)
    args.sampler = args.sampler or DEFAULT_SAMPLER
    args.tiled_decode = bool(args.tiled_decode)
    given = {key: getattr(args, key) for key in GENERATION_FLAGS if getattr(args, key) is not None}
    args.inversion_size = {key: given[key] for key in ("width", "height") if key in given}  # else the image's own
    settings = settle(args.text, args.negative_text, image_size=image_size, **given)
    if args.num_images > MAX_IMAGES:
        raise InputError(f"--num-images must be at most {MAX_IMAGES} in one run, got {args.num_images}; run again "
                         f"for more")
    if settings.seed + args.num_images - 1 > MAX_SEED:
        raise InputError(f"--seed {settings.seed} with --num-images {args.num_images} runs past 2**64-1 (image i "
                         f"uses seed+i-1); give a lower --seed")
    if args.invert is not None and not args.inversion_size:
        check_invertible(settings.image)
    for key in ("strength", "steps", "guidance_scale", "seed", "width", "height", "clip_skip", "deep_cache",
                "deep_cache_branch"):
        setattr(args, key, getattr(settings, key))
    args.token_merging = settings.token_merging.ratio if settings.token_merging is not None else None
    return settings


def check_hires_flags(args: argparse.Namespace) -> None:
    """The hires fix is for text-to-image; its settings are checked as the library checks them."""
    if args.hires_scale is None:
        extra = [flag for flag in ("hires_strength", "hires_steps", "hires_upscaler") if getattr(args, flag) is not None]
        if extra:
            raise InputError(f"--{extra[0].replace('_', '-')} sets the hires fix, which --hires-scale S turns on; "
                             f"give it too")
        return
    if args.image is not None:
        raise InputError("--hires-scale upscales a text-to-image result; leave out --image (or --hires-scale)")
    args.hires_strength = 0.55 if args.hires_strength is None else args.hires_strength
    args.hires_upscaler = args.hires_upscaler or "latent"
    sampler = make_sampler(args.sampler or DEFAULT_SAMPLER)
    check_hires(args.hires_scale, args.hires_strength, args.hires_steps, args.hires_upscaler, sampler.max_steps)


def check_inversion(args: argparse.Namespace) -> None:
    """--invert needs --image, samples with ddim and redraws the whole image."""
    for flag, wrong in (("--image", args.image is None), ("no --mask", args.mask is not None),
                        ("no --strength", args.strength is not None), ("--sampler ddim", args.sampler not in (None, "ddim"))):
        if wrong:
            raise InputError(f"--invert needs {flag}: it turns --image into noise and samples back from it with ddim")
    args.sampler = "ddim"


def path_and_suffix(value: str, is_suffix) -> tuple[Path, str | None]:
    """A flag's PATH or PATH:SUFFIX, SUFFIX being what `is_suffix` accepts; a PATH that exists as written wins
    (so C:\\x.pt stays a path)."""
    path, colon, suffix = value.rpartition(":")
    if not colon or not path or Path(value).exists() or not is_suffix(suffix):
        return Path(value), None
    return Path(path), suffix


def resolve_loras(args: argparse.Namespace) -> list[tuple[Path, float]]:
    """The LoRA files and weights to merge: each --lora becomes a <lora:NAME:WEIGHT> tag in args.prompt (or
    sets the weight of the tag of that name already there, as --from-png gives it), then every tag is
    looked up in the --lora files and data/lora/."""
    given = {}
    for value in args.lora:
        path, weight = path_and_suffix(value, NUMBER.fullmatch)  # --lora PATH[:WEIGHT]
        if not path.is_file():
            raise InputError(f"--lora {path} not found; check the path")
        given[path.stem.lower()] = path
        tag = re.compile(rf"<lora:{re.escape(path.stem)}(:[^>]*)?>", re.IGNORECASE)
        if not tag.search(args.prompt):
            args.prompt += f" <lora:{path.stem}:{weight or 1}>"
        elif weight is not None:
            args.prompt = tag.sub(f"<lora:{path.stem}:{weight}>", args.prompt)
    loras = []
    for name, weight in lora_tags(args.prompt)[1]:
        if weight and not NUMBER.fullmatch(weight):
            raise InputError(f"--prompt has <lora:{name}:{weight}>, whose weight {weight!r} is not a number; write "
                             f"<lora:{name}:0.8>")
        found = [LORA_DIR / f"{name}{suffix}" for suffix in LORA_SUFFIXES if (LORA_DIR / f"{name}{suffix}").is_file()]
        path = given.get(name.lower()) or next(iter(found), None)
        if path is None:
            raise InputError(f"--prompt has <lora:{name}>, but there is no {name}.safetensors in {shown(LORA_DIR)}/; "
                             f"put the file there or pass --lora PATH")
        loras.append((path, float(weight or 1)))
    return loras


def read_embeddings(args: argparse.Namespace, stored: dict, tokenizer: CLIPTokenizer) -> list[Embedding]:
    """The --embedding files, and those in data/embeddings/ that the prompts name (by file name, as
    AUTOMATIC1111 names them), read and their names checked; then the prompts are parsed with them
    (malformed or too long: refused), all before loading the model. The embeddings a --from-png image
    was made with must be among them, when the prompts still use them."""
    loaded: dict[str, Embedding] = {}

    def add(embedding: Embedding) -> None:
        check_name(embedding, tokenizer, loaded)
        loaded[embedding.name] = embedding

    for value in args.embedding:
        add(read_embedding(*path_and_suffix(value, lambda name: not any(c in name for c in "/\\"))))
    texts = f"{args.text}\n{args.negative_text}"
    folder = {path.stem: path for path in sorted(EMBEDDINGS_DIR.glob("*"))
              if path.suffix.lower() in EMBEDDING_SUFFIXES} if EMBEDDINGS_DIR.is_dir() else {}
    given = {name.lower() for name in loaded}
    for name in names_in(texts, [name for name in folder if name.lower() not in given]):
        add(read_embedding(folder[name], name))
    parser = PromptParser(tokenizer, loaded)
    parser.parse(args.text)
    parser.parse(args.negative_text, "negative_prompt")
    made_with = stored.get("ti_hashes", {})
    known = {name.lower(): e for name, e in loaded.items()}
    for name in names_in(texts, made_with):
        if name.lower() not in known:
            raise InputError(f"{args.from_png} was made with the embedding {name} (hash {made_with[name]}), which is "
                             f"not loaded; put its file in {shown(EMBEDDINGS_DIR)}/ or pass --embedding PATH:{name}")
        if known[name.lower()].short_hash != made_with[name]:
            e = known[name.lower()]
            note(f"{args.from_png} was made with the embedding {name} of hash {made_with[name]}, {shown(e.path)} has "
                 f"hash {e.short_hash}: the image will differ")
    return list(loaded.values())


def pick_device(name: str | None) -> torch.device:
    """The device asked for, if this machine has it; by default cuda, else mps, else cpu."""
    available = ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    available += ["mps"] if torch.backends.mps.is_available() else []
    if name is None:
        return torch.device("cuda" if "cuda:0" in available else "mps" if "mps" in available else "cpu")
    try:
        device = torch.device(name)
        key = f"cuda:{device.index or 0}" if device.type == "cuda" else device.type
    except RuntimeError:
        key = None
    if key not in available:
        raise InputError(f"device {name!r} is unknown or not available on this machine; use one of: "
                         f"{', '.join(available)}")
    return device


def pick_dtype(name: str | None, device: torch.device) -> str:
    """The --dtype asked for; by default fp32 on the CPU, fp16 elsewhere."""
    if name == "fp16" and device.type == "cpu":
        raise InputError("fp16 is slow and inaccurate on the CPU; use --dtype bf16 or fp32")
    return name or ("fp32" if device.type == "cpu" else "fp16")


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device`: CUDA's free memory, else the system's MemAvailable (Linux); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return int(re.search(r"^MemAvailable:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)[1]) * 1024
    except (OSError, TypeError):
        return None


def check_memory(width: int, height: int, device: torch.device, dtype: torch.dtype, tiled: bool) -> None:
    """Refuse a size whose decoding cannot fit in the free memory (estimate: DECODER_NUMBERS_PER_PIXEL;
    a tiled decode needs that of one tile, TILED_DECODE_PIXELS)."""
    pixels = min(width * height, TILED_DECODE_PIXELS) if tiled else width * height
    need, free = DECODER_NUMBERS_PER_PIXEL * pixels * dtype.itemsize, free_memory(device)
    if free is not None and need > free:
        raise InputError(f"{width}x{height} needs about {need / 2**30:.1f} GiB to decode but {device.type} has "
                         f"{free / 2**30:.1f} GiB free; lower --width and --height"
                         f"{'' if tiled else ', or add --tiled-decode'}")


# ---- files ---------------------------------------------------------------------------------------

def shown(path: Path) -> str:
    """`path` relative to the current folder when inside it, as a user would type it."""
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


def default_checkpoint(model: str | None) -> Path:
    """data/<model>.safetensors or .ckpt for the model a --from-png names, else the v1.5 file, else the
    project's tiny model (with a note that says so and how to get the official weights)."""
    if model is not None and Path(model).name != model:  # a PNG's "Model" names a file in data/, nothing else
        raise InputError(f"--from-png names the model {model!r}, which is not a file name in {shown(DATA_DIR)}/; "
                         f"pass --checkpoint PATH")
    for name in filter(None, (model, DEFAULT_MODEL)):
        for path in (DATA_DIR / f"{name}.safetensors", DATA_DIR / f"{name}.ckpt"):
            if path.is_file():
                return path
    tiny = DATA_DIR / f"{TINY_MODEL}.safetensors"
    if tiny.is_file():
        note(f"no official checkpoint in {shown(DATA_DIR)}/, so using the project's own tiny model {shown(tiny)}: "
             f"64x64 shapes only, prompts like 'a large red circle in the top left'; for real images put "
             f"{DEFAULT_MODEL}.safetensors in {shown(DATA_DIR)}/ (see README) or pass --checkpoint PATH")
        return tiny
    raise CheckpointError(f"checkpoint not found: {shown(DATA_DIR / DEFAULT_MODEL)}.safetensors. Download "
                          f"{DEFAULT_MODEL}.safetensors (the official Stable Diffusion v1.5 weights, from the "
                          f"stable-diffusion-v1-5 repository on Hugging Face) and put it in {shown(DATA_DIR)}/, "
                          f"or pass --checkpoint PATH.")


def model_hash(path: Path) -> str:
    """The first 10 hex digits of the file's SHA-256 (AUTOMATIC1111's "Model hash")."""
    return file_hash(path)[:10]


def file_hash(path: Path) -> str:
    """The file's SHA-256 in hex. Hashing 4 GB takes seconds, so the digest is kept beside the file in
    NAME.sha256 (sha256sum's format, so `sha256sum -c` checks it) and reused while that is newer than the
    file's last change (its ctime)."""
    sidecar = path.with_name(path.name + ".sha256")
    try:
        if sidecar.stat().st_mtime_ns >= path.stat().st_ctime_ns:
            digest = sidecar.read_text().split()[0]
            if re.fullmatch(r"[0-9a-f]{64}", digest):
                return digest
    except (OSError, IndexError):
        pass
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    try:
        write_atomically(sidecar, lambda tmp: tmp.write_text(f"{digest}  {path.name}\n"))
    except OSError:
        pass  # a read-only folder: hash again next time
    return digest


def check_output(path: Path, is_default: bool) -> None:
    """Refuse an output that cannot be written, before any work is done."""
    if path.is_dir():
        raise InputError(f"--output {path} is a folder; give a file name ending in .png")
    if path.suffix.lower() != ".png":
        raise InputError(f"--output {path} must end in .png: the image keeps its parameters in a PNG text chunk")
    folder = path.parent
    try:
        if is_default:
            folder.mkdir(parents=True, exist_ok=True)
        elif not folder.is_dir():
            raise InputError(f"output folder {folder} does not exist; create it first or choose another --output")
        probe = folder / f".{path.name}.{os.getpid()}.probe"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write to output folder {folder} ({e.strerror}); choose another --output") from None


def numbered(path: Path, k: int) -> Path:
    return path.with_name(f"{path.stem}-{k}{path.suffix}")


def output_paths(output: Path, n: int, overwrite: bool) -> list[Path]:
    """`output`, or NAME-1.png ... NAME-n.png for several images. Without `overwrite`, names already taken
    are skipped for the next free numbered ones, with a note."""
    wanted = [output] if n == 1 else [numbered(output, k) for k in range(1, n + 1)]
    taken = [p for p in wanted if p.exists()]
    if overwrite or not taken:
        return wanted
    paths = list(itertools.islice((p for k in itertools.count(1) if not (p := numbered(output, k)).exists()), n))
    note(f"{', '.join(map(str, taken))} exist{'s' * (len(taken) == 1)}; writing {', '.join(map(str, paths))} "
         f"instead (--overwrite replaces)")
    return paths


def parameters_text(args: argparse.Namespace, seed: int, checkpoint: Path, short_hash: str, png: Path,
                    used: list[Embedding], lora_hashes: dict[str, str]) -> str:
    """The settings in AUTOMATIC1111's form: the prompt, "Negative prompt: ...", then one line of settings;
    `used`: the embeddings the prompts use ("TI hashes"); `lora_hashes`: by LoRA name ("Lora hashes").
    The init image and mask are named relative to the folder of `png`, where --from-png looks for them."""
    def near_png(path: Path) -> str:
        return os.path.relpath(path.resolve(), png.parent.resolve())

    settings = {"Steps": args.steps, "Sampler": args.sampler, "CFG scale": args.guidance_scale, "Seed": seed,
                "Size": f"{args.width}x{args.height}", "Model hash": short_hash, "Model": checkpoint.stem}
    if args.image is not None:
        settings.update({"Denoising strength": args.strength} if args.invert is None else {"Inversion prompt": args.invert})
        settings["Init image"] = near_png(args.image)
    if args.mask is not None:
        settings["Mask"] = near_png(args.mask)
    if args.hires_scale is not None:
        settings.update({"Denoising strength": args.hires_strength, "Hires upscale": args.hires_scale,
                         "Hires upscaler": args.hires_upscaler.capitalize()})
        if args.hires_steps is not None:
            settings["Hires steps"] = args.hires_steps
    if args.clip_skip > 1:
        settings["Clip skip"] = args.clip_skip
    if args.deep_cache is not None:
        settings.update({"Deep cache": args.deep_cache, "Deep cache branch": args.deep_cache_branch})
    if args.token_merging is not None:
        settings["Token merging ratio"] = args.token_merging
    if used:
        settings["TI hashes"] = ", ".join(f"{e.name}: {e.short_hash}" for e in used)
    if lora_hashes:
        settings["Lora hashes"] = ", ".join(f"{name}: {h}" for name, h in lora_hashes.items())
    if args.tiled_decode:
        settings["Tiled decode"] = True
    line = ", ".join(f"{key}: {quote(str(value))}" for key, value in settings.items())
    return "\n".join([args.prompt, *([f"{NEGATIVE_MARK[1:]}{args.negative_prompt}"] * bool(args.negative_prompt)),
                      line])


def quote(value: str) -> str:
    """A settings value, JSON-quoted if it holds a comma, colon, quote or newline (as AUTOMATIC1111 does)."""
    return json.dumps(value, ensure_ascii=False) if re.search(r'[,:"\n]', value) else value


def write_png(image: Image.Image, path: Path, parameters: str, overwrite: bool) -> Path:
    """Write the PNG; without `overwrite`, under the next free numbered name if `path` was taken meanwhile
    (by another run, say). Returns the path written."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)  # as iTXt (UTF-8) when the text is not Latin-1
    for candidate in itertools.chain([path], (numbered(path, k) for k in itertools.count(1))):
        try:
            write_atomically(candidate, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), overwrite)
            if candidate != path:
                note(f"{path} appeared while the image was made; wrote {candidate} instead (--overwrite replaces)")
            return candidate
        except FileExistsError:
            continue


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


# ---- the command ---------------------------------------------------------------------------------

def run(argv: list[str] | None) -> None:
    """Every check first, so that a mistake costs no loading or generating; then load and generate. The
    library's messages about settings name its parameters; here they name the flags."""
    try:
        load_and_generate(parse_args(argv))
    except SettingError as e:
        raise e.for_flags() from None


def load_and_generate(args: argparse.Namespace) -> None:
    stored = read_parameters(args.from_png) if args.from_png else {}
    device = pick_device(args.device)
    args.dtype = pick_dtype(args.dtype, device)
    checkpoint = args.checkpoint or default_checkpoint(stored.get("model"))
    settings = settle_flags(args, stored, read_metadata(checkpoint).get("image_size", SD_V1_SIZE)
                            if checkpoint.is_file() else SD_V1_SIZE)
    tokenizer = CLIPTokenizer()
    embeddings = read_embeddings(args, stored, tokenizer)
    final = [int(side * (args.hires_scale or 1)) // VAE_FACTOR * VAE_FACTOR for side in (args.width, args.height)]
    check_memory(*final, device, DTYPES[args.dtype], args.tiled_decode)
    output = args.output or Path("outputs") / f"{time.strftime('%Y%m%d-%H%M%S')}.png"
    check_output(output, is_default=args.output is None)
    paths = output_paths(output, args.num_images, args.overwrite)
    for what, path, picture in (("init image", args.image, settings.image), ("mask", args.mask, settings.mask)):
        if picture is not None and picture.size != (args.width, args.height):
            note(f"{what} {path} is {picture.width}x{picture.height}; resized to {args.width}x{args.height}")

    pipe = StableDiffusion(load_checkpoint(checkpoint, device, DTYPES[args.dtype]), tokenizer)
    for embedding in embeddings:
        pipe.add_embedding(embedding)
    check_clip_skip(args.clip_skip, pipe.models.clip.config.layers)
    check_deep_cache_branch(args.deep_cache_branch, pipe.models.unet)
    lora_hashes = {}
    for path, weight in args.loras:
        pipe.load_lora(path, weight)
        lora_hashes[path.stem] = file_hash(path)[:12]
        stored_hash = stored.get("lora_hashes", {}).get(path.stem, lora_hashes[path.stem])
        if stored_hash != lora_hashes[path.stem]:
            note(f"{args.from_png} was made with the LoRA {path.stem} of hash {stored_hash}, {shown(path)} has hash "
                 f"{lora_hashes[path.stem]}: the image will differ")
    if args.compile and pipe.compile():
        note("--compile: the UNet and the VAE decoder compile during the first image (minutes on a CPU), and "
             "again when the size changes")
    short_hash = model_hash(checkpoint)
    unseen = pipe.unseen_words(args.text + " " + args.negative_text)
    if unseen:
        note(f"{checkpoint.stem} never saw the words {', '.join(unseen)} in training and will ignore their meaning; "
             f"it knows: {' '.join(pipe.models.vocabulary)}")
    if stored.get("model_hash", short_hash) != short_hash:
        note(f"{args.from_png} was made with model {stored.get('model')} (hash {stored['model_hash']}), this is "
             f"{checkpoint.stem} (hash {short_hash}): the image will differ")
    generate(pipe, args, settings, paths, checkpoint, short_hash, lora_hashes)


def generate(pipe: StableDiffusion, args: argparse.Namespace, settings: Settings, paths: list[Path],
             checkpoint: Path, short_hash: str, lora_hashes: dict[str, str]) -> None:
    """Make the images one after another, image i with seed + i, each written as soon as it is done."""
    mode = ("text-to-image" if args.image is None else "inversion" if args.invert is not None
            else "image-to-image" if args.mask is None else "inpainting")
    steps = f"{args.steps} step{'s' * (args.steps > 1)}"
    if args.hires_scale is not None:
        final = (int(side * args.hires_scale) // VAE_FACTOR * VAE_FACTOR for side in (args.width, args.height))
        mode += ", then hires fix to {}x{}".format(*final)
    print(f"{mode}, {args.width}x{args.height}, {steps} of {args.sampler}, seed {args.seed}"
          f"{f', {len(paths)} images' if len(paths) > 1 else ''}, on {pipe.device} in {args.dtype}", flush=True)
    used = {e.name: e for text, what in ((args.text, "prompt"), (args.negative_text, "negative_prompt"))
            for e in pipe.prompt_parser.parse(text, what).embeddings}  # in the order of first use
    start = {}  # what the run starts from: the image (image-to-image, inpainting) or its inversion
    if args.invert is not None:
        start["latents"] = pipe.invert(settings.image, lora_tags(args.invert)[0], steps=args.steps, progress=not
                                       args.no_progress, clip_skip=args.clip_skip, **args.inversion_size)
    elif args.image is not None:
        start = dict(image=settings.image, mask=settings.mask, strength=args.strength)
    make = pipe.generate
    if args.hires_scale is not None:
        make = functools.partial(pipe.hires_fix, hires_scale=args.hires_scale, hires_strength=args.hires_strength,
                                 hires_steps=args.hires_steps, hires_upscaler=args.hires_upscaler)
    for i, path in enumerate(paths):
        seed = args.seed + i
        began = time.perf_counter()
        [picture] = make(args.text, args.negative_text, **start, steps=args.steps,
                         guidance_scale=args.guidance_scale, sampler=args.sampler, seed=seed,
                         width=args.width, height=args.height, progress=not args.no_progress,
                         tiled_decode=args.tiled_decode, clip_skip=args.clip_skip,
                         deep_cache=args.deep_cache, deep_cache_branch=args.deep_cache_branch,
                         token_merging=args.token_merging)
        parameters = parameters_text(args, seed, checkpoint, short_hash, path, list(used.values()), lora_hashes)
        written = write_png(picture, path, parameters, args.overwrite)
        took = f", {time.perf_counter() - began:.1f} s" if args.compile else ""  # the first one includes compiling
        print(f"wrote {written} (seed {seed}{took})", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: run(argv), interrupted="no partial file was left behind",
                       out_of_memory="lower --width and --height")


if __name__ == "__main__":
    # Warnings (e.g. the words a prompt over 77 tokens loses) as one line, without Python's file and line.
    warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
    sys.exit(main())
