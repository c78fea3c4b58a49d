"""AUTOMATIC1111's "parameters" text, which a PNG of its web UI or of this project carries in a text chunk: the
prompt, a line "Negative prompt: ...", then one line of settings, "Steps: 20, Sampler: Euler a, CFG scale: 7,
Seed: 1, Size: 512x512, ...", whose values are JSON-quoted where they hold a comma, colon, quote or newline.

Writing and reading both follow `FIELDS`, one row per key of the settings line: the attribute it holds (a
flag's name), how its text is parsed and formatted, and when it is written. A generation option is one more
row. Paths (init image, mask) are written relative to the PNG's folder, where reading finds them; keys not
in the table (AUTOMATIC1111's "Version", say) are ignored.

SDXL: a refiner is written as AUTOMATIC1111 writes it, "Refiner: NAME [HASH], Refiner switch at: 0.8" (the hash
the first 10 hex digits of the file's SHA-256, as "Model hash"). AUTOMATIC1111 writes no micro-conditions; ours
are written only where they differ from the defaults: "Original size", "Target size" (each HxW, height first,
unlike "Size", which is AUTOMATIC1111's WxH), "Crop top-left" (TOPxLEFT), and with a refiner "Aesthetic
score" and "Negative aesthetic score". The y-first forms are those of the command line's flags and of SDXL.
"""

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd.micro_conditioning import DEFAULT_CROP

TEXT_CHUNK = "parameters"  # the PNG text chunk that holds the text
NEGATIVE_MARK = "\nNegative prompt: "  # where the prompt ends and the negative prompt begins
# One "Key: value" of the settings line; a quoted value is JSON, so it may hold commas. A key starts only
# where no key character comes before it, so each run of them is tried once: the time is linear in the line.
SETTING = re.compile(r'(?<![\w\s\-/])\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')

Values = Mapping[str, Any]  # attribute name: value


def always(values: Values) -> bool:
    return True


def given(name: str) -> Callable[[Values], bool]:
    """A row written when the attribute `name` is set."""
    return lambda values: values.get(name) is not None


@dataclass(frozen=True)
class Field:
    """One key of the settings line and the attribute it holds (two for "Size": width, height)."""

    key: str
    name: str | tuple[str, ...]
    parse: Callable[[str], Any] = str
    format: Callable[[Any], str] = str
    written: Callable[[Values], bool] = always  # asked of the values being written
    required: bool = False  # a text without it is not generation parameters

    def value(self, values: Values) -> Any:
        return tuple(values[name] for name in self.name) if isinstance(self.name, tuple) else values[self.name]

    def store(self, found: dict[str, Any], value: Any) -> None:
        found.update(zip(self.name, value) if isinstance(self.name, tuple) else [(self.name, value)])


def sampler_name(text: str) -> str:
    """Our name of a sampler from AUTOMATIC1111's ("DPM++ 2M Karras" -> dpmpp_2m_karras); ours stay as they are."""
    return text.lower().replace("dpm++", "dpmpp").replace(" ", "_")


def size(text: str) -> tuple[int, int]:
    width, height = map(int, text.split("x"))
    return width, height


PAIR = "{0[0]}x{0[1]}".format  # a size or a crop as written


def pair(text: str) -> tuple[int, int]:
    """'AxB' -> (A, B), two whole numbers: an SDXL size HxW (height first) or crop TOPxLEFT. ValueError if not."""
    match = re.fullmatch(r"(-?\d+)x(-?\d+)", text.strip())
    if match is None:
        raise ValueError(f"not two whole numbers AxB: {text!r}")
    return int(match[1]), int(match[2])


def not_own_size(name: str) -> Callable[[Values], bool]:
    """A row of an SDXL size condition, written when it is set and is not the image's own (h, w), its default."""
    return lambda values: values.get(name) not in (None, (values["height"], values["width"]))


def checkpoint_title(text: str) -> tuple[str, str | None]:
    """AUTOMATIC1111's "NAME [HASH]" of a checkpoint (its "Refiner") as (name, hash); the hash may be left out."""
    name, digest = re.fullmatch(r"(.*?)(?: \[([0-9a-fA-F]+)\])?", text, flags=re.S).groups()
    return name, digest


def hashes(text: str) -> dict[str, str]:
    """AUTOMATIC1111's "name: hash, name: hash" (TI hashes, Lora hashes) as {name: hash}."""
    return {name.strip(): value.strip() for name, value in (item.rsplit(":", 1) for item in text.split(", "))}


def hashes_text(by_name: dict[str, str]) -> str:
    return ", ".join(f"{name}: {digest}" for name, digest in by_name.items())


