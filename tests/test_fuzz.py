"""Fuzzing the readers of untrusted files: checkpoints (.safetensors headers and offsets, zip and legacy
pickle .ckpt files through the restricted unpickler), LoRAs and embeddings, and the "parameters" of PNGs. Seeded random and
mutation-based inputs; each must give a result (weights, a loaded model, settings) or the project's
own error, never another exception, and reading files of a few hundred kB never raises the process's
peak memory by more than 512 MB."""

import json
import random
import resource
import struct
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin

import run_demo
from sd.checkpoint import load_checkpoint, read_state_dict
from sd.embeddings import read_embedding
from sd.lora import lora_targets
from sd.errors import SDError
from sd.families import SD1
from sd.flags import Flags, settle_flags
from sd.parameters import parse_parameters
from sd.settings import model_traits
from tests.tiny import save_checkpoint, tiny_compvis_state
from weights_converter import __main__ as converter

CASES = 1500  # per kind of file: 6000 files in all, about 20 s


def flip(data: bytes, rng: random.Random) -> bytes:
    """One random mutation of the bytes: flipped bits, a cut, inserted bytes or a span of one byte value."""
    data, at = bytearray(data), rng.randrange(len(data))
    kind = rng.randrange(4)
    if kind == 0:
        for i in rng.sample(range(len(data)), rng.randint(1, 8)):
            data[i] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del data[at:]
    elif kind == 2:
        data[at:at] = rng.randbytes(rng.randint(1, 16))
    else:
        data[at:at + rng.randint(1, 64)] = bytes([rng.choice((0, 0x7F, 0x80, 0xFF))]) * rng.randint(1, 64)
    return bytes(data)


def edit_safetensors_header(data: bytes, rng: random.Random) -> bytes:
    """A valid safetensors container whose JSON header lies about one tensor: its offsets, shape or dtype."""
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    key = rng.choice([k for k in header if k != "__metadata__"])
    field = rng.choice(["data_offsets", "shape", "dtype"])
    wild = [0, 1, -1, 2**31, 2**63, 2**64 + 5, len(data), "x", None, [], 1.5]
    if field == "data_offsets":
        header[key][field] = [rng.choice(wild), rng.choice(wild)]
    elif field == "shape":
        header[key][field] = [rng.choice(wild) for _ in range(rng.randint(0, 5))]
    else:
        header[key][field] = rng.choice(["F16", "I64", "BOOL", "F8_E4M3", "C64", "??", 7])
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + length:]


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    """Small checkpoint files of each format: 40 tensors of the tiny model (the readers need no whole model)."""
    folder = tmp_path_factory.mktemp("originals")
    state = dict(list(tiny_compvis_state().items())[:40])
    files = {"safetensors": save_checkpoint(state, folder / "t.safetensors"),
             "zip": save_checkpoint(state, folder / "t.ckpt")}
    torch.save({"state_dict": state, "epoch": 1}, folder / "legacy.ckpt", _use_new_zipfile_serialization=False)
    files["legacy"] = folder / "legacy.ckpt"
    return {kind: path.read_bytes() for kind, path in files.items()}


def read_or_refuse(path) -> dict | None:
    """The file's weights, or None when it is refused with the project's own error."""
    try:
        state = read_state_dict(path)
    except SDError as e:
        assert "\n" not in str(e), str(e)
        return None
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    return state


@pytest.mark.parametrize("kind", ["safetensors", "zip", "legacy"])
def test_mutated_checkpoints_are_read_or_refused(tmp_path, originals, kind):
    rng = random.Random(f"fuzz-{kind}")
    suffix = ".safetensors" if kind == "safetensors" else ".ckpt"
    read, peak = 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB
    for case in range(CASES):
        data, flips = originals[kind], rng.randint(1, 3)
        if kind == "safetensors" and rng.random() < 0.5:  # a header that lies, then maybe some flipped bytes
            data, flips = edit_safetensors_header(data, rng), rng.randint(0, 1)
        for _ in range(flips):
            data = flip(data, rng)
        path = tmp_path / f"case{suffix}"
        path.write_bytes(data)
        read += read_or_refuse(path) is not None
    assert 0 < read < CASES  # both outcomes happen: the mutations are neither all harmless nor all fatal
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grown < 512 * 1024, f"reading files of {len(originals[kind])} bytes raised the peak memory by {grown} kB"


FILE_CASES = 600  # per kind of LoRA or embedding file


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from sd.pipeline import StableDiffusion
    from tests.tiny import write_tiny_checkpoint
    return StableDiffusion.from_checkpoint(write_tiny_checkpoint(tmp_path_factory.mktemp("sd") / "t.safetensors"))


def small_files(folder, sd) -> dict[str, Path]:
    """A LoRA of four layers (kohya's layout, .safetensors and .pt) and an embedding (AUTOMATIC1111's .pt,
    kohya's .safetensors)."""
    from safetensors.torch import save_file
    gen, lora = torch.Generator().manual_seed(0), {}
    for name, module in [(n, m) for n, m in lora_targets(sd.models).items() if n.startswith("lora_unet_")][:4]:
        w = module.weight
        lora.update({f"{name}.lora_down.weight": torch.randn(2, *w.shape[1:], generator=gen) * 0.1,
                     f"{name}.lora_up.weight": torch.randn(w.shape[0], 2, *(1,) * (w.dim() - 2), generator=gen) * 0.1,
                     f"{name}.alpha": torch.tensor(1.0)})
    vectors = torch.randn(2, 64, generator=gen)
    save_file(lora, folder / "lora.safetensors")
    torch.save(lora, folder / "lora.pt")
    torch.save({"string_to_param": {"*": vectors}, "name": "x"}, folder / "emb.pt")
    save_file({"emb_params": vectors}, folder / "emb.safetensors")
    return {kind: folder / kind for kind in ("lora.safetensors", "lora.pt", "emb.pt", "emb.safetensors")}


