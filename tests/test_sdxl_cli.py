"""SDXL on the command line, on tiny checkpoints (tests/tiny.py): the micro-condition flags and a --refiner run
make the images the library's one-process `text_to_image(..., refiner=...)` makes, bit for bit, with the base
freed before the refiner loads (the library's halves: `hand_off`, `refine`); the PNG names the refiner as
AUTOMATIC1111 does and keeps our micro-conditions, so --from-png makes the image again (finding the refiner in
data/ as it finds the model); the family's defaults (guidance, size, side multiple) hold before loading; and
every bad flag or file is one line `error: ...`, exit status 2, no file, and where the files' headers tell,
before any checkpoint is loaded.

Everything runs in-process through `run_demo.main` (the whole command but the interpreter's start), on one CPU
thread, at 64x96 (not square: a height and width swapped would show) and 4 steps."""

import dataclasses
import functools
import hashlib
import os
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import run_demo
from sd.checkpoint import load_checkpoint
from sd.errors import SettingError
from sd.families import SDXL
from sd.flags import settle_flags
from sd.pipeline import StableDiffusion
from tests.tiny import TINY_BIG_G, TINY_CLIP, write_tiny_checkpoint

PROMPT = "a lighthouse in a storm"
RUN = ["--steps", "4", "--width", "64", "--height", "96", "--no-progress"]  # (h, w) = (96, 64)
CONDITIONS = ["--original-size", "512x384", "--crop=32x0", "--target-size", "96x64"]  # HxW, TOPxLEFT
API_CONDITIONS = dict(original_size=(512, 384), crop=(32, 0), target_size=(96, 64))


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models' operations are too small to gain from threads; on a busy machine they lose."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """Tiny checkpoints: an SDXL base, an SDXL refiner (in a data/ folder, where --from-png looks), an SD v1 model;
    the refiner also as a truncated file, the base also as a .ckpt (whose family only loading tells)."""
    folder = tmp_path_factory.mktemp("sdxl")
    data = folder / "data"
    data.mkdir()
    refiner = write_tiny_checkpoint(data / "refiner-xl.safetensors", family="sdxl-refiner", seed=1)
    truncated = folder / "truncated-refiner.safetensors"
    truncated.write_bytes(refiner.read_bytes()[: refiner.stat().st_size // 2])
    return SimpleNamespace(base=write_tiny_checkpoint(folder / "base-xl.safetensors", family="sdxl"), refiner=refiner,
                           data=data, sd1=write_tiny_checkpoint(folder / "sd1.safetensors"), truncated=truncated,
                           base_ckpt=write_tiny_checkpoint(folder / "base-xl.ckpt", family="sdxl"))


def short_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def parameters(path: Path) -> str:
    with Image.open(path) as image:
        return image.text["parameters"]


def succeed(capsys, *args) -> str:
    assert run_demo.main(list(map(str, args))) == 0, capsys.readouterr().err
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def pipes(files) -> SimpleNamespace:
    """The library's models of the same files, for the one-process runs the command must equal."""
    return SimpleNamespace(base=StableDiffusion.from_checkpoint(files.base),
                           refiner=StableDiffusion.from_checkpoint(files.refiner))


@pytest.fixture(scope="module")
def made(files, tmp_path_factory):
    """made(kind) -> the folder of the images a command made, once per module: "refined" (two images, seeds 3
    and 4, refiner after 0.5 of the run, an aesthetic score; euler_a, which draws noise at every step, so the
    refiner must go on with the run's generator where the base left it), "base" (SDXL alone, seed 5)."""
    @functools.cache
    def make(kind: str) -> Path:
        out = tmp_path_factory.mktemp(kind)
        extra = (["--refiner", files.refiner, "--refiner-switch", "0.5", "--aesthetic-score", "7", "--num-images", "2",
                  "--seed", "3", "--sampler", "euler_a"] if kind == "refined" else ["--seed", "5"])
        assert run_demo.main(list(map(str, ["--prompt", PROMPT, "--checkpoint", files.base, *RUN, *CONDITIONS,
                                            *extra, "--output", out / "image.png"]))) == 0
        return out

    return make


