"""The AUTOMATIC1111 "parameters" codec (`sd.parameters`): what it writes reads back as the same settings for
every row of its table and their combinations; texts in AUTOMATIC1111's form (built by its rules: the prompt,
"Negative prompt: ...", one line "Key: value, ..." whose values holding a comma, colon, quote or newline are
JSON-quoted) read as the values they state, unknown keys ignored; the exact line written for each mode; and
texts without a settings line refused."""

import time
from pathlib import Path

import pytest
from PIL import Image

import run_demo
from sd.errors import InputError
from sd.outputs import write_png
from sd.parameters import FIELDS, format_parameters, parse_parameters

# What a text-to-image run writes always, and values for every other attribute that a row can hold.
ALWAYS = {"steps": 20, "sampler": "euler_a", "guidance_scale": 7.5, "seed": 2**64 - 1, "width": 512, "height": 768,
          "model_hash": "0123456789", "model": "v1-5-pruned-emaonly"}
UNWRITTEN = {"prompt": "a fox", "negative_prompt": "", "image": None, "mask": None, "invert": None, "strength": 0.75,
             "hires_scale": None, "hires_strength": None, "hires_steps": None, "hires_upscaler": None, "clip_skip": 1,
             "deep_cache": None, "deep_cache_branch": 0, "token_merging": None, "prediction": None, "tiled_decode": False,
             "ti_hashes": {}, "lora_hashes": {}, "original_size": None, "crop": None, "target_size": None,
             "aesthetic_score": None, "negative_aesthetic_score": None, "refiner_model": None, "refiner_hash": None,
             "refiner_switch": None}
TRICKY = 'a "dog", at: night\nsecond line, café ☃'  # every character that needs quoting, and non-Latin-1 ones

# name: (the values changed from a text-to-image run's, the attributes that come back beside ALWAYS)
CASES = {
    "text-to-image": ({}, []),
    "negative prompt": ({"prompt": "a fox\nin snow", "negative_prompt": "blurry, dark"}, []),
    "tricky prompts": ({"prompt": TRICKY, "negative_prompt": TRICKY}, []),
    "strength without image": ({"strength": 0.3}, []),
    "image-to-image": ({"image": "in/init.png", "strength": 0.6}, ["image", "strength"]),
    "inpainting": ({"image": "in/init.png", "mask": "in/a, b.png", "strength": 1.0}, ["image", "mask", "strength"]),
    "inversion": ({"image": "init.png", "invert": TRICKY, "strength": 0.9}, ["image", "invert"]),
    "hires fix": ({"hires_scale": 1.5, "hires_strength": 0.55, "hires_upscaler": "latent"},
                  ["hires_scale", "hires_strength", "hires_upscaler"]),
    "hires fix with steps": ({"hires_scale": 2.0, "hires_strength": 0.3, "hires_upscaler": "lanczos", "hires_steps": 7},
                             ["hires_scale", "hires_strength", "hires_upscaler", "hires_steps"]),
    "clip skip 1": ({"clip_skip": 1}, []),
    "clip skip 2": ({"clip_skip": 2}, ["clip_skip"]),
    "deep cache": ({"deep_cache": 3}, ["deep_cache", "deep_cache_branch"]),
    "deep cache branch": ({"deep_cache": 2, "deep_cache_branch": 1}, ["deep_cache", "deep_cache_branch"]),
    "branch without deep cache": ({"deep_cache_branch": 1}, []),
    "token merging": ({"token_merging": 0.5}, ["token_merging"]),
    "tiled decode": ({"tiled_decode": True}, ["tiled_decode"]),
    "v-prediction": ({"prediction": "v"}, ["prediction"]),
    "epsilon chosen": ({"prediction": "epsilon"}, ["prediction"]),
    "TI hashes": ({"ti_hashes": {"my-style": "0123456789ab", "neg": "ba9876543210"}}, ["ti_hashes"]),
    "Lora hashes": ({"lora_hashes": {"style": "abcdefabcdef"}}, ["lora_hashes"]),
    "ddim, guidance 1, small": ({"sampler": "ddim", "guidance_scale": 1.0, "seed": 0, "width": 64, "height": 48,
                                 "steps": 1}, []),
    "SDXL micro-conditions": ({"original_size": (1024, 768), "crop": (0, 256), "target_size": (512, 384)},
                              ["original_size", "crop", "target_size"]),
    "micro-conditions at their defaults": ({"original_size": (768, 512), "crop": (0, 0), "target_size": (768, 512)},
                                           []),  # the image's own (h, w), no crop
    "switch without refiner": ({"refiner_switch": 0.5}, []),
    "SDXL refined": ({"refiner_model": "sd_xl_refiner_1.0", "refiner_hash": "7440042bbd", "refiner_switch": 0.8,
                      "aesthetic_score": 6.0, "negative_aesthetic_score": 2.5, "original_size": (1024, 768),
                      "crop": (0, 256)},
                     ["refiner_model", "refiner_hash", "refiner_switch", "aesthetic_score", "negative_aesthetic_score",
                      "original_size", "crop"]),
    "everything of text-to-image": (
        {"negative_prompt": "ugly", "hires_scale": 1.25, "hires_strength": 0.4, "hires_upscaler": "lanczos",
         "hires_steps": 3, "clip_skip": 3, "deep_cache": 2, "deep_cache_branch": 2, "token_merging": 0.25,
         "tiled_decode": True, "ti_hashes": {"a": "000000000001"}, "lora_hashes": {"x": "1", "y": "2"}},
        ["hires_scale", "hires_strength", "hires_upscaler", "hires_steps", "clip_skip", "deep_cache",
         "deep_cache_branch", "token_merging", "tiled_decode", "ti_hashes", "lora_hashes"]),
    "everything of inpainting": (
        {"image": "in/init.png", "mask": "mask.png", "strength": 0.5, "clip_skip": 2, "deep_cache": 4,
         "token_merging": 0.5, "tiled_decode": True, "ti_hashes": {"t": "t"}, "lora_hashes": {"l": "l"}},
        ["image", "mask", "strength", "clip_skip", "deep_cache", "deep_cache_branch", "token_merging",
         "tiled_decode", "ti_hashes", "lora_hashes"]),
}


