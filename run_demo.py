"""Make images with Stable Diffusion 1.x, 2.x and SDXL: text-to-image, image-to-image and inpainting.

    python run_demo.py --prompt "a watercolor fox in the snow"                   # text-to-image
    python run_demo.py --prompt "an oil painting" --image photo.png              # image-to-image
    python run_demo.py --prompt "a red sofa" --image room.png --mask mask.png    # inpainting: white is repainted
    python run_demo.py --from-png outputs/20250101-120000.png --steps 50         # the same image, with changes
    python run_demo.py --prompt "a (red:1.3) fox, <my-style>" --embedding my-style.pt --clip-skip 2
    python run_demo.py --prompt "a lighthouse" --checkpoint data/sd_xl_base_1.0.safetensors \
        --refiner data/sd_xl_refiner_1.0.safetensors --refiner-switch 0.8                  # SDXL, refined

Each image is a PNG whose "parameters" text chunk holds its prompt and settings in the form of
AUTOMATIC1111's web UI; --from-png reads them back and makes the image again (bit for bit on the CPU),
the flags given beside it taking precedence. Files appear only when complete, and an existing file is
never replaced without --overwrite. Exit status: 0 on success, 2 for a bad argument or input file
(one line `error: ...` on stderr), 130 when interrupted, 1 if writing fails.
"""

import argparse
import functools
import gc
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

from PIL import Image

from sd.checkpoint import load_checkpoint, read_family, read_metadata
from sd.cli import CommandParser, note, run_command, shown
from sd.devices import DTYPES, check_memory, pick_device, pick_dtype
from sd.errors import CheckpointError, InputError, SettingError, checkpoint_not_found
from sd.files import DATA_DIR
from sd.families import SD1, SDXL
from sd.flags import (DEFAULT_HIRES_STRENGTH, DEFAULT_HIRES_UPSCALER, Flags, check_families, read_embeddings,
                      settle_flags)
from sd.settings import MAX_IMAGES, RANGES, REFINER_SWITCH, model_traits
from sd.hashing import SHORT_HASH_DIGITS, file_sha256, model_hash
from sd.lora import lora_tags
from sd.micro_conditioning import AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE
from sd.outputs import check_output, default_output, output_paths, write_png
from sd.parameters import TEXT_CHUNK, format_parameters, pair, parse_parameters
from sd.paths import check_unicode, file_in, plain_name, readable_file
from sd.pipeline import (DEFAULT_GUIDANCE, DEFAULT_STEPS, UPSCALERS, VAE_FACTOR, Handoff, StableDiffusion,
                         check_deep_cache_branch)
from sd.prediction import CHOICES, SHORT, family_rule
from sd.prompt import check_clip_skip
from sd.samplers import DEFAULT_SAMPLER, SAMPLERS, NoiseSchedule
from sd.tokenizer import CLIPTokenizer

PROG = "python run_demo.py"
DEFAULT_MODEL = "v1-5-pruned-emaonly"
TINY_MODEL = "tiny-shapes"  # the project's own model (sd/train.py), used when no official file is in data/
EMBEDDINGS_DIR = DATA_DIR / "embeddings"  # textual-inversion files, used when a prompt names them
LORA_DIR = DATA_DIR / "lora"  # LoRA files, used when a prompt holds <lora:NAME:WEIGHT>
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")  # of the files in data/ that a PNG's "Model" or "Refiner" names