FIELDS = (  # in the order written
    Field("Steps", "steps", int),
    Field("Sampler", "sampler", sampler_name),
    Field("CFG scale", "guidance_scale", float),
    Field("Seed", "seed", int),
    Field("Size", ("width", "height"), size, PAIR, required=True),
    Field("Model hash", "model_hash"),
    Field("Model", "model"),
    Field("Refiner", ("refiner_model", "refiner_hash"), checkpoint_title, "{0[0]} [{0[1]}]".format,
          written=given("refiner_model")),
    Field("Refiner switch at", "refiner_switch", float, written=given("refiner_model")),
    # "Denoising strength" is the hires fix's when there is one, else image-to-image's (as AUTOMATIC1111 has it)
    Field("Denoising strength", "hires_strength", float, written=given("hires_scale")),
    Field("Denoising strength", "strength", float,
          written=lambda values: values.get("image") is not None and values.get("invert") is None),
    Field("Inversion prompt", "invert", written=given("invert")),
    Field("Init image", "image", Path, written=given("image")),
    Field("Mask", "mask", Path, written=given("mask")),
    Field("Hires upscale", "hires_scale", float, written=given("hires_scale")),
    Field("Hires upscaler", "hires_upscaler", str.lower, str.capitalize, written=given("hires_scale")),
    Field("Hires steps", "hires_steps", int, written=given("hires_steps")),
    Field("Clip skip", "clip_skip", int, written=lambda values: values["clip_skip"] > 1),
    Field("Deep cache", "deep_cache", int, written=given("deep_cache")),
    Field("Deep cache branch", "deep_cache_branch", int, written=given("deep_cache")),
    Field("Token merging ratio", "token_merging", float, written=given("token_merging")),
    Field("Prediction", "prediction", written=given("prediction")),  # ours: v, or epsilon where it was chosen
    Field("Original size", "original_size", pair, PAIR, written=not_own_size("original_size")),  # ours, SDXL's
    Field("Crop top-left", "crop", pair, PAIR, written=lambda values: values.get("crop") not in (None, DEFAULT_CROP)),
    Field("Target size", "target_size", pair, PAIR, written=not_own_size("target_size")),
    Field("Aesthetic score", "aesthetic_score", float, written=given("aesthetic_score")),  # with a refiner
    Field("Negative aesthetic score", "negative_aesthetic_score", float, written=given("negative_aesthetic_score")),
    Field("TI hashes", "ti_hashes", hashes, hashes_text, written=lambda values: bool(values["ti_hashes"])),
    Field("Lora hashes", "lora_hashes", hashes, hashes_text, written=lambda values: bool(values["lora_hashes"])),
    Field("Tiled decode", "tiled_decode", lambda text: text == "True", written=lambda values: values["tiled_decode"]),
)
SHARED_KEYS = {key for key, rows in Counter(field.key for field in FIELDS).items() if rows > 1}


def quote(value: str) -> str:
    """A settings value, JSON-quoted if it holds a comma, colon, quote or newline (as AUTOMATIC1111 does), or
    starts or ends with a space (a file name can), which reading would otherwise lose."""
    return json.dumps(value, ensure_ascii=False) if re.search(r'[,:"\n]', value) or value != value.strip() else value


def format_parameters(values: Values, folder: Path) -> str:
    """The text of `values`: "prompt" and "negative_prompt", then every row of `FIELDS` that is written, by
    its attribute; paths are written relative to `folder`, that of the PNG."""
    line = {}
    for field in FIELDS:
        if field.written(values):
            value = field.value(values)
            if isinstance(value, Path):
                value = os.path.relpath(value.resolve(), folder.resolve())
            line[field.key] = quote(field.format(value))
    negative = [f"{NEGATIVE_MARK[1:]}{values['negative_prompt']}"] if values["negative_prompt"] else []
    return "\n".join([values["prompt"], *negative, ", ".join(f"{key}: {value}" for key, value in line.items())])


def parse_parameters(text: str, folder: Path) -> dict[str, Any]:
    """The values in `text` by attribute name, with "prompt" and "negative_prompt"; relative paths are taken
    from `folder`, that of the PNG. A key that several rows write goes to the first whose condition holds
    for the rest of what was read, or to none. ValueError if there is no settings line (no "Size") or one
    of its known values does not parse."""
    *lines, last = text.split("\n")
    prompt, _, negative = "\n".join(lines).partition(NEGATIVE_MARK)
    line = {key: json.loads(value) if value.startswith('"') else value for key, value in SETTING.findall(last)}
    for field in FIELDS:
        if field.required and field.key not in line:
            raise ValueError(f"no {field.key!r} in the settings line")
    parsed = [(field, field.parse(line[field.key])) for field in FIELDS if field.key in line]
    found = {}
    for field, value in parsed:
        if field.key not in SHARED_KEYS:
            field.store(found, value)
    for key in SHARED_KEYS:
        chosen = next(((field, value) for field, value in parsed if field.key == key and field.written(found)), None)
        if chosen is not None:
            chosen[0].store(found, chosen[1])
    for name, value in found.items():
        if isinstance(value, Path) and not value.is_absolute():
            found[name] = Path(os.path.normpath(folder / value))
    return found | {"prompt": prompt, "negative_prompt": negative}
