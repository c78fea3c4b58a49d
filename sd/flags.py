"""The generation flags of `run_demo.py`, settled before anything slow: each is the flag given, else the value
of the PNG that --from-png names (`sd.parameters`), else the library's default (`sd.settings.settle`, which
needs no weights); they are checked together and come back as one frozen `Flags`. The LoRA files that the
prompt's <lora:NAME:WEIGHT> tags and --lora name, and the textual-inversion embeddings the prompts use, are
found here too, and the embeddings read and checked. What the flags ask of the model is checked against its
family (`check_families`: SDXL's micro-conditions, a refiner's hand-off), before loading where the files'
headers tell the families, and again once they are loaded.
"""

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

from sd.cli import note, shown
from sd.embeddings import EMBEDDING_SUFFIXES, Embedding, check_name, read_embedding
from sd.errors import InputError
from sd.families import Family
from sd.lora import TAG_UNSAFE, lora_tags, with_lora
from sd.parameters import NEGATIVE_MARK
from sd.paths import exists, file_in, readable_file
from sd.prediction import prediction_name
from sd.prompt import NUMBER, PromptParser, names_in
from sd.samplers import DEFAULT_SAMPLER, make_sampler
from sd.settings import (MAX_SEED, RANGES, REFINER_SWITCH, VAE_FACTOR, Settings, check_hires, check_invertible,
                         check_range, check_refiner, check_task, check_upscaled, settle)
from sd.tokenizer import CLIPTokenizer

DEFAULT_HIRES_STRENGTH = 0.55
DEFAULT_HIRES_UPSCALER = "latent"
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
MICRO_CONDITIONS = ("original_size", "crop", "target_size", "aesthetic_score", "negative_aesthetic_score")  # SDXL's
GENERATION_FLAGS = ("image", "mask", "strength", "steps", "guidance_scale", "sampler", "seed", "width", "height",
                    "num_images", "clip_skip", "deep_cache", "deep_cache_branch", "token_merging",
                    *MICRO_CONDITIONS)  # `settle`'s
SETTLED = ("strength", "steps", "guidance_scale", "seed", "width", "height", "clip_skip", "deep_cache",
           "deep_cache_branch")  # taken from `settle`'s result
HIRES_FLAGS = ("hires_strength", "hires_steps", "hires_upscaler")  # which only --hires-scale turns on


@dataclass(frozen=True)
class Flags:
    """The settings of one run, settled; the attributes are named as the flags are."""

    prompt: str  # as the PNG keeps it: with <lora:NAME:WEIGHT> tags, those of --lora added
    negative_prompt: str
    text: str  # the prompt the model reads: without the tags
    negative_text: str
    loras: tuple[tuple[Path, float], ...]  # (file, weight) of every tag
    image: Path | None
    mask: Path | None
    invert: str | None
    strength: float
    steps: int
    guidance_scale: float
    sampler: str
    seed: int  # of the first image; image i uses seed + i - 1
    width: int
    height: int
    num_images: int
    clip_skip: int
    hires_scale: float | None
    hires_strength: float | None
    hires_steps: int | None
    hires_upscaler: str | None
    deep_cache: int | None
    deep_cache_branch: int
    token_merging: float | None
    prediction: str | None  # "v" or "epsilon" when given: overrides what the checkpoint says (`sd.prediction`)
    original_size: tuple[int, int] | None  # SDXL's micro-conditions as given: (h, w), None for the image's own
    crop: tuple[int, int] | None  # (top, left)
    target_size: tuple[int, int] | None  # (h, w)
    aesthetic_score: float | None  # the refiner's, as given
    negative_aesthetic_score: float | None
    refiner: Path | None  # an SDXL refiner that takes over after refiner_switch of the run
    refiner_switch: float | None  # settled: the default with a refiner, None without
    tiled_decode: bool
    inversion_size: dict[str, int]  # the width and height given, to which --invert resizes the image (else its own)
    side_multiple: int  # the model's: the hires fix's size is rounded down to it (SDXL: 32)
    settings: Settings  # the library's, with the init image and mask opened

    @property
    def final_size(self) -> tuple[int, int]:
        """The size of the images made: --width x --height, times --hires-scale (rounded down to the model's side
        multiple)."""
        return check_upscaled(self.width, self.height, self.hires_scale or 1, self.side_multiple)

    @property
    def micro_conditions(self) -> dict:
        """SDXL's micro-conditions that were given, as `generate` takes them (the rest: its defaults)."""
        return {name: getattr(self, name) for name in MICRO_CONDITIONS if getattr(self, name) is not None}