def test_a_refined_run_is_the_library_s_one_process_run_bit_for_bit(made, pipes, files):
    out = made("refined")
    for seed, name in ((3, "image-1.png"), (4, "image-2.png")):
        [expected] = pipes.base.text_to_image(PROMPT, width=64, height=96, steps=4, seed=seed, progress=False,
                                              sampler="euler_a", refiner=pipes.refiner, refiner_switch=0.5,
                                              aesthetic_score=7.0, **API_CONDITIONS)
        assert np.array_equal(pixels(out / name), np.asarray(expected))
    # what the equality rests on reaches the image: the refiner, its aesthetic score and the micro-conditions
    for changed in (dict(refiner=None, refiner_switch=None, aesthetic_score=None), dict(aesthetic_score=6.0),
                    dict(crop=(0, 0))):
        options = dict(refiner=pipes.refiner, refiner_switch=0.5, aesthetic_score=7.0, **API_CONDITIONS) | changed
        [other] = pipes.base.text_to_image(PROMPT, width=64, height=96, steps=4, seed=4, progress=False,
                                           sampler="euler_a", **options)
        assert not np.array_equal(pixels(out / "image-2.png"), np.asarray(other)), changed
    assert parameters(out / "image-1.png") == (
        f"{PROMPT}\nSteps: 4, Sampler: euler_a, CFG scale: {SDXL.guidance_scale}, Seed: 3, Size: 64x96, "
        f"Model hash: {short_hash(files.base)}, Model: base-xl, Refiner: refiner-xl [{short_hash(files.refiner)}], "
        f"Refiner switch at: 0.5, Original size: 512x384, Crop top-left: 32x0, Aesthetic score: 7.0, "
        f"Negative aesthetic score: 2.5")  # the target size is the image's own (h, w): the default, not written


def test_the_refiner_reads_the_prompt_with_the_embeddings(files, tmp_path, capsys):
    """An SDXL embedding ({"clip_l", "clip_g"}) conditions the base and, by its "clip_g" vectors, the refiner: the
    image is the library's with the embedding added to both, or to the base alone (the refiner takes those of the
    base's it lacks); a refiner without it makes another image."""
    gen = torch.Generator().manual_seed(9)
    save_file({key: torch.randn(2, width, generator=gen) for key, width in (("clip_l", TINY_CLIP.width),
                                                                          ("clip_g", TINY_BIG_G.width))},
              tmp_path / "xl-style.safetensors")
    prompt = "a lighthouse, xl-style"
    succeed(capsys, "--prompt", prompt, "--checkpoint", files.base, "--refiner", files.refiner, "--refiner-switch",
            "0.5", "--embedding", tmp_path / "xl-style.safetensors", *RUN, "--seed", "6", "--output", tmp_path / "a.png")
    images = []
    for both in (True, False):
        base, refiner = (StableDiffusion.from_checkpoint(path) for path in (files.base, files.refiner))
        for pipe in (base, refiner) if both else (base,):
            pipe.load_embedding(tmp_path / "xl-style.safetensors")
        settings = dict(width=64, height=96, steps=4, seed=6, progress=False, refiner_switch=0.5)
        [image] = base.text_to_image(prompt, refiner=refiner, **settings)
        images.append(np.asarray(image))
    handoff = base.hand_off(prompt, **settings)
    [without] = refiner.refine(dataclasses.replace(handoff, embeddings={}), progress=False)
    assert np.array_equal(pixels(tmp_path / "a.png"), images[0]) and np.array_equal(images[0], images[1])
    assert not np.array_equal(images[1], np.asarray(without)) and not refiner.embeddings


def test_a_handoff_refines_again_to_the_same_image(pipes):
    """`refine` goes on with a copy of the run's generator (euler_a draws from it at every step), so a handoff
    refined twice gives one image; only a refiner refines."""
    handoff = pipes.base.hand_off(PROMPT, width=64, height=96, steps=4, seed=2, sampler="euler_a", refiner_switch=0.5,
                                  progress=False)
    first, again = (np.asarray(pipes.refiner.refine(handoff, progress=False)[0]) for _ in range(2))
    assert np.array_equal(first, again)
    with pytest.raises(SettingError, match="refiner is an SDXL checkpoint, not a refiner"):
        pipes.base.refine(handoff)