def values_of(case: str, folder: Path) -> dict:
    """The case's values; its paths are files below `folder`."""
    values = ALWAYS | UNWRITTEN | CASES[case][0]
    return values | {key: folder / values[key] for key in ("image", "mask") if values[key] is not None}


def read_back(case: str, values: dict) -> dict:
    """What reading the text of the case's `values` must give."""
    return {key: values[key] for key in [*ALWAYS, "prompt", "negative_prompt", *CASES[case][1]]}


@pytest.mark.parametrize("case", CASES)
def test_what_is_written_reads_back_the_same(case, tmp_path):
    folder = tmp_path.resolve()
    values = values_of(case, folder)
    png_folder = folder / "outputs"
    text = format_parameters(values, png_folder)
    assert parse_parameters(text, png_folder) == read_back(case, values), text


def test_the_cases_write_every_row_of_the_table():
    names = {name for field in FIELDS for name in ((field.name,) if isinstance(field.name, str) else field.name)}
    assert names == set(ALWAYS) | {name for _, back in CASES.values() for name in back}
    assert set(UNWRITTEN) == names - set(ALWAYS) | {"prompt", "negative_prompt"}


# The settings line each mode writes, as AUTOMATIC1111 orders and spells it (and the PNGs of this project
# made before the codec had a table; see tests/test_run_demo.py and tests/test_prompt_cli.py).
WRITTEN = {
    "text-to-image": "Steps: 20, Sampler: euler_a, CFG scale: 7.5, Seed: 18446744073709551615, Size: 512x768, "
                     "Model hash: 0123456789, Model: v1-5-pruned-emaonly",
    "inpainting": "Steps: 20, Sampler: euler_a, CFG scale: 7.5, Seed: 18446744073709551615, Size: 512x768, "
                  "Model hash: 0123456789, Model: v1-5-pruned-emaonly, Denoising strength: 1.0, "
                  'Init image: ../in/init.png, Mask: "../in/a, b.png"',
    "inversion": "Steps: 20, Sampler: euler_a, CFG scale: 7.5, Seed: 18446744073709551615, Size: 512x768, "
                 "Model hash: 0123456789, Model: v1-5-pruned-emaonly, "
                 'Inversion prompt: "a \\"dog\\", at: night\\nsecond line, café ☃", Init image: ../init.png',
    "everything of text-to-image": (
        "Steps: 20, Sampler: euler_a, CFG scale: 7.5, Seed: 18446744073709551615, Size: 512x768, Model hash: "
        "0123456789, Model: v1-5-pruned-emaonly, Denoising strength: 0.4, Hires upscale: 1.25, Hires upscaler: "
        'Lanczos, Hires steps: 3, Clip skip: 3, Deep cache: 2, Deep cache branch: 2, Token merging ratio: 0.25, '
        'TI hashes: "a: 000000000001", Lora hashes: "x: 1, y: 2", Tiled decode: True'),
    "SDXL refined": (  # "Refiner" and "Refiner switch at" as AUTOMATIC1111 writes them; the rest ours, (h, w) first
        "Steps: 20, Sampler: euler_a, CFG scale: 7.5, Seed: 18446744073709551615, Size: 512x768, Model hash: "
        "0123456789, Model: v1-5-pruned-emaonly, Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, "
        "Original size: 1024x768, Crop top-left: 0x256, Aesthetic score: 6.0, Negative aesthetic score: 2.5"),
}


