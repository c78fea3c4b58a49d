"""The path policy (`sd.paths`) over whole families of hostile names: a <lora:NAME> tag (typed or from a PNG) and
a PNG's Model name files inside their folder only; --lora PATH may be any path but its name must fit a tag; a
dataset reads nothing from outside its folder; every reader refuses an unreadable file in one line; outputs,
temporary files and the hash cache never write through a planted link or over a user's file. Refusals run in
process and stop before any model is loaded."""

import hashlib
import os
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

import run_demo
from sd.datasets import CaptionFolder
from sd.errors import InputError
from sd.files import write_atomically
from sd.flags import resolve_loras
from sd.hashing import file_sha256
from sd.parameters import format_parameters, parse_parameters
from tests.test_cli_errors import png_header
from tests.tiny import write_tiny_checkpoint

LONG = "x" * 300  # longer than a file name may be


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.safetensors")


@pytest.fixture
def place(tmp_path) -> Path:
    """tmp/lora/ (the LoRA folder, with style.safetensors, sub/deep.safetensors and a link to it), tmp/outside/
    (x.safetensors and a link from the folder to it), tmp/out/ (the output folder, to stay empty)."""
    lora, outside = tmp_path / "lora", tmp_path / "outside"
    for folder in (lora / "sub", outside, tmp_path / "out"):
        folder.mkdir(parents=True)
    for path in (lora / "style.safetensors", lora / "sub" / "deep.safetensors", outside / "x.safetensors",
                 lora / " spaced .safetensors", lora / "ü&;$.safetensors"):
        path.write_bytes(b"lora")
    (lora / "inner.safetensors").symlink_to(lora / "sub" / "deep.safetensors")
    (lora / "escape.safetensors").symlink_to(outside / "x.safetensors")
    (lora / "dir.safetensors").mkdir()
    return tmp_path


def one_line(capsys, status: int, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ---- <lora:NAME> tags name files in the LoRA folder only ---------------------------------------------

TAGS = {  # name in the tag: a fragment of the refusal, or None where it is found (the file it is)
    "../outside/x": "not a file name in", "../../x": "not a file name in", "..": "not a file name in",
    ".": "not a file name in", "{tmp}/outside/x": "not a file name in", "sub/deep": "not a file name in",
    "sub\\deep": "not a file name in", "..\\outside\\x": "not a file name in", " ": "not a file name in",
    "escape": "escape.safetensors", "dir": "is a folder", LONG: "there is no", "nowhere": "there is no",
    "style": "style.safetensors", "STYLE": "there is no", "inner": "inner.safetensors",
    " spaced ": " spaced .safetensors", "ü&;$": "ü&;$.safetensors",
}


@pytest.mark.parametrize("name", list(TAGS))
def test_a_tag_names_a_file_in_the_folder_only(place, name):
    name = name.format(tmp=place)
    fragment = TAGS.get(name, TAGS.get("{tmp}/outside/x"))
    if fragment.endswith(".safetensors"):
        _, [(path, weight)] = resolve_loras(f"a cat <lora:{name}:0.5>", [], place / "lora")
        assert path == place / "lora" / fragment and weight == 0.5  # a link the user put there: followed
    else:
        with pytest.raises(InputError, match=None) as info:
            resolve_loras(f"a cat <lora:{name}:0.5>", [], place / "lora")
        assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["../outside/x", "{tmp}/outside/x", "..\\outside\\x"])
def test_a_png_s_tag_cannot_reach_outside_either(place, checkpoint, monkeypatch, capsys, name):
    """The same tags from a PNG's parameters through --from-png: refused before any model is loaded."""
    monkeypatch.setattr(run_demo, "LORA_DIR", place / "lora")
    png = place / "made.png"
    text = f"a cat <lora:{name.format(tmp=place)}:1>\nSteps: 2, Sampler: ddim, CFG scale: 7, Seed: 1, Size: 64x64"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 64)).save(png, pnginfo=info)
    status = run_demo.main(["--no-progress", "--from-png", str(png), "--checkpoint", str(checkpoint), "--output",
                            str(place / "out" / "image.png")])
    one_line(capsys, status, "<lora:", "--lora PATH")
    assert os.listdir(place / "out") == []


