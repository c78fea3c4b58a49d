"""Prompts as a user of `python run_demo.py` writes them, on a tiny checkpoint: textual-inversion embeddings
of every file layout (--embedding PATH[:NAME], and data/embeddings/ by the names a prompt holds) reach the
model and are listed in the PNG's "TI hashes"; emphasis changes the image only where a weight is not 1;
--clip-skip is stored as "Clip skip"; --from-png makes such an image again bit for bit, and refuses when an
embedding it names is not loaded; every bad prompt, clip skip or embedding file is one line `error: ...`,
exit status 2 and no file.

Each subprocess run costs seconds, so the images are made once per module (`made`) and shared by the tests;
the refusals, which stop before generating, run in-process through `run_demo.main` (the whole command but
the interpreter's start), except the malicious pickle, which gets a process of its own."""

import functools
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import run_demo
from tests.bad_files import SYSTEM, attacks
from tests.tiny import TINY_CLIP, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SIZE = ["--width", "64", "--height", "48"]
WIDTH = TINY_CLIP.width  # the tiny text encoder's width: embeddings for it hold vectors of this size
LAYERS = TINY_CLIP.layers


# ---- helpers ---------------------------------------------------------------------------------------

def run_cli(*args, checkpoint) -> subprocess.CompletedProcess:
    """run_demo.py in a process of its own, on one CPU thread: the tiny model's operations are too small to
    gain from more, and on a busy machine threads waiting for each other make a run several times slower."""
    return subprocess.run([sys.executable, ROOT / "run_demo.py", "--no-progress", "--steps", "2", "--checkpoint",
                           checkpoint, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture
def one_thread():
    """In-process runs on one CPU thread too (see `run_cli`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def succeeded(result) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def assert_refused(status: int, out: str, err: str, out_dir: Path, *fragments: str) -> None:
    assert status == 2, err
    assert "Traceback" not in err and "wrote" not in out
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert os.listdir(out_dir) == []


def parameters(path: Path) -> str:
    with Image.open(path) as image:
        return image.text["parameters"]


def settings_line(path: Path) -> str:
    return parameters(path).split("\n")[-1]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (64, 48)
        return np.asarray(image)


def short_hash(path: Path) -> str:
    """AUTOMATIC1111's hash of an embedding: the first 12 hex digits of the file's SHA-256."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def vectors(n: int, seed: int, width: int = WIDTH) -> torch.Tensor:
    """n random token vectors at the scale of the tiny CLIP's own token embeddings."""
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) / width ** 0.5


def a1111_pt(path: Path, n: int = 2, seed: int = 0, width: int = WIDTH) -> Path:
    """AUTOMATIC1111's layout, with the extra entries its files carry (its "name" is not the one used)."""
    torch.save({"string_to_param": {"*": vectors(n, seed, width)}, "name": "trained-as", "step": 3000,
                "sd_checkpoint": "1dadcdfcf8", "sd_checkpoint_name": "tiny"}, path)
    return path


def kohya_safetensors(path: Path, n: int = 3, seed: int = 1) -> Path:
    save_file({"emb_params": vectors(n, seed)}, path)
    return path


def kohya_pt(path: Path, n: int = 1, seed: int = 2) -> Path:
    torch.save({"emb_params": vectors(n, seed)}, path)
    return path


def diffusers_file(path: Path, token: str, n: int | None, seed: int) -> Path:
    """diffusers' layout: {token: (C,)} for n None, else {token: (n, C)}; .bin pickled, else .safetensors."""
    vector = vectors(1, seed)[0] if n is None else vectors(n, seed)
    if path.suffix == ".bin":
        torch.save({token: vector}, path)
    else:
        save_file({token: vector}, path)
    return path


# ---- the images, made once -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """One embedding file of each layout, and a second file to load under the name of one of them."""
    folder = tmp_path_factory.mktemp("embeddings")
    return SimpleNamespace(
        a1111=a1111_pt(folder / "a1111-style.pt"),  # named after the file
        kohya=kohya_safetensors(folder / "kohya-style.safetensors"),  # named after the file
        diffusers=diffusers_file(folder / "learned_embeds.bin", "<diff-token>", None, seed=3),  # named by its token
        renamed=diffusers_file(folder / "renamed.safetensors", "<ignored-token>", 2, seed=4),  # PATH:renamed-style
        unused=kohya_pt(folder / "unused-style.pt"),  # loaded, named by no prompt
        other=diffusers_file(folder / "retrained.safetensors", "<ignored-token>", 2, seed=5),  # renamed-style too
    )


def embedding_flags(files: SimpleNamespace, renamed: Path | None) -> list:
    """--embedding for each file; `renamed` is loaded as renamed-style (left out if None)."""
    paths = [files.a1111, files.kohya, files.diffusers, *([f"{renamed}:renamed-style"] * bool(renamed)),
             files.unused]
    return [a for path in paths for a in ("--embedding", path)]


PROMPT = "a large red circle, a1111-style, kohya-style (renamed-style:1.2)"
NEGATIVE = "<diff-token>, blurry"
PLAIN = "a large red circle in the top left"
RUNS = {  # name: (arguments, which needs --embedding flags: None, or the file loaded as renamed-style)
    "embeddings": (["--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--seed", "7"], "renamed"),
    "no-embeddings": (["--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--seed", "7"], None),
    "clip-skip-2": (["--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--seed", "7", "--clip-skip", "2"], "renamed"),
    "plain": (["--prompt", PLAIN, "--seed", "3"], None),
    "weighted": (["--prompt", PLAIN.replace("red", "(red:1.5)"), "--seed", "3"], None),
    # Every weight 1.0, nested too: the same tokens as PLAIN, unweighted; an explicit --clip-skip 1 is the default.
    "unit-weights": (["--prompt", "(a large:1.0) ((red:1.0) circle:1.0) in the top (left:1)", "--seed", "3",
                      "--clip-skip", "1"], None),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory, checkpoint, files):
    """made(name) -> (the run of RUNS[name], its PNG), run once per module."""
    folder = tmp_path_factory.mktemp("made")

    @functools.cache
    def make(name: str):
        args, renamed = RUNS[name]
        out = folder / f"{name}.png"
        flags = embedding_flags(files, getattr(files, renamed)) if renamed else []
        return run_cli(*args, *flags, *SIZE, "--output", out, checkpoint=checkpoint), out

    return make


# ---- textual inversion -----------------------------------------------------------------------------

def test_embeddings_of_every_layout_are_listed_in_ti_hashes(made, files, checkpoint):
    """A1111 .pt and kohya .safetensors named after their file, diffusers .bin after its token, a file
    loaded as PATH:NAME under NAME; listed in the order the prompts use them, the negative prompt's too,
    and the one no prompt names is not listed."""
    result, out = made("embeddings")
    succeeded(result)
    assert result.stderr == "" and result.stdout.endswith(f"wrote {out} (seed 7)\n")
    expected = (f'TI hashes: "a1111-style: {short_hash(files.a1111)}, kohya-style: {short_hash(files.kohya)}, '
                f'renamed-style: {short_hash(files.renamed)}, <diff-token>: {short_hash(files.diffusers)}"')
    assert parameters(out).split("\n") == [
        PROMPT, f"Negative prompt: {NEGATIVE}",
        f"Steps: 2, Sampler: dpmpp_2m_karras, CFG scale: 7.5, Seed: 7, Size: 64x48, Model hash: "
        f"{hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]}, Model: tiny, {expected}"]
    for absent in ("unused-style", "<ignored-token>", "trained-as", "Clip skip"):
        assert absent not in parameters(out)


def test_embedding_vectors_reach_the_model(made):
    """The same prompts and seed without the embeddings loaded (their names then read as plain text) make
    another image, listing no TI hashes."""
    (_, with_them), (result, without) = made("embeddings"), made("no-embeddings")
    succeeded(result)
    assert "TI hashes" not in parameters(without)
    assert parameters(without).split("\n")[:2] == parameters(with_them).split("\n")[:2]
    assert not np.array_equal(pixels(without), pixels(with_them))


# ---- emphasis ---------------------------------------------------------------------------------------

def test_emphasis_changes_the_image_only_where_a_weight_is_not_1(made):
    for name in ("plain", "weighted", "unit-weights"):
        succeeded(made(name)[0])
    plain, weighted, unit = (made(name)[1] for name in ("plain", "weighted", "unit-weights"))
    assert parameters(weighted).split("\n")[0] == "a large (red:1.5) circle in the top left"  # stored as written
    assert not np.array_equal(pixels(weighted), pixels(plain))
    assert np.array_equal(pixels(unit), pixels(plain))
    assert "Clip skip" not in parameters(plain) and "Clip skip" not in parameters(unit)  # 1 is not written


# ---- clip skip and --from-png -----------------------------------------------------------------------

def test_clip_skip_is_stored_and_changes_the_image(made):
    (result, skipped), (_, base) = made("clip-skip-2"), made("embeddings")
    succeeded(result)
    line = settings_line(skipped)
    assert ", Model: tiny, Clip skip: 2, TI hashes: " in line
    assert parameters(skipped).replace(", Clip skip: 2", "") == parameters(base)  # nothing else differs
    assert not np.array_equal(pixels(skipped), pixels(base))


def test_from_png_with_clip_skip_and_embeddings_regenerates_bit_for_bit(made, files, checkpoint, tmp_path):
    first = made("clip-skip-2")[1]
    again = tmp_path / "again.png"
    result = succeeded(run_cli("--from-png", first, *embedding_flags(files, files.renamed), "--output", again,
                               checkpoint=checkpoint))
    assert result.stderr == ""
    assert parameters(again) == parameters(first)
    assert np.array_equal(pixels(again), pixels(first))


def test_from_png_refuses_when_an_embedding_it_names_is_not_loaded(made, files, checkpoint, tmp_path):
    first = made("clip-skip-2")[1]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cli("--from-png", first, *embedding_flags(files, None), "--output", out_dir / "image.png",
                     checkpoint=checkpoint)
    assert_refused(result.returncode, result.stdout, result.stderr, out_dir,
                   f"{first} was made with the embedding renamed-style (hash {short_hash(files.renamed)})",
                   "not loaded", "put its file in data/embeddings/", "--embedding PATH:renamed-style")


def test_from_png_with_another_file_under_the_name_notes_the_hash(made, files, checkpoint, tmp_path):
    """Another file (another hash) under the stored name is used, with a note; its vectors make another image."""
    first = made("clip-skip-2")[1]
    out = tmp_path / "retrained.png"
    result = succeeded(run_cli("--from-png", first, *embedding_flags(files, files.other), "--output", out,
                               checkpoint=checkpoint))
    old, new = short_hash(files.renamed), short_hash(files.other)
    assert old != new
    assert result.stderr == (f"note: {first} was made with the embedding renamed-style of hash {old}, {files.other} "
                             f"has hash {new}: the image will differ\n")
    assert parameters(out) == parameters(first).replace(f"renamed-style: {old}", f"renamed-style: {new}")
    assert not np.array_equal(pixels(out), pixels(first))


# ---- data/embeddings/ -------------------------------------------------------------------------------

def test_embeddings_folder_is_read_for_the_names_a_prompt_holds(tmp_path, monkeypatch, capsys, checkpoint, one_thread):
    """Files in data/embeddings/ are loaded when a prompt names them (in any case), others are not even
    read; --from-png finds them there again, and says where to put one that is gone."""
    folder = tmp_path / "embeddings"
    folder.mkdir()
    auto = a1111_pt(folder / "auto-style.pt", seed=6)
    negative = kohya_safetensors(folder / "neg-style.safetensors", seed=7)
    kohya_safetensors(folder / "idle-style.safetensors", seed=8)  # named by no prompt: not listed
    (folder / "broken-style.pt").write_bytes(b"")  # named by no prompt: never read, so never refused
    (folder / "notes.txt").write_text("auto-style")  # not an embedding file
    monkeypatch.setattr(run_demo, "EMBEDDINGS_DIR", folder)
    common = ["--no-progress", "--steps", "2", "--checkpoint", str(checkpoint)]
    out = tmp_path / "auto.png"
    assert run_demo.main([*common, "--prompt", "a circle, AUTO-STYLE", "--negative-prompt", "neg-style",
                          "--seed", "5", *SIZE, "--output", str(out)]) == 0
    assert capsys.readouterr().err == ""
    assert settings_line(out).endswith(f'TI hashes: "auto-style: {short_hash(auto)}, '
                                       f'neg-style: {short_hash(negative)}"')

    again = tmp_path / "again.png"
    assert run_demo.main([*common, "--from-png", str(out), "--output", str(again)]) == 0
    assert capsys.readouterr().err == ""
    assert np.array_equal(pixels(again), pixels(out)) and parameters(again) == parameters(out)

    explicit = kohya_pt(tmp_path / "explicit.pt", seed=9)  # --embedding under a folder file's name takes its place
    assert run_demo.main([*common, "--from-png", str(out), "--embedding", f"{explicit}:auto-style", "--output",
                          str(tmp_path / "explicit.png")]) == 0
    assert capsys.readouterr().err == (f"note: {out} was made with the embedding auto-style of hash {short_hash(auto)}, "
                                       f"{explicit} has hash {short_hash(explicit)}: the image will differ\n")
    assert f"auto-style: {short_hash(explicit)}" in settings_line(tmp_path / "explicit.png")

    auto_hash = short_hash(auto)
    auto.unlink()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    status = run_demo.main([*common, "--from-png", str(out), "--output", str(out_dir / "image.png")])
    captured = capsys.readouterr()
    assert_refused(status, captured.out, captured.err, out_dir,
                   f"{out} was made with the embedding auto-style (hash {auto_hash}), which is not loaded",
                   f"put its file in {folder}/")


def test_a_diffusers_file_in_the_embeddings_folder_is_named_after_the_file(tmp_path, monkeypatch, checkpoint, one_thread):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    toy = diffusers_file(folder / "toy-style.bin", "<cat-toy>", None, seed=9)
    monkeypatch.setattr(run_demo, "EMBEDDINGS_DIR", folder)
    out = tmp_path / "toy.png"
    assert run_demo.main(["--no-progress", "--steps", "1", "--checkpoint", str(checkpoint), "--prompt",
                          "a toy-style circle", *SIZE, "--output", str(out)]) == 0
    assert settings_line(out).endswith(f'TI hashes: "toy-style: {short_hash(toy)}"')


def test_the_embeddings_folder_matches_whole_names_only(tmp_path, monkeypatch, capsys, checkpoint, one_thread):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    a1111_pt(folder / "art.pt")
    monkeypatch.setattr(run_demo, "EMBEDDINGS_DIR", folder)
    out = tmp_path / "cartoon.png"
    assert run_demo.main(["--no-progress", "--steps", "1", "--checkpoint", str(checkpoint), "--prompt",
                          "a cartoon circle", *SIZE, "--output", str(out)]) == 0, capsys.readouterr().err
    assert "TI hashes" not in parameters(out)


def test_an_embedding_flag_takes_the_place_of_a_folder_file_in_any_case(tmp_path, monkeypatch, capsys, checkpoint,
                                                                        one_thread):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    a1111_pt(folder / "folder-style.pt")
    explicit = kohya_pt(tmp_path / "explicit.pt")
    monkeypatch.setattr(run_demo, "EMBEDDINGS_DIR", folder)
    out = tmp_path / "out.png"
    assert run_demo.main(["--no-progress", "--steps", "1", "--checkpoint", str(checkpoint), "--prompt",
                          "a folder-style circle", "--embedding", f"{explicit}:Folder-Style", *SIZE, "--output",
                          str(out)]) == 0, capsys.readouterr().err
    assert settings_line(out).endswith(f'TI hashes: "Folder-Style: {short_hash(explicit)}"')


def test_from_png_with_a_new_prompt_needs_not_the_old_embeddings(tmp_path, capsys, checkpoint, one_thread):
    style = a1111_pt(tmp_path / "old-style.pt")
    common = ["--no-progress", "--steps", "1", "--checkpoint", str(checkpoint)]
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert run_demo.main([*common, "--prompt", "a circle, old-style", "--embedding", str(style), *SIZE, "--output",
                          str(first)]) == 0
    assert run_demo.main([*common, "--from-png", str(first), "--prompt", "a circle", "--output",
                          str(again)]) == 0, capsys.readouterr().err
    assert "TI hashes" not in parameters(again)


# ---- refusals ---------------------------------------------------------------------------------------

def bad_files(folder: Path) -> dict[str, Path]:
    """Embedding files that must be refused, by case name."""
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    (folder / "empty-style.pt").write_bytes(b"")
    kohya_safetensors(folder / "cut-style.safetensors", n=8)
    data = (folder / "cut-style.safetensors").read_bytes()
    (folder / "cut-style.safetensors").write_bytes(data[: len(data) // 2])
    torch.save({"epoch": 3, "note": "not an embedding"}, folder / "nokeys-style.pt")
    return {
        "empty": folder / "empty-style.pt",
        "truncated": folder / "cut-style.safetensors",
        "no_keys": folder / "nokeys-style.pt",
        "wide": a1111_pt(folder / "wide-style.pt", width=768),
        "vocabulary_word": a1111_pt(folder / "cat.pt"),
        "first": a1111_pt(folder / "a" / "twin-style.pt", seed=1),
        "second": a1111_pt(folder / "b" / "twin-style.pt", seed=2),
    }


LONG = "a large red circle " * 500  # 2000 tokens, 27 chunks of 75
REFUSALS = {  # name: (arguments, fragments of the message); {name} is a path of bad_files, {tmp} the folder
    "weight_not_a_number": (["--prompt", "(x:1..2)"], ["--prompt has (...:1..2), whose weight '1..2' is not a number",
                                                       "(text:1.2)"]),
    "weight_beyond_the_bound": (["--prompt", "(x:1000)"], ["--prompt gives 'x' the weight 1000, beyond +-100"]),
    "negative_weight_not_a_number": (["--prompt", "x", "--negative-prompt", "(x:1.2.3)"],
                                     ["--negative-prompt has (...:1.2.3), whose weight '1.2.3' is not a number"]),
    "prompt_too_long": (["--prompt", LONG], ["--prompt is 2000 tokens long in 27 chunks of 75",
                                             "at most 16 chunks", "shorten it"]),
    "negative_prompt_too_long": (["--prompt", "x", "--negative-prompt", LONG], ["--negative-prompt is 2000 tokens"]),
    "clip_skip_0": (["--prompt", "x", "--clip-skip", "0"], ["--clip-skip must be a whole number of at least 1 (and at most 48), got 0"]),
    "clip_skip_above_layers": (["--prompt", "x", "--clip-skip", str(LAYERS + 1)],
                               [f"--clip-skip must be a whole number between 1 and {LAYERS}, the text encoder's "
                                f"layers, got {LAYERS + 1}"]),
    "clip_skip_not_a_number": (["--prompt", "x", "--clip-skip", "two"], ["argument --clip-skip: invalid int value"]),
    "empty_file": (["--prompt", "x", "--embedding", "{empty}"], ["{empty} is truncated or corrupt"]),
    "truncated_safetensors": (["--prompt", "x", "--embedding", "{truncated}"],
                              ["{truncated} is not a readable .safetensors file"]),
    "no_embedding_keys": (["--prompt", "x", "--embedding", "{no_keys}"],
                          ["{no_keys} is not a textual-inversion embedding", "'epoch', 'note'"]),
    "wrong_width": (["--prompt", "x", "--embedding", "{wide}"],
                    ["{wide} is an embedding of width 768 (for SD v1)", f"text encoder is {WIDTH} wide"]),
    "vocabulary_word": (["--prompt", "a cat", "--embedding", "{vocabulary_word}"],
                        ["the embedding name 'cat' of {vocabulary_word} is a word of CLIP's vocabulary",
                         "another name, e.g. <cat>"]),
    "vocabulary_word_as_name": (["--prompt", "x", "--embedding", "{first}:dog"], ["the embedding name 'dog' of"]),
    "same_name_twice": (["--prompt", "x", "--embedding", "{first}", "--embedding", "{second}"],
                        ["the embedding name 'twin-style' of {second} reads as 'twin-style' of {first}, already loaded"]),
    "same_name_in_other_case": (["--prompt", "x", "--embedding", "{first}:<Twin>", "--embedding", "{second}:<twin>"],
                                ["the embedding name '<twin>' of {second} reads as '<Twin>' of {first}"]),
    "name_with_a_space": (["--prompt", "x", "--embedding", "{first}:my style"], ["'my style'", "spaces"]),
    "missing_file": (["--prompt", "x", "--embedding", "{tmp}/nowhere.pt"],
                     ["embedding file not found: {tmp}/nowhere.pt"]),
    "missing_file_with_a_name": (["--prompt", "x", "--embedding", "{tmp}/nowhere.pt:<n-style>"],
                                 ["embedding file not found: {tmp}/nowhere.pt;"]),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refused(tmp_path, checkpoint, capsys, name, one_thread):
    args, fragments = REFUSALS[name]
    fill = {**bad_files(tmp_path), "tmp": tmp_path}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    status = run_demo.main(["--no-progress", "--steps", "2", "--checkpoint", str(checkpoint), *SIZE, "--output",
                            str(out_dir / "image.png"), *(a.format(**fill) for a in args)])
    captured = capsys.readouterr()
    assert_refused(status, captured.out, captured.err, out_dir, *(f.format(**fill) for f in fragments))


def test_a_malicious_embedding_runs_no_code(tmp_path, checkpoint):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil-style.pt"
    torch.save({"string_to_param": {"*": attacks(marker)[SYSTEM]}, "name": "evil-style"}, path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cli("--prompt", "evil-style", "--embedding", path, *SIZE, "--output", out_dir / "image.png",
                     checkpoint=checkpoint)
    assert_refused(result.returncode, result.stdout, result.stderr, out_dir, f"refusing to load {path}",
                   f"calls {SYSTEM}")
    assert not marker.exists()