def pair_flag(form: str, example: str):
    """The argparse type of a flag AxB (`sd.parameters.pair`) written as `form`, e.g. "HxW (height first)"."""
    def parse(text: str) -> tuple[int, int]:
        try:
            return pair(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {form}, two whole numbers such as {example}, got {text!r}") \
                from None
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags. Settings that --from-png can supply default to None here and are settled in `settle_flags`."""
    p = CommandParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", help="what to draw, of any length, in AUTOMATIC1111's syntax: (more), [less], "
                                    "(text:1.3), BREAK; --prompt '' makes an unconditional image (default: none, "
                                    "required unless --from-png gives one)")
    p.add_argument("--negative-prompt", help="what to steer away from (default: none)")
    p.add_argument("--checkpoint", type=Path, help=f"SD 1.x, 2.x or SDXL checkpoint, .safetensors or .ckpt (default: "
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
                                                        f"classifier-free guidance off (default: the model's: "
                                                        f"{DEFAULT_GUIDANCE}, {SDXL.guidance_scale} for SDXL)")
    p.add_argument("--sampler", help=f"one of {', '.join(SAMPLERS)} (default: {DEFAULT_SAMPLER})")
    p.add_argument("--seed", type=int, help="random seed, 0 to 2**64-1; image i of --num-images uses seed+i-1 "
                                            "(default: a random one, printed and stored in the PNG)")
    for side in ("width", "height"):
        p.add_argument(f"--{side}", type=int, help=f"image {side}, a multiple of {VAE_FACTOR}, of {SDXL.side_multiple} "
                                                   f"for SDXL (default: the model's own: 512 for SD v1, 768 for SD "
                                                   f"2.x 768-v, {SDXL.image_size} for SDXL, 64 for {TINY_MODEL}; or "
                                                   f"that of --image rounded down)")
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
    p.add_argument("--hires-strength", type=float, help=f"how much the hires fix redraws, 0 to 1 (default: "
                                                        f"{DEFAULT_HIRES_STRENGTH})")
    p.add_argument("--hires-steps", type=int, help="steps of the hires fix's redraw (default: --steps)")
    p.add_argument("--hires-upscaler", choices=UPSCALERS, help=f"latent (bilinear in latent space) or lanczos "
                                                               f"(decode, Lanczos, encode) (default: "
                                                               f"{DEFAULT_HIRES_UPSCALER})")
    p.add_argument("--deep-cache", type=int, metavar="N", help="DeepCache: a full UNet call every N steps, only its "
                                                                "shallow branch in between: faster, a slightly "
                                                                "different image (default: off)")
    p.add_argument("--deep-cache-branch", type=int, metavar="B", help="the skip connection DeepCache's shallow branch "
                                                                      "ends at, 0 the outermost (default: 0)")
    p.add_argument("--tome", type=float, metavar="RATIO", dest="token_merging",
                   help="token merging: merge this share of the image tokens (0 to 0.75, e.g. 0.5) before the "
                        "self-attention of the highest-resolution blocks: faster, a slightly different image "
                        "(default: off)")
    p.add_argument("--prediction", metavar="|".join(CHOICES),
                   help="what the UNet predicts, v or epsilon, where the checkpoint does not say or says it wrong "
                        "(default: its v_pred key, else a .yaml of the same name beside it, else a test of the UNet "
                        "for SD 2.x; the rule that decided is printed)")
    p.add_argument("--original-size", type=pair_flag("HxW (height first)", "1024x768"), metavar="HxW",
                   help="SDXL's micro-condition: the size of the original image the UNet is told the picture was "
                        "cut from, HEIGHTxWIDTH (height first, as SDXL orders it; unlike AUTOMATIC1111's WxH "
                        "'Size'); smaller than the image asks for the look of an upscaled small one (default: "
                        "--height x --width)")
    p.add_argument("--crop", type=pair_flag("TOPxLEFT (top first)", "0x256"), metavar="TOPxLEFT",
                   help="SDXL's micro-condition: the top-left corner of the crop the UNet is told was cut from the "
                        "original, TOPxLEFT (the row first); away from 0x0 it draws a cut-off picture "
                        "(default: 0x0)")
    p.add_argument("--target-size", type=pair_flag("HxW (height first)", "1024x768"), metavar="HxW",
                   help="SDXL's micro-condition: the size the crop was resized to, HEIGHTxWIDTH (height first) "
                        "(default: --height x --width)")
    p.add_argument("--refiner", type=Path, metavar="PATH",
                   help="an SDXL refiner checkpoint (sd_xl_refiner_1.0.safetensors) that takes over an SDXL base's "
                        "run on its latents after --refiner-switch of it; the base makes its part of every image, "
                        "is freed, and then the refiner loads: the two are never in memory together (default: none)")
    p.add_argument("--refiner-switch", type=float, metavar="F",
                   help=f"the share of the steps after which --refiner takes over, above 0 and below 1, as "
                        f"AUTOMATIC1111's 'Refiner switch at' (default: {REFINER_SWITCH})")
    p.add_argument("--aesthetic-score", type=float, metavar="S",
                   help=f"the SDXL refiner's micro-condition: the aesthetic score it is asked for, "
                        f"{RANGES['aesthetic_score'].says()} (default: {AESTHETIC_SCORE})")
    p.add_argument("--negative-aesthetic-score", type=float, metavar="S",
                   help=f"the refiner's aesthetic score for the negative prompt (default: {NEGATIVE_AESTHETIC_SCORE})")
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


def read_parameters(png: Path) -> dict:
    """The settings in the "parameters" text chunk of `png`, under the names of our flags (plus model,
    model_hash, which the checkpoint is checked against, and ti_hashes, lora_hashes)."""
    readable_file(png, "--from-png", missing=InputError(f"--from-png {png} not found; check the path"))
    try:
        with Image.open(png) as image:
            text = getattr(image, "text", {}).get(TEXT_CHUNK)  # only PNGs have text chunks
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # a bomb: over PIL's pixel limit
        raise InputError(f"cannot read --from-png {png}: {e}") from None
    try:
        stored = parse_parameters(text or "", png.parent)
    except ValueError:
        raise InputError(f"{png} holds no generation parameters that {PROG} can read (a 'parameters' text chunk "
                         f"ending in a line 'Steps: ..., Size: WxH, ...'); give a PNG made by {PROG}") from None
    for key in ("image", "mask"):
        if key in stored:
            check_unicode(stored[key], f"the {key} that --from-png {png} names,")
    return stored


def default_checkpoint(model: str | None) -> Path:
    """data/<model>.safetensors or .ckpt for the model a --from-png names, else the v1.5 file, else the
    project's tiny model (with a note that says so and how to get the official weights)."""
    if model is not None:  # a PNG's "Model" names a file in data/, nothing else
        plain_name(model, "--from-png", DATA_DIR, fix="pass --checkpoint PATH")
    for name in filter(None, (model, DEFAULT_MODEL)):
        for path in (DATA_DIR / f"{name}{suffix}" for suffix in CHECKPOINT_SUFFIXES):
            if path.is_file():  # a link to a drive of models is fine: the user put it there
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


def stored_refiner(png: Path, stored: dict) -> Path | None:
    """data/<refiner>.safetensors or .ckpt for the refiner a --from-png image was made with (None if it had
    none), found as its "Model" is; refused when it is not there."""
    name = stored.get("refiner_model")
    if name is None:
        return None
    path = file_in(DATA_DIR, name, CHECKPOINT_SUFFIXES, "--from-png", fix="pass --refiner PATH")
    if path is None:
        made = f" [{stored['refiner_hash']}]" if stored.get("refiner_hash") else ""
        raise InputError(f"{png} was made with the refiner {name}{made}, but there is no {name}.safetensors in "
                         f"{shown(DATA_DIR)}/; put the file there or pass --refiner PATH")
    return path


def note_other_file(png: Path | None, what: str, made: tuple[str | None, str | None], path: Path, digest: str) -> None:
    """A note where the PNG was made with a `what` ("model", "refiner") of another hash than `path`'s."""
    if png is not None and made[1] not in (None, digest):
        note(f"{png} was made with {what} {made[0]} (hash {made[1]}), this is {path.stem} (hash {digest}): the image "
             f"will differ")


# ---- the command ---------------------------------------------------------------------------------

def run(argv: list[str] | None) -> None:
    """Every check first, so that a mistake costs no loading or generating; then load and generate. The
    library's messages about settings name its parameters; here they name the flags."""
    try:
        load_and_generate(parse_args(argv))
    except SettingError as e:
        raise e.for_flags() from None


def check_paths(args: argparse.Namespace) -> None:
    """Every path typed may be any path, but each is printed or kept in the PNG's parameters: valid Unicode."""
    for flag in ("checkpoint", "refiner", "image", "mask", "from_png", "output"):
        if getattr(args, flag) is not None:
            check_unicode(getattr(args, flag), f"--{flag.replace('_', '-')}")
    for flag in ("lora", "embedding"):
        for value in getattr(args, flag):
            check_unicode(value, f"--{flag}")


def load_and_generate(args: argparse.Namespace) -> None:
    check_paths(args)
    stored = read_parameters(args.from_png) if args.from_png else {}
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    checkpoint = args.checkpoint or default_checkpoint(stored.get("model"))
    refiner = args.refiner or stored_refiner(args.from_png, stored)
    stored |= {"refiner": refiner} if refiner is not None else {}  # the PNG's, found in data/, fills --refiner
    # What the files' headers tell (a .safetensors file's family): bad flags for them fail before any loading.
    # A missing checkpoint is named by load_checkpoint, after the flags.
    family = read_family(readable_file(checkpoint, "checkpoint")) if checkpoint.is_file() else None
    assumed = family or SD1
    assumed_size = read_metadata(checkpoint).get("image_size", assumed.image_size) if checkpoint.is_file() \
        else assumed.image_size
    refiner_family = read_family(readable_file(refiner, "--refiner", missing=InputError(
        f"--refiner {refiner} not found; check the path"))) if refiner is not None else None
    traits = model_traits(assumed, assumed_size)
    flags = settle_flags(args, stored, traits, LORA_DIR)
    check_families(flags, family, refiner_family)
    tokenizer = CLIPTokenizer()
    embeddings = read_embeddings(args, flags, stored, tokenizer, EMBEDDINGS_DIR)
    check_memory(*flags.final_size, device, DTYPES[dtype], flags.tiled_decode)
    output = args.output or default_output()
    check_output(output, is_default=args.output is None)
    paths = output_paths(output, flags.num_images, args.overwrite)
    for what, path, picture in (("init image", flags.image, flags.settings.image),
                                ("mask", flags.mask, flags.settings.mask)):
        if picture is not None and picture.size != (flags.width, flags.height):
            note(f"{what} {path} is {picture.width}x{picture.height}; resized to {flags.width}x{flags.height}")

    models = load_checkpoint(checkpoint, device, DTYPES[dtype], prediction=flags.prediction)
    if models.prediction_rule != family_rule(models.family):  # say it where the family alone did not decide
        note(f"{SHORT[models.prediction_type]}-prediction model ({models.prediction_rule}); --prediction overrides")
    pipe = StableDiffusion(models, tokenizer)
    if pipe.traits != traits:  # SD 2.x 768-v (known once the UNet answered), a .ckpt, zero terminal SNR
        flags = settle_flags(args, stored, pipe.traits, LORA_DIR)
        check_memory(*flags.final_size, device, DTYPES[dtype], flags.tiled_decode)
    check_families(flags, models.family, refiner_family)
    for embedding in embeddings:
        pipe.add_embedding(embedding)
    check_clip_skip(flags.clip_skip, pipe.clip_skip_limit)
    check_deep_cache_branch(flags.deep_cache_branch, pipe.models.unet)
    lora_hashes = {}
    for path, weight in flags.loras:
        pipe.load_lora(path, weight)
        lora_hashes[path.stem] = file_sha256(path, cache=True)[:SHORT_HASH_DIGITS]
        stored_hash = stored.get("lora_hashes", {}).get(path.stem, lora_hashes[path.stem])
        if stored_hash != lora_hashes[path.stem]:
            note(f"{args.from_png} was made with the LoRA {path.stem} of hash {stored_hash}, {shown(path)} has hash "
                 f"{lora_hashes[path.stem]}: the image will differ")
    if args.compile and pipe.compile():
        note("--compile: the UNet and the VAE decoder compile during the first image (minutes on a CPU), and "
             "again when the size changes")
    short_hash = model_hash(checkpoint)
    unseen = pipe.unseen_words(flags.text + " " + flags.negative_text)
    if unseen:
        note(f"{checkpoint.stem} never saw the words {', '.join(unseen)} in training and will ignore their meaning; "
             f"it knows: {' '.join(pipe.models.vocabulary)}")
    note_other_file(args.from_png, "model", (stored.get("model"), stored.get("model_hash")), checkpoint, short_hash)
    prediction = flags.prediction or (SHORT[models.prediction_type] if models.prediction_type != "epsilon" else None)
    used = {e.name: e.short_hash for text, what in ((flags.text, "prompt"), (flags.negative_text, "negative_prompt"))
            for e in pipe.prompt_parser.parse(text, what).embeddings}  # in the order of first use
    made_with = {"model": checkpoint.stem, "model_hash": short_hash, "lora_hashes": lora_hashes,
                 "prediction": prediction, "ti_hashes": used}
    if flags.refiner is not None or models.family.kind == "refiner":  # the aesthetic scores condition the image
        conditions = flags.settings.micro_conditions
        made_with |= {"aesthetic_score": conditions.aesthetic_score,
                      "negative_aesthetic_score": conditions.negative_aesthetic_score}
    if flags.refiner is None:
        write_images(base_runs(pipe, args, flags, dtype, len(paths)), args, flags, paths, made_with)
        return
    made_with |= {"refiner_model": flags.refiner.stem, "refiner_hash": model_hash(flags.refiner)}
    note_other_file(args.from_png, "refiner", (stored.get("refiner_model"), stored.get("refiner_hash")), flags.refiner,
                    made_with["refiner_hash"])
    if flags.loras:
        note("--refiner runs without the LoRAs: they are merged into the base only")
    handoffs = list(base_runs(pipe, args, flags, dtype, len(paths)))
    del models, pipe  # the base's weights go before the refiner's come: the two are never in memory together
    gc.collect()
    print(f"loading the refiner {shown(flags.refiner)}", flush=True)
    refiner = StableDiffusion(load_checkpoint(flags.refiner, device, DTYPES[dtype]), tokenizer)
    for embedding in embeddings:  # an SDXL embedding's "clip_g" vectors, for the refiner's bigG
        refiner.add_embedding(embedding)
    if args.compile:
        refiner.compile()
    write_images(refined(refiner, handoffs, args, flags), args, flags, paths, made_with)


def base_runs(pipe: StableDiffusion, args: argparse.Namespace, flags: Flags, dtype: str, count: int):
    """Print what is made; then make the images one after another, image i with seed + i: for each its seed,
    the base's result (the image; with a refiner, the `Handoff` where the refiner takes over, its latents
    moved to the CPU) and the seconds it took."""
    mode = ("text-to-image" if flags.image is None else "inversion" if flags.invert is not None
            else "image-to-image" if flags.mask is None else "inpainting")
    steps = f"{flags.steps} step{'s' * (flags.steps > 1)}"
    if flags.hires_scale is not None:
        mode += ", then hires fix to {}x{}".format(*flags.final_size)
    refined = f", refined by {flags.refiner.stem} after {flags.refiner_switch}" if flags.refiner else ""
    print(f"{mode}, {flags.width}x{flags.height}, {steps} of {flags.sampler}, seed {flags.seed}{refined}"
          f"{f', {count} images' if count > 1 else ''}, on {pipe.device} in {dtype}", flush=True)
    start = {}  # what the run starts from: the image (image-to-image, inpainting) or its inversion
    if flags.invert is not None:
        start["latents"] = pipe.invert(flags.settings.image, lora_tags(flags.invert)[0], steps=flags.steps,
                                       progress=not args.no_progress, clip_skip=flags.clip_skip,
                                       **flags.inversion_size)
    elif flags.image is not None:
        start = dict(image=flags.settings.image, mask=flags.settings.mask, strength=flags.strength)
    make = pipe.generate
    if flags.hires_scale is not None:
        make = functools.partial(pipe.hires_fix, hires_scale=flags.hires_scale, hires_strength=flags.hires_strength,
                                 hires_steps=flags.hires_steps, hires_upscaler=flags.hires_upscaler)
    elif flags.refiner is not None:
        make = functools.partial(pipe.hand_off, refiner_switch=flags.refiner_switch)
    options = dict(steps=flags.steps, guidance_scale=flags.guidance_scale, sampler=flags.sampler, width=flags.width,
                   height=flags.height, progress=not args.no_progress, clip_skip=flags.clip_skip,
                   deep_cache=flags.deep_cache, deep_cache_branch=flags.deep_cache_branch,
                   token_merging=flags.token_merging, **flags.micro_conditions)
    if flags.refiner is None:
        options["tiled_decode"] = flags.tiled_decode  # a refiner decodes
    for i in range(count):
        began = time.perf_counter()
        made = make(flags.text, flags.negative_text, **start, seed=flags.seed + i, **options)
        result = replace(made, latents=made.latents.cpu()) if isinstance(made, Handoff) else made[0]
        yield flags.seed + i, result, time.perf_counter() - began


def refined(refiner: StableDiffusion, handoffs: list, args: argparse.Namespace, flags: Flags):
    """The refiner's part of each image of `handoffs` (seed, `Handoff`, the base's seconds), as `base_runs` gives
    them: (seed, image, seconds in all)."""
    for seed, handoff, seconds in handoffs:
        began = time.perf_counter()
        [picture] = refiner.refine(handoff, progress=not args.no_progress, tiled_decode=flags.tiled_decode)
        yield seed, picture, seconds + time.perf_counter() - began


def write_images(results, args: argparse.Namespace, flags: Flags, paths: list[Path], made_with: dict) -> None:
    """Write each image of `results` (seed, image, seconds) as soon as it is done, with its parameters: `flags`,
    and the model, LoRAs and refiner of `made_with`."""
    for path, (seed, picture, seconds) in zip(paths, results):
        parameters = format_parameters(vars(flags) | made_with | {"seed": seed}, path.parent)
        written = write_png(picture, path, parameters, args.overwrite)
        took = f", {seconds:.1f} s" if args.compile else ""  # the first one includes compiling
        print(f"wrote {written} (seed {seed}{took})", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: run(argv), interrupted="no partial file was left behind",
                       out_of_memory="lower --width and --height")


if __name__ == "__main__":
    # Warnings (e.g. the words a prompt over 77 tokens loses) as one line, without Python's file and line.
    warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
    sys.exit(main())