@pytest.mark.parametrize("model", ["../../elsewhere/model", "/abs/model", "..", "a\\..\\b", "sub/model", " "])
def test_a_png_s_model_is_a_file_name_in_the_data_folder(model):
    with pytest.raises(InputError, match="--from-png names .* which is not a file name in .*--checkpoint PATH"):
        run_demo.default_checkpoint(model)


# ---- --lora PATH: any path, a name that fits a tag ---------------------------------------------------

LORA_FLAGS = {  # file names: None where accepted, else a fragment of the refusal
    "my:style.safetensors": "rename the file", "a>b.safetensors": "rename the file",
    "a<b.safetensors": "rename the file", "line\nbreak.safetensors": "rename the file",
    "back\\slash.safetensors": None, "back\\s.safetensors": None, " spaces .safetensors": None, "ü.safetensors": None,
    "a&b;c$.safetensors": None, "dir.safetensors": "is a folder", "missing.safetensors": "not found",
    f"{LONG}.safetensors": "File name too long",
}


@pytest.mark.parametrize("name", list(LORA_FLAGS))
def test_a_lora_flag_is_any_path_with_a_name_a_tag_can_hold(place, name):
    path = place / "outside" / name
    if name == "dir.safetensors":
        path.mkdir()
    elif LORA_FLAGS[name] in (None, "rename the file"):
        path.write_bytes(b"lora")
    stem = name.removesuffix(".safetensors")
    prompt = f"a cat <lora:{stem}:1>"  # as --from-png gives it; --lora sets its weight
    if LORA_FLAGS[name] is None:
        prompt, [(found, weight)] = resolve_loras(prompt, [f"{path}:0.5"], place / "lora")
        assert (found, weight) == (path, 0.5) and prompt == f"a cat <lora:{stem}:0.5>"
    else:
        with pytest.raises(InputError) as info:
            resolve_loras(prompt, [str(path)], place / "lora")
        assert LORA_FLAGS[name] in str(info.value)


def test_two_lora_files_of_one_name_are_refused_and_one_file_twice_is_not(place):
    first, second = place / "outside" / "x.safetensors", place / "lora" / "sub" / "X.safetensors"
    second.write_bytes(b"lora")
    with pytest.raises(InputError, match="would both be <lora:X> in the prompt; rename one"):
        resolve_loras("a cat", [str(first), str(second)], place / "lora")
    prompt, loras = resolve_loras("a cat", [str(first), f"{first}:0.3"], place / "lora")
    assert prompt == "a cat <lora:x:0.3>" and loras == [(first, 0.3)]


# ---- every reader: an unreadable file is one line --------------------------------------------------

READERS = {  # the reader's flags, {bad} the file made unreadable
    "checkpoint": ["--prompt", "a cat", "--checkpoint", "{bad}"],
    "lora": ["--prompt", "a cat", "--lora", "{bad}"],
    "lora_tag": ["--prompt", "a cat <lora:bad:1>"],
    "embedding": ["--prompt", "a cat", "--embedding", "{bad}"],
    "image": ["--prompt", "a cat", "--image", "{bad}"],
    "mask": ["--prompt", "a cat", "--image", "{image}", "--mask", "{bad}"],
    "from_png": ["--from-png", "{bad}"],
}


@pytest.fixture
def unreadable(monkeypatch):
    """Make files unreadable: chmod 000 where that denies reading, else (as root) an open that says so."""
    import sd.paths

    denied = set()

    def denying_open(path, *args, **kwargs):
        if Path(path) in denied:
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    if os.geteuid() == 0:
        monkeypatch.setattr(sd.paths, "open", denying_open, raising=False)

    def make(path: Path) -> Path:
        path.chmod(0)
        denied.add(path)
        return path

    yield make
    for path in denied:
        path.chmod(0o644)


@pytest.mark.parametrize("reader", list(READERS))
def test_an_unreadable_file_is_one_line_for_every_reader(place, checkpoint, monkeypatch, capsys, unreadable,
                                                         reader):
    monkeypatch.setattr(run_demo, "LORA_DIR", place / "lora")
    bad = place / "lora" / "bad.safetensors"
    bad.write_bytes(checkpoint.read_bytes())
    image = place / "image.png"
    Image.new("RGB", (64, 64)).save(image)
    fill = {"bad": unreadable(bad), "image": image}
    args = [a.format(**fill) for a in READERS[reader]]
    if reader != "checkpoint":
        args += ["--checkpoint", str(checkpoint)]
    status = run_demo.main(["--no-progress", "--output", str(place / "out" / "image.png"), *args])
    one_line(capsys, status, str(bad), "permission denied", "chmod")
    assert os.listdir(place / "out") == []