def settle_flags(args: argparse.Namespace, stored: dict, traits: dict, lora_dir: Path) -> Flags:
    """The flags `args`, those not given filled from the PNG's values `stored`, checked and completed with
    the defaults; `traits`: what `settle` needs of the model (`sd.settings.model_traits`); `lora_dir`: where
    <lora:NAME> tags find NAME.safetensors."""
    flag = vars(args) | {key: value for key, value in stored.items()
                         if key in vars(args) and getattr(args, key) is None}  # a copy: `args` stays as given
    if flag["prompt"] is None:
        raise InputError("give --prompt TEXT (--prompt '' for an unconditional image) or --from-png PNG")
    if NEGATIVE_MARK in flag["prompt"]:
        raise InputError(f"--prompt holds a line starting {NEGATIVE_MARK.strip()!r}, which the PNG's parameters could "
                         f"not tell apart from the negative prompt; reword that line or use --negative-prompt")
    flag["negative_prompt"] = flag["negative_prompt"] or ""
    flag["prompt"], loras = resolve_loras(flag["prompt"], flag["lora"], lora_dir)  # the PNG keeps the tags
    text, negative_text = lora_tags(flag["prompt"])[0], lora_tags(flag["negative_prompt"])[0]  # for the model
    if flag["invert"] is not None:
        check_inversion(flag)
        flag["sampler"] = "ddim"
    flag |= hires_flags(flag)
    flag["refiner_switch"] = refiner_switch(flag)
    flag["sampler"] = flag["sampler"] or DEFAULT_SAMPLER
    if flag["prediction"] is not None:
        prediction_name(flag["prediction"], "--prediction")
    given = {key: flag[key] for key in GENERATION_FLAGS if flag[key] is not None}
    inversion_size = {key: given[key] for key in ("width", "height") if key in given}
    settings = settle(text, negative_text, **traits, **given)  # num_images: at most MAX_IMAGES
    side_multiple = traits.get("side_multiple", VAE_FACTOR)
    if flag["hires_scale"] is not None:
        check_upscaled(settings.width, settings.height, flag["hires_scale"], side_multiple)
    if settings.seed + flag["num_images"] - 1 > MAX_SEED:
        raise InputError(f"--seed {settings.seed} with --num-images {flag['num_images']} runs past 2**64-1 (image i "
                         f"uses seed+i-1); give a lower --seed")
    if flag["invert"] is not None and not inversion_size:
        check_invertible(settings.image)
    settled = {key: getattr(settings, key) for key in SETTLED} | dict(
        text=text, negative_text=negative_text, loras=tuple(loras), tiled_decode=bool(flag["tiled_decode"]),
        inversion_size=inversion_size, side_multiple=side_multiple, settings=settings,
        token_merging=settings.token_merging.ratio if settings.token_merging is not None else None)
    return Flags(**{f.name: settled[f.name] if f.name in settled else flag[f.name] for f in fields(Flags)})


def hires_flags(flag: dict) -> dict:
    """The hires fix is for text-to-image; its settings are checked as the library checks them, and its
    strength and upscaler defaulted."""
    if flag["hires_scale"] is None:
        extra = [name for name in HIRES_FLAGS if flag[name] is not None]
        if extra:
            raise InputError(f"--{extra[0].replace('_', '-')} sets the hires fix, which --hires-scale S turns on; "
                             f"give it too")
        return {}
    if flag["image"] is not None:
        raise InputError("--hires-scale upscales a text-to-image result; leave out --image (or --hires-scale)")
    if flag["refiner"] is not None:
        raise InputError("--refiner takes over a run of one size; the hires fix makes two: leave out --hires-scale "
                         "or --refiner")
    strength = DEFAULT_HIRES_STRENGTH if flag["hires_strength"] is None else flag["hires_strength"]
    upscaler = flag["hires_upscaler"] or DEFAULT_HIRES_UPSCALER
    sampler = make_sampler(flag["sampler"] or DEFAULT_SAMPLER)
    check_hires(flag["hires_scale"], strength, flag["hires_steps"], upscaler, sampler.max_steps)
    return {"hires_strength": strength, "hires_upscaler": upscaler}


def refiner_switch(flag: dict) -> float | None:
    """--refiner-switch, checked, by default REFINER_SWITCH with a --refiner; None without one."""
    if flag["refiner"] is None:
        if flag["refiner_switch"] is not None:
            raise InputError("--refiner-switch says when --refiner takes over; give --refiner PATH too")
        return None
    switch = REFINER_SWITCH if flag["refiner_switch"] is None else flag["refiner_switch"]
    check_range("refiner_switch", switch)
    return switch


def check_families(flags: Flags, family: Family | None, refiner: Family | None) -> None:
    """What `flags` ask of a checkpoint of `family` and a --refiner of family `refiner`, each where it is known:
    the library's checks (`check_task`, `check_refiner`)."""
    if family is not None:
        check_task(flags.settings, family, flags.refiner_switch)
    if refiner is not None:
        check_refiner(refiner)


def check_inversion(flag: dict) -> None:
    """--invert needs --image, samples with ddim and redraws the whole image."""
    for needed, wrong in (("--image", flag["image"] is None), ("no --mask", flag["mask"] is not None),
                          ("no --strength", flag["strength"] is not None),
                          ("--sampler ddim", flag["sampler"] not in (None, "ddim"))):
        if wrong:
            raise InputError(f"--invert needs {needed}: it turns --image into noise and samples back from it with ddim")