@pytest.mark.parametrize("kind", ["lora.safetensors", "lora.pt", "emb.pt", "emb.safetensors"])
def test_mutated_loras_and_embeddings_load_or_are_refused(tmp_path, tiny_sd, kind):
    """Each mutation loads (and unloads) or is refused with the project's error, the model then unchanged."""
    original = small_files(tmp_path, tiny_sd)[kind].read_bytes()
    rng = random.Random(f"fuzz-{kind}")
    layers = [m for n, m in lora_targets(tiny_sd.models).items() if n.startswith("lora_unet_")][:4]
    before = [m.weight.clone() for m in layers]  # those the file changes
    loaded, peak = 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for case in range(FILE_CASES):
        data = original
        if kind.endswith(".safetensors") and rng.random() < 0.5:
            data = edit_safetensors_header(data, rng)
        for _ in range(rng.randint(0, 2) if data is not original else rng.randint(1, 3)):
            data = flip(data, rng)
        path = tmp_path / f"case{case % 2}{Path(kind).suffix}"
        path.write_bytes(data)
        try:
            if kind.startswith("lora"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tiny_sd.load_lora(path)
                tiny_sd.unload_lora()
            else:
                assert torch.isfinite(read_embedding(path).vectors).all()
            loaded += 1
        except SDError as e:
            assert "\n" not in str(e), str(e)
        assert all(torch.equal(w, m.weight) for w, m in zip(before, layers)), case
    assert 0 < loaded < FILE_CASES
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grown < 512 * 1024, f"reading files of {len(original)} bytes raised the peak memory by {grown} kB"


def degenerate_states(rng: random.Random):
    """Readable checkpoints whose content is wrong: keys that are not strings, tensors of no size, another
    rank or dtype, meta, sparse, or holding NaN."""
    base = tiny_compvis_state()
    for _ in range(24):
        state = dict(base)
        key = rng.choice(list(state))
        tensor = state[key]
        state[key] = rng.choice([torch.empty(0), torch.tensor(1.0), tensor.flatten(), tensor[None],
                                 tensor.to(torch.int64), tensor.to(torch.complex64), torch.empty(tensor.shape,
                                 device="meta"), tensor.reshape(tensor.shape[0], -1).to_sparse() if tensor.dim() > 1
                                 else tensor.to_sparse(), torch.full(tensor.shape, float("nan"))])
        if rng.random() < 0.2:
            state[rng.randrange(100)] = torch.zeros(1)
        yield state


def test_degenerate_tensors_load_or_are_refused(tmp_path, capsys):
    """By the library, and by the converter: converted, or one line and status 2."""
    rng = random.Random("degenerate")
    for i, state in enumerate(degenerate_states(rng)):
        path = tmp_path / f"case{i}.ckpt"
        torch.save({"state_dict": state}, path)
        try:
            load_checkpoint(path)
        except SDError as e:
            assert "\n" not in str(e), str(e)
        status = converter.main([str(path), str(tmp_path / f"case{i}.safetensors")])
        err = capsys.readouterr().err
        assert status == 0 or (status == 2 and err.startswith("error: ") and err.count("\n") == 1), (status, err)


PARAMETERS_ALPHABET = 'abc019 .,:-x"\\\nNegative prompt: Steps Size Seed Sampler CFG scale Init image Mask Model hash'


def test_mutated_png_parameters_are_read_or_refused(tmp_path):
    rng = random.Random("png")
    alphabet = PARAMETERS_ALPHABET
    valid = ('a cat\nNegative prompt: dogs\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 5, '
             'Size: 64x48, Model hash: 0123456789, Model: tiny, Denoising strength: 0.5, Init image: "a, b.png"')
    for case in range(CASES):
        text = list(valid)
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(text) + 1)
            text[at:at + rng.randint(0, 3)] = rng.choices(alphabet, k=rng.randint(0, 4))
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", "".join(text))
        png = tmp_path / "case.png"
        Image.new("RGB", (8, 8)).save(png, pnginfo=info)
        args = run_demo.parse_args(["--from-png", str(png)])
        try:
            flags = settle_flags(args, run_demo.read_parameters(png), model_traits(SD1, 64), run_demo.LORA_DIR)
        except SDError as e:
            assert "\n" not in str(e), str(e)
        else:
            assert isinstance(flags, Flags) and flags.steps >= 1 and flags.width % 8 == 0


def test_long_random_parameters_are_read_in_time(tmp_path):
    """The settings parser on long settings lines (20 kB to 400 kB) that repeat a random piece of the same alphabet: a
    result or the project's error, each in time linear in its length (a bound far above it: the quadratic
    parser took minutes on 200 kB)."""
    rng = random.Random("long parameters")
    for case in range(30):
        piece = "".join(rng.choices(PARAMETERS_ALPHABET.replace("\n", ""), k=rng.randint(1, 30)))  # one line
        text = piece * (rng.randint(20_000, 400_000) // len(piece))
        start = time.perf_counter()
        try:
            parse_parameters(text, tmp_path)
        except (SDError, ValueError) as e:  # ValueError: what run_demo.read_parameters turns into one line
            assert "\n" not in str(e), str(e)
        assert time.perf_counter() - start < 5.0, (case, piece, len(text))