# ---- the dataset reads nothing from outside its folder -----------------------------------------------

DATASETS = {  # what the image's caption (or the image) is: a fragment of the refusal, or None where it is read
    "caption_link_out": "is a link to", "image_link_out": "is a link to", "caption_link_in": None,
    "image_link_in": None, "caption_folder": "is a folder", "caption_unreadable": "permission denied",
    "image_unreadable": "permission denied", "spaces": None, "non_utf8": None, "backslash_colon": None,
}


@pytest.mark.parametrize("case", list(DATASETS))
def test_a_dataset_reads_nothing_from_outside_its_folder(tmp_path, unreadable, case):
    data, outside = tmp_path / "set", tmp_path / "outside"
    data.mkdir()
    (data / "keep").mkdir()
    outside.mkdir()
    name = {"spaces": " a b ", "non_utf8": os.fsdecode(b"caf\xe9"), "backslash_colon": "a\\b:c"}.get(case, "one")
    image, caption = data / f"{name}.png", data / f"{name}.txt"
    (outside / "secret.txt").write_text("a secret caption")
    Image.new("RGB", (16, 16)).save(outside / "secret.png")
    Image.new("RGB", (16, 16)).save(data / "keep" / "kept.png")
    (data / "keep" / "kept.txt").write_text("a kept caption")
    {"image_link_out": lambda: image.symlink_to(outside / "secret.png"),
     "image_link_in": lambda: image.symlink_to(data / "keep" / "kept.png")}.get(
        case, lambda: Image.new("RGB", (16, 16)).save(image))()
    {"caption_link_out": lambda: caption.symlink_to(outside / "secret.txt"),
     "caption_link_in": lambda: caption.symlink_to(data / "keep" / "kept.txt"),
     "caption_folder": caption.mkdir}.get(case, lambda: caption.write_text("a red circle"))()
    if case.endswith("unreadable"):
        unreadable(image if case.startswith("image") else caption)
    if DATASETS[case] is None:
        captions = CaptionFolder(data, image_size=8).captions
        assert captions in (["a red circle"], ["a kept caption"]) and "a secret caption" not in captions
    else:
        with pytest.raises(InputError) as info:
            CaptionFolder(data, image_size=8)
        assert DATASETS[case] in str(info.value)


# ---- writing: no planted link is followed, no user's file replaced --------------------------------------

def test_a_link_planted_beside_the_output_is_never_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "image.png"
    planted = {tmp_path / f".{out.name}.{os.getpid()}.part", tmp_path / f".{out.name}.part"}
    for link in planted:
        link.symlink_to(victim)
    write_atomically(out, lambda tmp: tmp.write_bytes(b"new"))
    (tmp_path / "link.png").symlink_to(victim)  # the output name itself a link: replaced, not written through
    write_atomically(tmp_path / "link.png", lambda tmp: tmp.write_bytes(b"new"))
    assert victim.read_text() == "precious" and out.read_bytes() == b"new"
    assert not (tmp_path / "link.png").is_symlink() and set(tmp_path.glob(".*.part")) == planted
    with pytest.raises(FileExistsError):
        write_atomically(out, lambda tmp: tmp.write_bytes(b"other"), overwrite=False)
    assert out.read_bytes() == b"new"


SIDECARS = {  # a NAME.sha256 that was there before: never changed, and trusted only where current and ours
    "bsd_format": "SHA256 (model.safetensors) = {digest}\n", "bare_hex": "{digest}\n",
    "upper_case": "{upper}  model.safetensors\n", "other_file": "{wrong}  other.safetensors\n",
    "stale_ours": "{wrong}  model.safetensors\n", "empty": "", "garbage": "\x00\xff not a hash",
    "huge": "{wrong}  model.safetensors\n" + "#" * 100_000,
}


