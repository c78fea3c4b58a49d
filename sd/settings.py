"""The arguments of a generation, checked, opened and completed with their defaults, without any weights.

`settle` is what `StableDiffusion.generate` runs first and what a command line runs before it loads a model;
a bad value raises a `SettingError`, whose message can name the parameters as command-line flags. Images
are opened here (`open_image`), so an unreadable file is refused before any work.
"""

import math
import random
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from PIL import Image

from sd.checkpoint import SD_V1_SIZE
from sd.errors import InputError, SettingError
from sd.families import Family
from sd.micro_conditioning import DEFAULT_CROP, MicroConditions
from sd.paths import readable_file
from sd.prompt import check_clip_skip, parse_emphasis
from sd.samplers import DEFAULT_SAMPLER, NoiseSchedule, Sampler, make_sampler
from sd.token_merging import MAX_RATIO, TokenMerging

VAE_FACTOR = 8  # image pixels per latent pixel, each way
LATENT_DTYPE = torch.float32  # latents and sampler arithmetic stay fp32 whatever the networks run in
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
REFINER_SWITCH = 0.8  # the share of a run after which an SDXL refiner takes over (AUTOMATIC1111's default)
OUTPUT_TYPES = ("pil", "np", "latent")
UPSCALERS = ("latent", "lanczos")  # of hires_fix
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_SIDE = 16384  # pixels, each way: a tiled decode's memory is bounded, not the UNet's
MAX_IMAGES = 10_000  # per call or run
MAX_GUIDANCE = 100  # beyond it, guidance overflows rather than steers
MAX_HIRES_SCALE = 8
MAX_LORA_WEIGHT = 100  # LoRAs are merged at about -2 to 2; beyond this a weight only overflows
MAX_MICRO_SIZE = 8 * MAX_SIDE  # pixels: of an original size, target size or crop (SDXL's micro-conditions)
MAX_LATENT = 1e4  # initial noise is about N(0, 1) and image latents within about ±50: beyond, values overflow


@dataclass(frozen=True)
class Range:
    """Where a numeric setting must lie; `says` how the message puts it."""

    low: float
    high: float
    whole: bool = False  # an int (not a bool)
    above: bool = False  # `low` itself excluded
    below: bool = False  # `high` itself excluded
    multiple: int = 1  # of a whole number
    text: str = ""  # the range in words, else "[a whole number] between LOW and HIGH"

    def holds(self, value) -> bool:
        if not (is_int(value) if self.whole else is_finite_number(value)):
            return False
        return (value > self.low if self.above else value >= self.low) and (
            value < self.high if self.below else value <= self.high) and (
            not self.whole or value % self.multiple == 0)

    def says(self) -> str:
        return self.text or f"{'a whole number ' * self.whole}between {self.low} and {self.high}"


STEPS = Range(1, 1000, whole=True)  # the most any sampler takes (its `max_steps` may be fewer)
SIDE = Range(VAE_FACTOR, MAX_SIDE, whole=True, multiple=VAE_FACTOR, text=f"a positive multiple of {VAE_FACTOR} up to {MAX_SIDE}")
RANGES = {  # every numeric setting of a generation, of the hires fix, of the command line and of a PNG's parameters
    "strength": Range(0, 1), "guidance_scale": Range(-MAX_GUIDANCE, MAX_GUIDANCE), "steps": STEPS,
    "seed": Range(0, MAX_SEED, whole=True, text="between 0 and 2**64-1"),
    "width": SIDE, "height": SIDE, "num_images": Range(1, MAX_IMAGES, whole=True),
    "deep_cache": Range(1, STEPS.high, whole=True, text=f"a whole number of steps, at least 1 (1: no reuse) and "
                                                        f"at most {STEPS.high}"),
    "deep_cache_branch": Range(0, 100, whole=True),
    "hires_scale": Range(1, MAX_HIRES_SCALE, above=True, text=f"a number above 1, at most {MAX_HIRES_SCALE}"),
    "hires_strength": Range(0, 1), "hires_steps": STEPS,
    "lora_weight": Range(-MAX_LORA_WEIGHT, MAX_LORA_WEIGHT),
    # SDXL's micro-conditions, each number: sizes of the (imagined) training image, which may be far larger than
    # any image made here; MAX_MICRO_SIZE keeps their embeddings' arguments well within float32
    "original_size": Range(1, MAX_MICRO_SIZE, whole=True), "target_size": Range(1, MAX_MICRO_SIZE, whole=True),
    "crop": Range(0, MAX_MICRO_SIZE, whole=True),
    "aesthetic_score": Range(0, 1000), "negative_aesthetic_score": Range(0, 1000),  # ComfyUI's range
    "refiner_switch": Range(0, 1, above=True, below=True, text="a fraction of the steps above 0 and below 1"),
}