def test_a_base_run_with_micro_conditions_is_the_library_s(made, pipes, files):
    [expected] = pipes.base.text_to_image(PROMPT, width=64, height=96, steps=4, seed=5, progress=False,
                                          **API_CONDITIONS)
    assert np.array_equal(pixels(made("base") / "image.png"), np.asarray(expected))
    assert parameters(made("base") / "image.png").endswith(
        f"Model: base-xl, Original size: 512x384, Crop top-left: 32x0")  # no aesthetic score without a refiner


@pytest.mark.parametrize("kind, name", [("refined", "image-2.png"), ("base", "image.png")])
def test_from_png_makes_the_image_again_bit_for_bit(made, files, monkeypatch, capsys, kind, name):
    """The PNG's "Refiner" is found in data/ as its "Model" is."""
    monkeypatch.setattr(run_demo, "DATA_DIR", files.data)
    first = made(kind) / name
    again = first.with_name(f"again-{name}")
    out = succeed(capsys, "--from-png", first, "--checkpoint", files.base, "--no-progress", "--output", again)
    assert ("loading the refiner" in out) == (kind == "refined")
    assert np.array_equal(pixels(again), pixels(first))
    assert parameters(again) == parameters(first)


def test_from_png_refuses_when_its_refiner_is_not_in_data(made, files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_demo, "DATA_DIR", tmp_path)
    png = made("refined") / "image-1.png"
    assert run_demo.main(["--from-png", str(png), "--checkpoint", str(files.base), "--output",
                          str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err == (
        f"error: {png} was made with the refiner refiner-xl [{short_hash(files.refiner)}], but there is no "
        f"refiner-xl.safetensors in {tmp_path}/; put the file there or pass --refiner PATH\n")
    assert not (tmp_path / "x.png").exists()


def test_the_base_is_freed_before_the_refiner_loads(files, tmp_path, monkeypatch, capsys):
    loaded, gone = [], []  # a weak reference to each UNet loaded; whether those before it were gone by then

    def load(*args, **kwargs):
        gone.append(all(ref() is None for ref in loaded))
        models = load_checkpoint(*args, **kwargs)
        loaded.append(weakref.ref(models.unet))
        return models

    monkeypatch.setattr(run_demo, "load_checkpoint", load)
    succeed(capsys, "--prompt", PROMPT, "--checkpoint", files.base, "--refiner", files.refiner, *RUN, "--seed", "1",
            "--output", tmp_path / "image.png")
    assert gone == [True, True]  # the refiner (the second) loaded with no UNet of the base left


def test_sdxl_defaults_hold_before_loading(files, tmp_path, monkeypatch, capsys):
    """An SDXL file's guidance, size and side multiple are its family's from the first check on: the flags
    settled before loading are SDXL's, and a width that is not a multiple of 32 fails before it."""
    settled = []

    def stop(*args, **kwargs):
        settled.append(settle_flags(*args, **kwargs))
        raise SystemExit("stop before loading")

    monkeypatch.setattr(run_demo, "settle_flags", stop)
    for extra in ([], ["--width", "96", "--height", "64", "--hires-scale", "1.5"]):
        with pytest.raises(SystemExit, match="stop before loading"):
            run_demo.main(["--prompt", PROMPT, "--checkpoint", str(files.base), "--output", str(tmp_path / "x.png"),
                           *extra])
    default, hires = settled
    assert (default.width, default.height, default.guidance_scale) == (SDXL.image_size,) * 2 + (SDXL.guidance_scale,)
    assert hires.final_size == (128, 96)  # 144 x 96 rounded down to SDXL's multiple of 32, as the pipeline makes it


# ---- bad input ------------------------------------------------------------------------------------

SWITCH = "--refiner-switch must be a fraction of the steps above 0 and below 1, got"
PAIR = "must be HxW (height first), two whole numbers such as 1024x768, got"
BAD = {  # name: (arguments, fragments of the message); {base}, {refiner}, {sd1}, {truncated}, {image}, {tmp} filled in
    "refiner_as_checkpoint": (["--checkpoint", "{refiner}"],
                              ["this is an SDXL refiner checkpoint: it refines images; give it --image "
                               "(image-to-image), or use it as --refiner of an SDXL base"]),
    "base_as_refiner": (["--refiner", "{base}"], ["--refiner is an SDXL checkpoint, not a refiner"]),
    "sd1_base_with_refiner": (["--checkpoint", "{sd1}", "--refiner", "{refiner}"],
                              ["--refiner continues the latents of an SDXL base; this is an SD v1 checkpoint"]),
    **{f"switch_{value}": (["--refiner", "{refiner}", "--refiner-switch", value], [f"{SWITCH} {float(value)}"])
       for value in ("0", "1", "-0.1", "1.5", "nan")},
    "switch_not_a_number": (["--refiner", "{refiner}", "--refiner-switch", "abc"],
                            ["argument --refiner-switch: invalid float value: 'abc'"]),
    "switch_without_refiner": (["--refiner-switch", "0.5"], ["--refiner-switch says when --refiner takes over"]),
    **{f"original_size_{value}": (["--original-size", value], [f"argument --original-size: {PAIR} '{value}'"])
       for value in ("1024", "axb", "1024x1024x3")},
    "original_size_0x5": (["--original-size", "0x5"], ["--original-size must be two whole numbers (h, w), each a "
                                                        "whole number between 1 and", "got (0, 5)"]),
    "crop_negative": (["--crop=-1x0"], ["--crop must be two whole numbers (top, left)", "got (-1, 0)"]),
    "width_not_multiple_of_32": (["--width", "1000"], ["--width must be a multiple of 32 for this model", "got 1000; "
                                                       "use 992 or 1024"]),
    "refiner_with_mask": (["--refiner", "{refiner}", "--image", "{image}", "--mask", "{image}"],
                          ["--refiner takes over text-to-image and image-to-image runs; leave out --mask"]),
    "refiner_with_hires_fix": (["--refiner", "{refiner}", "--hires-scale", "2"],
                               ["--refiner takes over a run of one size; the hires fix makes two"]),
    "missing_refiner": (["--refiner", "{tmp}/nowhere.safetensors"],
                        ["--refiner {tmp}/nowhere.safetensors not found; check the path"]),
    "truncated_refiner": (["--refiner", "{truncated}"], ["{truncated} is not a readable .safetensors file",
                                                         "truncated or corrupt"]),
    "original_size_on_sd1": (["--checkpoint", "{sd1}", "--original-size", "512x512"],
                             ["--original-size is a micro-condition of SDXL that this SD v1 checkpoint does not "
                              "take (it takes none)"]),
    "aesthetic_score_without_refiner": (["--aesthetic-score", "7"], ["--aesthetic-score is a micro-condition of SDXL "
                                                                    "that this SDXL checkpoint with no refiner does "
                                                                    "not take"]),
    "aesthetic_score_out_of_range": (["--refiner", "{refiner}", "--negative-aesthetic-score", "-1"],
                                     ["--negative-aesthetic-score must be between 0 and 1000, got -1.0"]),
}
AFTER_LOADING = {  # what only loading tells (a .ckpt's family): refused then, still in one line
    "base_ckpt_as_refiner": (["--refiner", "{base_ckpt}"], ["--refiner is an SDXL checkpoint, not a refiner"]),
}


@pytest.mark.parametrize("name", [*BAD, *AFTER_LOADING])
def test_bad_input_is_one_line_and_exit_2(files, tmp_path, monkeypatch, capsys, name):
    args, fragments = BAD.get(name) or AFTER_LOADING[name]
    image = tmp_path / "image.png"
    Image.new("RGB", (64, 96), "gray").save(image)
    fill = vars(files) | {"image": image, "tmp": tmp_path}
    loads = []
    monkeypatch.setattr(run_demo, "load_checkpoint", lambda *a, **k: loads.append(a[0]) or load_checkpoint(*a, **k))
    out = tmp_path / "out"
    out.mkdir()
    checkpoint = [] if "--checkpoint" in args else ["--checkpoint", str(files.base)]
    status = run_demo.main(["--prompt", PROMPT, *checkpoint, *RUN, *(a.format(**fill) for a in args),
                            "--output", str(out / "x.png")])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment.format(**fill) in err, err
    assert os.listdir(out) == []
    assert (loads == []) == (name in BAD)  # refused before any checkpoint was loaded, where the headers tell