@pytest.mark.parametrize("case", WRITTEN)
def test_the_settings_line_of_each_mode(case, tmp_path):
    values = values_of(case, tmp_path.resolve())
    *prompts, line = format_parameters(values, tmp_path.resolve() / "outputs").split("\n")
    assert line == WRITTEN[case]
    assert prompts == ["a fox", *(["Negative prompt: ugly"] if values["negative_prompt"] else [])]


A1111_LINE = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"
A1111_VALUES = {"steps": 20, "sampler": "euler_a", "guidance_scale": 7.0, "seed": 1, "width": 512, "height": 512}

# Texts as AUTOMATIC1111's web UI writes them: (the text, what reads back beside A1111_VALUES)
A1111 = {
    "txt2img": ("a cat\nNegative prompt: ugly\n" + A1111_LINE + ", Model hash: abcdef0123, Model: v1-5, "
                "Version: v1.10.1",
                {"prompt": "a cat", "negative_prompt": "ugly", "model_hash": "abcdef0123", "model": "v1-5"}),
    "no negative prompt, prompt of lines": ('masterpiece, a "quoted" word\nsecond line\n' + A1111_LINE,
                                            {"prompt": 'masterpiece, a "quoted" word\nsecond line',
                                             "negative_prompt": ""}),
    "empty prompt": ("\nNegative prompt: blurry, low quality\n" + A1111_LINE,
                     {"prompt": "", "negative_prompt": "blurry, low quality"}),
    "samplers by their web UI names": ("x\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 42, "
                                       "Size: 512x768, Schedule type: Karras",
                                       {"prompt": "x", "negative_prompt": "", "steps": 30,
                                        "sampler": "dpmpp_2m_karras", "guidance_scale": 6.5, "seed": 42,
                                        "height": 768}),
    "quoted values with commas": ("x\n" + A1111_LINE + ', Lora hashes: "add_detail: 7c6bad76eb54, style: '
                                  '0123456789ab", TI hashes: "easynegative: c74b4e810b03", Clip skip: 2',
                                  {"prompt": "x", "negative_prompt": "", "clip_skip": 2,
                                   "lora_hashes": {"add_detail": "7c6bad76eb54", "style": "0123456789ab"},
                                   "ti_hashes": {"easynegative": "c74b4e810b03"}}),
    "hires fix": ("x\n" + A1111_LINE + ", Denoising strength: 0.7, Hires upscale: 2, Hires steps: 10, "
                  "Hires upscaler: Latent",
                  {"prompt": "x", "negative_prompt": "", "hires_strength": 0.7, "hires_scale": 2.0,
                   "hires_steps": 10, "hires_upscaler": "latent"}),
    "img2img without its init image named": ("x\n" + A1111_LINE + ", Denoising strength: 0.75, Mask blur: 4",
                                             {"prompt": "x", "negative_prompt": ""}),
    "init image, JSON escapes": ("x\n" + A1111_LINE + ', Denoising strength: 0.5, Init image: "a, \\"b\\".png", '
                                 "Mask: /abs/mask.png, Inversion prompt: \"a, b\"",
                                 {"prompt": "x", "negative_prompt": "", "image": 'FOLDER/a, "b".png',
                                  "mask": "/abs/mask.png", "invert": "a, b"}),
    "inversion keeps no strength": ("x\n" + A1111_LINE + ", Denoising strength: 0.5, Init image: i.png, "
                                    "Inversion prompt: y",
                                    {"prompt": "x", "negative_prompt": "", "image": "FOLDER/i.png", "invert": "y"}),
    "a key given twice: the last": ("x\n" + A1111_LINE + ", Steps: 5", {"prompt": "x", "negative_prompt": "",
                                                                         "steps": 5}),
    "spaces and an unquoted colon": ("x\nSteps:  20,Sampler: Euler a,  CFG scale: 7, Seed: 1, Size: 512x512, "
                                     "Token merging ratio: 0.3, Deep cache: 3, Tiled decode: False, "
                                     "Model: my:model, Emphasis: Original, NGMS: 0.2",
                                     {"prompt": "x", "negative_prompt": "", "token_merging": 0.3, "deep_cache": 3,
                                      "tiled_decode": False, "model": "my:model"}),
}