def check_range(name: str, value, high: float | None = None) -> None:
    """`value` of the setting `name` within its row of RANGES (up to `high` if given: a sampler's own
    most steps); a SettingError before any work if not."""
    bounds = RANGES[name] if high is None else replace(RANGES[name], high=high)
    if not bounds.holds(value):
        raise SettingError(lambda n: f"{n(name)} must be {bounds.says()}, got {value!r:.60}")

ImageInput = Image.Image | str | Path


def open_image(image: ImageInput, what: str, mode: str) -> Image.Image:
    """A PIL image in `mode` ("RGB" or "L") from an image or a path; errors name the file."""
    if not isinstance(image, Image.Image):
        path = readable_file(Path(image), what)
        try:
            with Image.open(path) as opened:
                image = opened.copy()
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # a bomb: over PIL's pixel limit
            raise InputError(f"cannot read {what} {path}: {e}; give a PNG or JPEG file.") from None
    try:
        if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")  # composite transparency onto white rather than black
            image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
        return image.convert(mode)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot convert {what} ({image.mode}, {image.width}x{image.height}) to {mode}: {e}; "
                         f"save it as an RGB PNG or JPEG") from None


@dataclass
class Settings:
    """What one generation asks for, defaults filled in and checked (see `settle`)."""

    prompts: list[str]
    negatives: list[str]
    image: Image.Image | None
    mask: Image.Image | None
    strength: float
    steps: int
    guidance_scale: float
    sampler: Sampler
    seed: int
    width: int
    height: int
    num_images: int
    output_type: str
    clip_skip: int
    latents: torch.Tensor | None = None  # (B, 4, h, w): where text-to-image starts instead of fresh noise
    image_latents: torch.Tensor | None = None  # (B, 4, h, w): image-to-image from these instead of an image
    deep_cache: int | None = None  # DeepCache's interval: a full UNet call every this many steps
    deep_cache_branch: int = 0
    token_merging: TokenMerging | None = None
    original_size: tuple[int, int] | None = None  # SDXL's micro-conditions (`sd.micro_conditioning`): (h, w),
    crop: tuple[int, int] = DEFAULT_CROP  # (top, left),
    target_size: tuple[int, int] | None = None  # (h, w); None: the image's own size
    aesthetic_score: float | None = None  # the refiner's, and its negative's; None: not given (6.0, 2.5)
    negative_aesthetic_score: float | None = None

    @property
    def micro_conditions(self) -> MicroConditions:
        """SDXL's micro-conditions of this run, the sizes by default the image's (diffusers' defaults)."""
        own = (self.height, self.width)
        scores = {name: value for name in ("aesthetic_score", "negative_aesthetic_score")
                  if (value := getattr(self, name)) is not None}
        return MicroConditions(self.original_size or own, self.crop, self.target_size or own, **scores)

    @property
    def redraws(self) -> bool:
        """Image-to-image or inpainting: the run starts part-way, from an image."""
        return self.image is not None or self.image_latents is not None

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images


def is_int(value) -> bool:
    """A whole number (int), not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """An int or float (not a bool) that is neither infinite nor NaN (an int of any size is finite)."""
    return is_int(value) or isinstance(value, float) and math.isfinite(value)


def check_argument(name: str, value, accepted: bool, what: str) -> None:
    """A SettingError before any work if `accepted` is false: `name` must be `what`."""
    if not accepted:
        raise SettingError(lambda n: f"{n(name)} must be {what}, got {type(value).__name__} {value!r:.60}")


def check_path(name: str, value) -> None:
    check_argument(name, value, isinstance(value, (str, Path)) and str(value) != "", "the path of a file")


def texts(name: str, value) -> list[str]:
    """A text or a non-empty list of texts, as a list."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not values or not all(isinstance(v, str) for v in values):
        raise SettingError(lambda n: f"{n(name)} must be a text or a non-empty list of texts, got {value!r:.60}")
    for text in values:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # e.g. bytes a shell passed on that are not UTF-8
            raise SettingError(lambda n: f"{n(name)} holds characters that are not valid Unicode "
                                         f"({text!r:.60}); give UTF-8 text") from None
    return list(values)