def path_and_suffix(value: str, is_suffix) -> tuple[Path, str | None]:
    """A flag's PATH or PATH:SUFFIX, SUFFIX being what `is_suffix` accepts; a PATH that exists as written wins
    (so C:\\x.pt and my:style.safetensors stay paths)."""
    path, colon, suffix = value.rpartition(":")
    if not colon or not path or exists(Path(value)) or not is_suffix(suffix):
        return Path(value), None
    return Path(path), suffix


def tag_name(path: Path) -> str:
    """The name by which a --lora file is written into the prompt's <lora:NAME:WEIGHT> tag: its file name without
    the suffix, which must be one a tag can hold."""
    name = path.stem
    bad = next((c for c in name if c in TAG_UNSAFE or not c.isprintable()), None)
    if bad is not None or not name.strip():
        raise InputError(f"--lora {path}: its name {name!r} cannot be written as <lora:NAME:WEIGHT> (the PNG's "
                         f"prompt keeps each LoRA so){f' as it holds {bad!r}' if bad else ''}; rename the file")
    return name


def given_loras(prompt: str, values: list[str]) -> tuple[str, dict[str, Path]]:
    """The prompt with a <lora:NAME:WEIGHT> tag for each --lora PATH[:WEIGHT] of `values` (or the weight of the
    tag of that name already there set, as --from-png gives it), and the files by lower-case name."""
    given: dict[str, Path] = {}
    for value in values:
        path, weight = path_and_suffix(value, NUMBER.fullmatch)
        readable_file(path, "--lora", missing=InputError(f"--lora {path} not found; check the path"))
        name = tag_name(path)
        other = given.get(name.lower())
        if other is not None and other.resolve() != path.resolve():
            raise InputError(f"--lora {other} and --lora {path} would both be <lora:{name}> in the prompt; rename "
                             f"one of the files")
        given[name.lower()] = path
        prompt = with_lora(prompt, name, weight)
    return prompt, given


def resolve_loras(prompt: str, values: list[str], folder: Path) -> tuple[str, list[tuple[Path, float]]]:
    """The prompt and the LoRA files and weights to merge: the --lora PATH[:WEIGHT] of `values` become tags
    (`given_loras`), then every tag is looked up in the --lora files and `folder`, where a tag names a file
    only by its name (`sd.paths.file_in`)."""
    prompt, given = given_loras(prompt, values)
    loras = []
    for name, weight in lora_tags(prompt)[1]:
        if weight and not NUMBER.fullmatch(weight):
            raise InputError(f"--prompt has <lora:{name}:{weight}>, whose weight {weight!r} is not a number; write "
                             f"<lora:{name}:0.8>")
        path = given.get(name.lower()) or file_in(folder, name, LORA_SUFFIXES, f"<lora:{name}>", fix="pass --lora PATH")
        if path is None:
            raise InputError(f"--prompt has <lora:{name}>, but there is no {name}.safetensors in {shown(folder)}/; "
                             f"put the file there or pass --lora PATH")
        strength = float(weight or 1)
        if not RANGES["lora_weight"].holds(strength):
            raise InputError(f"--prompt has <lora:{name}:{weight}>, whose weight must be "
                             f"{RANGES['lora_weight'].says()}; LoRAs are merged at about -2 to 2")
        loras.append((path, strength))
    return prompt, loras


def read_embeddings(args: argparse.Namespace, flags: Flags, stored: dict, tokenizer: CLIPTokenizer,
                    folder: Path) -> list[Embedding]:
    """The --embedding files, and those in `folder` that the prompts name (by file name, as AUTOMATIC1111
    names them), read and their names checked; then the prompts are parsed with them (malformed or too
    long: refused), all before loading the model. The embeddings a --from-png image was made with must be
    among them, when the prompts still use them."""
    loaded: dict[str, Embedding] = {}

    def add(embedding: Embedding) -> None:
        check_name(embedding, tokenizer, loaded)
        loaded[embedding.name] = embedding

    for value in args.embedding:
        add(read_embedding(*path_and_suffix(value, lambda name: not any(c in name for c in "/\\"))))
    texts = f"{flags.text}\n{flags.negative_text}"
    files = {path.stem: path for path in sorted(folder.glob("*"))
             if path.suffix.lower() in EMBEDDING_SUFFIXES} if folder.is_dir() else {}
    given = {name.lower() for name in loaded}
    for name in names_in(texts, [name for name in files if name.lower() not in given]):
        add(read_embedding(files[name], name))
    parser = PromptParser(tokenizer, loaded)
    parser.parse(flags.text)
    parser.parse(flags.negative_text, "negative_prompt")
    made_with = stored.get("ti_hashes", {})
    known = {name.lower(): e for name, e in loaded.items()}
    for name in names_in(texts, made_with):
        if name.lower() not in known:
            raise InputError(f"{args.from_png} was made with the embedding {name} (hash {made_with[name]}), which is "
                             f"not loaded; put its file in {shown(folder)}/ or pass --embedding PATH:{name}")
        if known[name.lower()].short_hash != made_with[name]:
            e = known[name.lower()]
            note(f"{args.from_png} was made with the embedding {name} of hash {made_with[name]}, {shown(e.path)} has "
                 f"hash {e.short_hash}: the image will differ")
    return list(loaded.values())