@pytest.mark.parametrize("case", A1111)
def test_reads_automatic1111_texts(case, tmp_path):
    text, expected = A1111[case]
    expected = A1111_VALUES | {key: Path(value.replace("FOLDER", str(tmp_path))) if key in ("image", "mask")
                               else value for key, value in expected.items()}
    assert parse_parameters(text, tmp_path) == expected


@pytest.mark.parametrize("text", [
    "", "a cat", "a cat\nSteps: 20, Sampler: Euler a", "x\nSteps: 20, Size: 512", "x\nSteps: 20, Size: 512x512x3",
    "x\nSteps: many, Size: 512x512", "x\nSize: 512x512, CFG scale: high", 'x\nSize: 512x512, Lora hashes: "nohash"',
    'x\nSize: 512x512, Model: "bad \\escape"', "x\nSize: 512x512, Denoising strength: strong",
    "x\nSize: 512x512\nNegative prompt: the settings line comes last",
])
def test_a_text_without_readable_settings_is_refused(text, tmp_path):
    with pytest.raises(ValueError):
        parse_parameters(text, tmp_path)


def test_a_png_written_with_its_parameters_reads_back(tmp_path):
    """Through the PNG text chunk (iTXt, as the text is not Latin-1) and --from-png's reader."""
    folder = tmp_path.resolve()
    values = values_of("everything of inpainting", folder) | {"prompt": TRICKY}
    png = write_png(Image.new("RGB", (8, 8)), folder / "out.png", format_parameters(values, folder), False)
    assert run_demo.read_parameters(png) == read_back("everything of inpainting", values)
    Image.new("RGB", (8, 8)).save(folder / "plain.png")
    with pytest.raises(InputError, match="holds no generation parameters that python run_demo.py can read"):
        run_demo.read_parameters(folder / "plain.png")


MEGABYTE = 1_000_000
PATHOLOGICAL = {  # settings lines that a backtracking pattern takes quadratic time on, each 1 MB
    "no colon": "a" * MEGABYTE, "words": "ab cd-ef/" * (MEGABYTE // 9), "tabs": "\t" * MEGABYTE,
    "spaces": " " * MEGABYTE, "colons": "a:" * (MEGABYTE // 2), "commas": "a," * (MEGABYTE // 2),
    "unclosed quotes": 'a:"' * (MEGABYTE // 3), "backslashes": 'a:"' + "\\" * MEGABYTE,
    "quoted values": 'Steps:"x, ' * (MEGABYTE // 10), "punctuation": "a!" * (MEGABYTE // 2),
    "long value": "Size: 8x8, Model: " + "x" * MEGABYTE, "comma spaces": ", " * (MEGABYTE // 2),
    "non-ASCII": "\u00e9\u2603 " * (MEGABYTE // 3),
}


@pytest.mark.parametrize("case", PATHOLOGICAL)
def test_the_settings_line_is_read_in_linear_time(case, tmp_path):
    start = time.perf_counter()
    try:
        parse_parameters("a fox\n" + PATHOLOGICAL[case], tmp_path)
    except ValueError:
        pass
    assert time.perf_counter() - start < 5  # a quadratic reader takes hours on 1 MB