def settle(prompt: str | list[str], negative_prompt: str | list[str] = "", *, image: ImageInput | None = None,
           mask: ImageInput | None = None, strength: float | None = None, steps: int = DEFAULT_STEPS,
           guidance_scale: float | None = None, sampler: str | Sampler = DEFAULT_SAMPLER,
           seed: int | None = None, width: int | None = None, height: int | None = None, num_images: int = 1,
           output_type: str = "pil", clip_skip: int = 1, latents: torch.Tensor | None = None,
           image_latents: torch.Tensor | None = None, deep_cache: int | None = None, deep_cache_branch: int = 0,
           token_merging: float | TokenMerging | None = None, original_size: tuple[int, int] | None = None,
           crop: tuple[int, int] = DEFAULT_CROP, target_size: tuple[int, int] | None = None,
           aesthetic_score: float | None = None, negative_aesthetic_score: float | None = None,
           image_size: int = SD_V1_SIZE, inpainting_model: bool = False, side_multiple: int = VAE_FACTOR,
           default_guidance: float = DEFAULT_GUIDANCE, schedule: NoiseSchedule | None = None) -> Settings:
    """The arguments of `StableDiffusion.generate`, checked, opened and completed with their defaults, without
    any weights: a command line settles its flags here before it loads a model. What the model says: its own
    size `image_size`, whether it is a 9-channel `inpainting_model`, the multiple its sides must be
    (`side_multiple`), its `default_guidance` and the noise `schedule` a sampler named by `sampler` takes (default
    SD's; zero terminal SNR for the models trained so). A bad value raises a `SettingError`, whose message can name
    the parameters as command-line flags."""
    prompts = texts("prompt", prompt)
    negatives = texts("negative_prompt", negative_prompt)
    negatives = negatives * len(prompts) if isinstance(negative_prompt, str) else negatives
    for name, text in [("prompt", p) for p in prompts] + [("negative_prompt", p) for p in negatives]:
        parse_emphasis(text, name)  # a malformed weight is refused before any work
    check_clip_skip(clip_skip)
    if deep_cache is not None:
        check_range("deep_cache", deep_cache)
    check_range("deep_cache_branch", deep_cache_branch)
    token_merging = check_token_merging(token_merging)
    for name, value in (("image", image), ("mask", mask)):
        if value is not None and not isinstance(value, (Image.Image, str, Path)):
            raise SettingError(lambda n: f"{n(name)} must be a PIL image or the path of an image file, got a "
                                         f"{type(value).__name__}")
    if not isinstance(sampler, (str, Sampler)):
        raise SettingError(lambda n: f"{n('sampler')} must be a sampler's name or a Sampler, got {sampler!r}")
    guidance_scale = default_guidance if guidance_scale is None else guidance_scale
    check_range("guidance_scale", guidance_scale)
    for name, value in (("original_size", original_size), ("crop", crop), ("target_size", target_size)):
        if value is not None:
            check_pair(name, value)
    for name, value in (("aesthetic_score", aesthetic_score), ("negative_aesthetic_score", negative_aesthetic_score)):
        if value is not None:
            check_range(name, value)
    if len(negatives) != len(prompts):
        raise SettingError(lambda n: f"got {len(negatives)} values of {n('negative_prompt')} for {len(prompts)} "
                                     f"prompts; give one each")
    if mask is not None and image is None:
        raise SettingError(lambda n: f"{n('mask')} needs {n('image')}: the image to inpaint")
    if sum(x is not None for x in (image, latents, image_latents)) > 1:
        raise SettingError(lambda n: f"give one of {n('image')}, {n('latents')} (where text-to-image starts) and "
                                     f"{n('image_latents')} (an image's latents to redraw)")
    if image_latents is not None and mask is not None:
        raise SettingError(lambda n: f"{n('mask')} needs {n('image')}, not {n('image_latents')}")
    if strength is not None and image is None and image_latents is None:
        raise SettingError(lambda n: f"{n('strength')} {strength} needs {n('image')}: it says how much of that "
                                     f"image is redrawn")
    if inpainting_model and mask is None:
        raise SettingError(lambda n: f"this is an inpainting checkpoint: give {n('image')} and {n('mask')}")
    strength = (0.75 if mask is None else 1.0) if strength is None else strength  # with neither image: unused
    check_range("strength", strength)
    sampler = make_sampler(sampler, schedule=schedule) if isinstance(sampler, str) else sampler
    check_range("steps", steps, sampler.max_steps)  # no run has more steps than training had timesteps (lcm: 50)
    check_range("num_images", num_images)
    seed = random.randrange(2**32) if seed is None else seed
    check_range("seed", seed)
    if output_type not in OUTPUT_TYPES:
        raise SettingError(lambda n: f"{n('output_type')} must be one of {', '.join(OUTPUT_TYPES)}, "
                                     f"got {output_type!r}")
    image = open_image(image, "init image", "RGB") if image is not None else None
    mask = open_image(mask, "mask", "L") if mask is not None else None
    given = {key: check_latents(value, key, len(prompts) * num_images)
             for key, value in (("latents", latents), ("image_latents", image_latents)) if value is not None}
    size = {}
    for name, value in (("width", width), ("height", height)):  # default: the image's own, rounded down
        own = ([x.shape[-1 if name == "width" else -2] * VAE_FACTOR for x in given.values()] or
               [getattr(image, name) // side_multiple * side_multiple if image else image_size])[0]
        if given and value not in (None, own):
            raise SettingError(lambda n: f"{n(name)} {value} is not that of the latents, {own}; leave it out")
        value = own if value is None else value
        check_range(name, value)
        if value % side_multiple:
            low = max(value // side_multiple, 1) * side_multiple
            raise SettingError(lambda n: f"{n(name)} must be a multiple of {side_multiple} for this model (its "
                                         f"latents are a multiple of {side_multiple // VAE_FACTOR} each way), got "
                                         f"{value}; use {low} or {low + side_multiple}")
        size[name] = value
    return Settings(prompts=prompts, negatives=negatives, image=image, mask=mask, strength=strength, steps=steps,
                    guidance_scale=guidance_scale, sampler=sampler, seed=seed, num_images=num_images,
                    output_type=output_type, clip_skip=clip_skip, deep_cache=deep_cache,
                    deep_cache_branch=deep_cache_branch, token_merging=token_merging,
                    original_size=None if original_size is None else tuple(original_size), crop=tuple(crop),
                    target_size=None if target_size is None else tuple(target_size),
                    aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
                    **given, **size)


def model_traits(family: Family, image_size: int, schedule: NoiseSchedule = NoiseSchedule()) -> dict:
    """What `settle` needs of a model of `family` whose own size is `image_size` and noise schedule `schedule`:
    all known before its weights are."""
    return dict(image_size=image_size, inpainting_model=family.kind == "inpainting",
                side_multiple=family.side_multiple, default_guidance=family.guidance_scale, schedule=schedule)


def check_task(s: Settings, family: Family, switch: float | None = None) -> None:
    """What a model of `family` can do with settled `s`, without its weights: a refiner refines (an image, or
    the last steps of a base's run), micro-conditions only where the family has them; with `switch` (a
    refiner takes over after that share of the run), the run must be an SDXL base's and keep no mask."""
    if family.kind == "refiner" and not s.redraws:
        raise SettingError(lambda n: f"this is an {family.title} checkpoint: it refines images; give it "
                                     f"{n('image')} (image-to-image), or use it as {n('refiner')} of an SDXL base")
    defaults = {f.name: f.default for f in fields(Settings)}
    taken = set(family.micro_conditions) | ({"aesthetic_score"} if switch is not None else set())  # + a refiner's
    given = [name for name, condition in MICRO_SETTINGS.items()
             if getattr(s, name) != defaults[name] and condition not in taken]
    if given:
        refiner = " with no refiner" if MICRO_SETTINGS[given[0]] == "aesthetic_score" else ""
        raise SettingError(lambda n: f"{n(given[0])} is a micro-condition of SDXL that this {family.title} "
                                     f"checkpoint{refiner} does not take (it takes "
                                     f"{', '.join(family.micro_conditions) or 'none'}): leave it out")
    if switch is None:
        return
    check_range("refiner_switch", switch)
    if not family.refinable:
        raise SettingError(lambda n: f"{n('refiner')} continues the latents of an SDXL base; this is an "
                                     f"{family.title} checkpoint")
    if s.mask is not None:
        raise SettingError(lambda n: f"{n('refiner')} takes over text-to-image and image-to-image runs; leave "
                                     f"out {n('mask')} or the refiner")


MICRO_SETTINGS = {  # each micro-condition setting: the condition of `sd.micro_conditioning` it gives
    "original_size": "original_size", "crop": "crop", "target_size": "target_size",
    "aesthetic_score": "aesthetic_score", "negative_aesthetic_score": "aesthetic_score"}


def check_refiner(family: Family) -> None:
    """A model of `family` can finish a base's run only if it is a refiner."""
    if family.kind != "refiner":
        raise SettingError(lambda n: f"{n('refiner')} is an {family.title} checkpoint, not a refiner: give "
                                     f"sd_xl_refiner_1.0 or another SDXL refiner")


def check_pair(name: str, value) -> None:
    """A pair of whole numbers (h, w) or (top, left), each within the row of RANGES."""
    bounds = RANGES[name]
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(bounds.holds(v) for v in value)):
        raise SettingError(lambda n: f"{n(name)} must be two whole numbers ({'top, left' if name == 'crop' else 'h, w'}),"
                                     f" each {bounds.says()}, got {value!r:.60}")


def check_token_merging(value: float | TokenMerging | None) -> TokenMerging | None:
    """A ratio (or a `TokenMerging`: its max_downsample and stride whole numbers from 1) checked; None (or
    ratio 0) for no merging."""
    merging = value if isinstance(value, TokenMerging) else TokenMerging(value) if is_finite_number(value) else None
    if isinstance(value, TokenMerging):
        check_argument("token_merging", value, is_int(value.max_downsample) and value.max_downsample >= 1
                       and isinstance(value.stride, tuple) and len(value.stride) == 2
                       and all(is_int(side) and side >= 1 for side in value.stride),
                       "a TokenMerging whose max_downsample and stride (rows, columns) are whole numbers from 1")
    if value is not None and (merging is None or not is_finite_number(merging.ratio)
                              or not 0.0 <= merging.ratio <= MAX_RATIO):
        raise SettingError(lambda n: f"{n('token_merging')} must be a share of the tokens between 0 and {MAX_RATIO}, "
                                     f"got {value!r}")
    return merging if merging is not None and merging.ratio > 0 else None


def check_hires(scale, strength, steps, upscaler, max_steps: int) -> None:
    """The settings of `StableDiffusion.hires_fix`, before its first pass."""
    check_range("hires_scale", scale)
    check_range("hires_strength", strength)
    if steps is not None:
        check_range("hires_steps", steps, max_steps)
    if upscaler not in UPSCALERS:
        raise SettingError(lambda n: f"{n('hires_upscaler')} must be one of {', '.join(UPSCALERS)}, got {upscaler!r}")


def check_upscaled(width: int, height: int, scale: float, multiple: int = VAE_FACTOR) -> tuple[int, int]:
    """The size the hires fix upscales width x height to (rounded down to a `multiple`: whole latent pixels,
    SDXL's 32), refused above MAX_SIDE."""
    final = tuple(int(side * scale) // multiple * multiple for side in (width, height))
    if max(final) > MAX_SIDE:
        raise SettingError(lambda n: f"{n('hires_scale')} {scale} upscales {width}x{height} to {final[0]}x{final[1]}, "
                                     f"above {MAX_SIDE} a side; lower it, or {n('width')} and {n('height')}")
    return final


def check_deep_cache_branch(branch: int, unet) -> None:
    """DeepCache's branch must be one of the UNet's skip connections."""
    if branch >= len(unet.input_blocks):
        raise SettingError(lambda n: f"{n('deep_cache_branch')} must be below {len(unet.input_blocks)}, this UNet's "
                                     f"skip connections, got {branch}")


def check_invertible(image: Image.Image) -> None:
    """An image inverted at its own size must have sides that are multiples of 8."""
    if image.width % VAE_FACTOR or image.height % VAE_FACTOR:
        raise SettingError(lambda n: f"the image to invert is {image.width}x{image.height}, not a multiple of "
                                     f"{VAE_FACTOR} each way; crop it, or give {n('width')} and {n('height')} to resize "
                                     f"it to")


def check_latents(latents, name: str, batch: int) -> torch.Tensor:
    """Latents (4, h, w), (1, 4, h, w) or (batch, 4, h, w), finite, as (batch, 4, h, w) float32; a dense tensor
    with values (not on the meta device)."""
    if (not isinstance(latents, torch.Tensor) or not latents.is_floating_point() or latents.is_meta
            or latents.layout != torch.strided):
        kind = (f"a {latents.layout} {latents.dtype} tensor on {latents.device}" if isinstance(latents, torch.Tensor)
                else f"a {type(latents).__name__}")
        raise SettingError(lambda n: f"{n(name)} must be a dense float tensor (4, h, w) or (N, 4, h, w) with values, "
                                     f"got {kind}")
    latents = latents[None] if latents.dim() == 3 else latents
    if latents.dim() != 4 or latents.shape[1] != 4 or latents.shape[0] not in (1, batch):
        raise SettingError(lambda n: f"{n(name)} must have the shape (4, h, w), (1, 4, h, w) or ({batch}, 4, h, w), "
                                     f"got {tuple(latents.shape)}")
    largest = float(latents.abs().max()) if latents.numel() else 0.0
    if not largest <= MAX_LATENT:  # NaN too
        raise SettingError(lambda n: f"{n(name)} hold values as large as {largest:.3g} (NaN or inf included); latents "
                                     f"are about N(0, 1), at most {MAX_LATENT:g}")
    return latents.to(LATENT_DTYPE).expand(batch, -1, -1, -1)