@pytest.mark.parametrize("case", [*SIDECARS, "folder", "link"])
def test_the_hash_cache_never_replaces_a_user_s_file(tmp_path, case):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    sidecar = tmp_path / "model.safetensors.sha256"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    if case == "folder":
        sidecar.mkdir()
    elif case == "link":
        sidecar.symlink_to(victim)
    else:
        sidecar.write_text(SIDECARS[case].format(digest=digest, upper=digest.upper(), wrong="ab" * 32))
        if case == "stale_ours":
            os.utime(sidecar, ns=(0, 0))
    before = None if case == "folder" else sidecar.read_bytes()
    assert file_sha256(model, cache=True) == digest
    assert victim.read_text() == "precious"
    assert case == "folder" and sidecar.is_dir() or sidecar.read_bytes() == before
    sidecar.unlink() if case != "folder" else sidecar.rmdir()
    assert file_sha256(model, cache=True) == digest and sidecar.read_text() == f"{digest}  model.safetensors\n"


# ---- outputs, path flags and --from-png --------------------------------------------------------------

OUTPUTS = {  # --output: a fragment of the refusal
    "{tmp}/no/such/image.png": "output folder {tmp}/no/such does not exist", "{tmp}": "is a folder",
    "{tmp}/dir.png": "is a folder", "{tmp}/image.jpg": "must end in .png",
    f"{{tmp}}/{LONG}.png": "File name too long", "{tmp}/" + os.fsdecode(b"\xff.png"): "is not valid UTF-8",
}


@pytest.mark.parametrize("output", list(OUTPUTS))
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, checkpoint, capsys, output):
    (tmp_path / "dir.png").mkdir()
    status = run_demo.main(["--no-progress", "--prompt", "a cat", "--checkpoint", str(checkpoint), "--output",
                            output.format(tmp=tmp_path)])
    one_line(capsys, status, OUTPUTS[output].format(tmp=tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["dir.png"]


PATH_FLAGS = {  # flag: a fragment of the refusal for a path whose bytes are not UTF-8
    "--checkpoint": "--checkpoint", "--image": "--image", "--lora": "--lora", "--embedding": "--embedding",
    "--from-png": "--from-png",
}


@pytest.mark.parametrize("flag", list(PATH_FLAGS))
def test_a_path_that_is_not_utf8_is_one_line(tmp_path, checkpoint, capsys, flag):
    bad = tmp_path / os.fsdecode(b"caf\xe9.png")
    bad.write_bytes(checkpoint.read_bytes())
    args = {"--checkpoint": [flag, str(bad), "--prompt", "a cat"], "--from-png": [flag, str(bad)]}.get(
        flag, ["--prompt", "a cat", flag, str(bad)])
    status = run_demo.main(["--no-progress", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "o.png"),
                            *args])
    err = one_line(capsys, status, PATH_FLAGS[flag], "caf\\udce9", "not valid UTF-8")
    err.encode("utf-8")  # printable as it is
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("size", [(30_000, 30_000), (200_000, 1_000)])
def test_a_png_claiming_a_huge_size_is_one_line(tmp_path, checkpoint, capsys, size):
    png = tmp_path / "bomb.png"
    png.write_bytes(png_header(*size))
    status = run_demo.main(["--no-progress", "--from-png", str(png), "--checkpoint", str(checkpoint), "--output",
                            str(tmp_path / "o.png")])
    one_line(capsys, status, f"--from-png {png}")


@pytest.mark.parametrize("name", [" starts.png", "ends .png", "  both  .png", "a,b.png", "a: b.png", 'a"b.png',
                                  "ü.png", "a\\b.png", "../up.png", "sub/x.png"])
def test_init_image_names_come_back_through_the_parameters(tmp_path, name):
    values = {"prompt": "a cat", "negative_prompt": "", "steps": 2, "sampler": "ddim", "guidance_scale": 7.0,
              "seed": 1, "width": 64, "height": 64, "model_hash": "0", "model": "m", "strength": 0.5,
              "image": tmp_path / name, "mask": tmp_path / name, "clip_skip": 1, "ti_hashes": {},
              "lora_hashes": {}, "tiled_decode": False}
    found = parse_parameters(format_parameters(values, tmp_path), tmp_path)
    assert found["image"] == found["mask"] == Path(os.path.normpath(tmp_path / name))


@pytest.mark.parametrize("weight", ["101", "-1000", "99999999999999999999999999999"])
def test_a_tag_weight_beyond_the_range_is_refused(place, weight):
    with pytest.raises(InputError, match="whose weight must be between -100 and 100"):
        resolve_loras(f"a cat <lora:style:{weight}>", [], place / "lora")
