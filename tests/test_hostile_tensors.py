"""Hostile tensors in every file reader, by family (`sd.tensor_checks`): each degenerate or absurd tensor
(no values, another rank or dtype, meta, sparse, complex, NaN, inf, huge) put in a checkpoint, a LoRA and an
embedding is refused in one line naming the file and the key, the model unchanged; LoRA alphas and pairs of
impossible shapes, merges that would overflow, views larger than their file, odd embedding objects and
path or name arguments that are no path or name alike."""

import re
from pathlib import Path

import pytest
import torch

from sd.checkpoint import load_checkpoint, read_state_dict
from sd.embeddings import Embedding, read_embedding
from sd.errors import CheckpointError, InputError, UnsafeCheckpointError
from sd.lora import lora_targets
from sd.pipeline import StableDiffusion
from tests.bad_files import save_state, tiny_state
from tests.tiny import UNET_PREFIX, write_tiny_checkpoint
from weights_converter import __main__ as converter

# name: (a tensor of `shape` made hostile, a word of the refusal)
HOSTILE = {
    "zero_size": (lambda shape: torch.zeros(0, *shape[1:]), "which holds no weights"),
    "0-d": (lambda shape: torch.tensor(0.5), "0-d"),
    "int64": (lambda shape: torch.ones(shape, dtype=torch.int64), "int64 numbers"),
    "bool": (lambda shape: torch.ones(shape, dtype=torch.bool), "bool numbers"),
    "complex": (lambda shape: torch.ones(shape, dtype=torch.complex64), "complex"),
    "meta": (lambda shape: torch.empty(shape, device="meta"), "meta device"),
    "sparse": (lambda shape: torch.ones(shape).to_sparse(), "sparse_coo tensor"),
    "nan": (lambda shape: torch.full(shape, float("nan")), "NaN"),
    "inf": (lambda shape: torch.full(shape, float("inf")), "inf"),
    "-inf": (lambda shape: torch.full(shape, -float("inf")), "inf"),
    "1e30": (lambda shape: torch.full(shape, 1e30), "as large as 1e+30"),
    "-1e308": (lambda shape: torch.full(shape, -1e308, dtype=torch.float64), "as large as 1e+308"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return StableDiffusion.from_checkpoint(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "t.safetensors"))


def weights_of(sd: StableDiffusion) -> dict[str, torch.Tensor]:
    return {f"{net}.{k}": v.clone() for net in ("unet", "clip") for k, v in getattr(sd.models, net).state_dict().items()}


def assert_unchanged(sd: StableDiffusion, before: dict[str, torch.Tensor]) -> None:
    after = weights_of(sd)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---- checkpoints ------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", [UNET_PREFIX + "out.2.weight", UNET_PREFIX + "input_blocks.1.0.in_layers.2.bias"],
                         ids=["read_for_config", "plain"])
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_checkpoint_tensor_is_refused(tmp_path, kind, key, capsys):
    make, word = HOSTILE[kind]
    path = save_state(tmp_path / "model.ckpt", tiny_state(**{key: make(tiny_state()[key].shape)}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and word in message and "\n" not in message, message
    assert key in message or kind in ("meta", "sparse", "complex")  # those are refused by key as read
    assert converter.main([str(path), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and word in err, err
    assert not (tmp_path / "out.safetensors").exists()


def test_a_zero_stride_view_larger_than_its_file_is_refused_before_it_is_built(tmp_path):
    key = UNET_PREFIX + "out.2.weight"
    view = torch.zeros(1).as_strided((20000, 20000), (0, 0))  # 4 stored bytes, 1.6 GB as a weight
    for legacy in (False, True):
        path = tmp_path / f"view{legacy}.ckpt"
        torch.save({"state_dict": {key: view}}, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(UnsafeCheckpointError, match=r"shape \(20000, 20000\) .* more than its \d+ bytes"):
            read_state_dict(path)


def test_a_small_view_of_a_file_is_read(tmp_path):
    """A stride-0 view no larger than the file is harmless, and reads as what was saved."""
    view = torch.arange(4.0).as_strided((3, 4), (0, 1))
    path = tmp_path / "view.ckpt"
    torch.save({"x": view, "pad": torch.zeros(16)}, path)
    assert torch.equal(read_state_dict(path)["x"], view)


# ---- LoRAs ------------------------------------------------------------------------------------------

def linear_layer(sd: StableDiffusion) -> tuple[str, torch.Size]:
    name, module = next((n, m) for n, m in lora_targets(sd.models).items()
                        if n.startswith("lora_unet_") and m.weight.dim() == 2)
    return name, module.weight.shape


def lora_state(sd: StableDiffusion, **changes) -> dict[str, torch.Tensor]:
    """A valid rank-2 LoRA of two Linear layers (kohya's layout), with `changes` to the first: 'down', 'up',
    'alpha' (a tensor, or None to drop it)."""
    layers = [(n, m.weight.shape) for n, m in lora_targets(sd.models).items()
              if n.startswith("lora_unet_") and m.weight.dim() == 2][:2]
    gen, state = torch.Generator().manual_seed(0), {}
    for i, (name, (out, inp)) in enumerate(layers):
        parts = {"down": torch.randn(2, inp, generator=gen), "up": torch.randn(out, 2, generator=gen),
                 "alpha": torch.tensor(1.0), **(changes if i == 0 else {})}
        state.update({f"{name}.{'alpha' if p == 'alpha' else f'lora_{p}.weight'}": t for p, t in parts.items()
                      if t is not None})
    return state


@pytest.mark.parametrize("part", ["down", "up"])
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_lora_tensor_is_refused_with_the_model_unchanged(tiny, tmp_path, kind, part):
    make, word = HOSTILE[kind]
    name, (out, inp) = linear_layer(tiny)
    path = tmp_path / "lora.pt"
    torch.save(lora_state(tiny, **{part: make((2, inp) if part == "down" else (out, 2))}), path)
    before = weights_of(tiny)
    with pytest.raises(CheckpointError) as info:
        tiny.load_lora(path)
    assert str(path) in str(info.value) and word in str(info.value) and "\n" not in str(info.value)
    assert_unchanged(tiny, before)
    assert not tiny.loras.loaded


ALPHAS = {  # alpha: a word of the refusal, or None where it loads
    "shape_2": (torch.ones(2), "where alpha is one number"), "empty": (torch.ones(0), "one number"),
    "bool": (torch.tensor(True), "bool"), "complex": (torch.tensor(1 + 1j), "complex"),
    "nan": (torch.tensor(float("nan")), "NaN"), "inf": (torch.tensor(float("inf")), "inf"),
    "1e30": (torch.tensor(1e30), "as large as 1e+30"), "meta": (torch.empty((), device="meta"), "meta device"),
    "int": (torch.tensor(2), None), "shape_1": (torch.tensor([2.0]), None), "negative": (torch.tensor(-2.0), None),
    "zero": (torch.tensor(0.0), None), "missing": (None, None),
}


@pytest.mark.parametrize("kind", list(ALPHAS))
def test_lora_alphas(tiny, tmp_path, kind):
    alpha, word = ALPHAS[kind]
    path = tmp_path / "lora.pt"
    torch.save(lora_state(tiny, alpha=alpha), path)
    before = weights_of(tiny)
    if word is None:
        lora = tiny.load_lora(path)
        tiny.unload_lora()
        expected = 2.0 if kind in ("zero", "missing") else float(alpha)  # 0 or none: alpha = r
        assert next(iter(lora.layers.values())).alpha == expected
    else:
        with pytest.raises(CheckpointError, match=re.escape(word)):
            tiny.load_lora(path)
    assert_unchanged(tiny, before)


PAIRS = {  # (down, up) of a Linear layer (out, in) -> a word of the refusal
    "up_3x3": (lambda o, i: (torch.ones(2, i), torch.ones(o, 2, 3, 3)), "where a pair is"),
    "down_1d_up_2d": (lambda o, i: (torch.ones(i), torch.ones(o, 2)), "at least 2 dimensions"),
    "down_3d": (lambda o, i: (torch.ones(2, i, 1), torch.ones(o, 2, 1)), "where a pair is"),
    "ranks_differ": (lambda o, i: (torch.ones(2, i), torch.ones(o, 3)), "with down's rank"),
    "up_1x3": (lambda o, i: (torch.ones(2, i, 1, 1), torch.ones(o, 2, 1, 3)), "up must be"),
    "another_model": (lambda o, i: (torch.ones(2, i + 1), torch.ones(o, 2)), "for another model"),
}


@pytest.mark.parametrize("kind", list(PAIRS))
def test_lora_pairs_of_impossible_shapes_are_refused(tiny, tmp_path, kind):
    make, word = PAIRS[kind]
    _, (out, inp) = linear_layer(tiny)
    down, up = make(out, inp)
    path = tmp_path / "lora.pt"
    torch.save(lora_state(tiny, down=down, up=up), path)
    before = weights_of(tiny)
    with pytest.raises((CheckpointError, InputError), match=word):
        tiny.load_lora(path)
    assert_unchanged(tiny, before)


def test_a_layer_named_twice_is_refused(tiny, tmp_path):
    state = lora_state(tiny)
    name, _ = linear_layer(tiny)
    targets = lora_targets(tiny.models)
    peft = next(n for n, m in targets.items() if m is targets[name] and n.startswith("unet."))
    state.update({f"{peft}.lora_A.weight": state[f"{name}.lora_down.weight"],
                  f"{peft}.lora_B.weight": state[f"{name}.lora_up.weight"]})
    torch.save(state, tmp_path / "twice.pt")
    with pytest.raises(CheckpointError, match="changes one layer twice"):
        tiny.load_lora(tmp_path / "twice.pt")


@pytest.mark.parametrize("dtype, values, weight, refusal", [
    (torch.float16, 60000.0, 10.0, "overflow float16: use a lower weight"),
    (torch.float32, 60000.0, 1e35, "weight must be between -100 and 100"),  # fp32 cannot overflow within the range
    (torch.float32, -60000.0, -1e35, "weight must be between -100 and 100")])
def test_a_merge_that_would_overflow_changes_nothing(tiny, tmp_path, dtype, values, weight, refusal):
    """The second layer's sum would overflow: refused, and the first layer is not merged either."""
    sd = tiny if dtype == torch.float32 else \
        StableDiffusion.from_checkpoint(write_tiny_checkpoint(tmp_path / "t.safetensors"), dtype=dtype)
    state = lora_state(sd)
    last = sorted(k for k in state if k.endswith("lora_up.weight"))[-1]
    state[last] = torch.full_like(state[last], values)
    torch.save(state, tmp_path / "loud.pt")
    before = weights_of(sd)
    with pytest.raises(InputError, match=refusal):
        sd.load_lora(tmp_path / "loud.pt", weight)
    assert_unchanged(sd, before)
    assert not sd.loras.originals and not sd.loras.loaded


# ---- embeddings -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["a1111", "kohya", "diffusers"])
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_embedding_vectors_are_refused(tmp_path, kind, layout):
    make, word = HOSTILE[kind]
    vectors = make((2, 64))
    contents = {"a1111": {"string_to_param": {"*": vectors}}, "kohya": {"emb_params": vectors},
                "diffusers": {"<x>": vectors}}[layout]
    torch.save(contents, tmp_path / "e.pt")
    with pytest.raises(InputError) as info:
        read_embedding(tmp_path / "e.pt")
    assert str(tmp_path / "e.pt") in str(info.value) and word in str(info.value), str(info.value)


class Opaque:
    """Pickles as a class no one can import (a placeholder when read), with `state`."""

    def __init__(self, state):
        self.__dict__.update(state=state)

    def __reduce__(self):
        return object.__new__, (type("ParameterDict", (), {"__module__": "elsewhere"}),), self.__dict__["state"]


ODD_PARAMS = {"list": [torch.ones(1, 64)], "tensor": torch.ones(1, 64), "text": "*", "no_star": {"x": torch.ones(1, 64)},
              "none": None, "nested_list": {"_parameters": [torch.ones(1, 64)]}, "too_many": {"*": torch.ones(80, 64)},
              "3d": {"*": torch.ones(1, 2, 64)}}


@pytest.mark.parametrize("kind", list(ODD_PARAMS))
def test_odd_string_to_param_objects_are_refused(tmp_path, kind):
    torch.save({"string_to_param": ODD_PARAMS[kind]}, tmp_path / "e.pt")
    with pytest.raises(InputError, match="not a textual-inversion embedding|holds vectors of shape"):
        read_embedding(tmp_path / "e.pt")


# ---- arguments that are no path or name ---------------------------------------------------------------

@pytest.mark.parametrize("value", [123, None, 1.5, b"x.pt", ["x.pt"]], ids=["int", "None", "float", "bytes", "list"])
def test_path_arguments_that_are_no_path(tiny, tmp_path, value):
    before = weights_of(tiny)
    for load in (tiny.load_lora, tiny.load_embedding, load_checkpoint):
        with pytest.raises(InputError, match="must be (given as a path|the path of a file)"):
            load(value)
    assert_unchanged(tiny, before)
    torch.save({"emb_params": torch.ones(1, 64)}, tmp_path / "e.pt")
    if value is not None:
        with pytest.raises(InputError, match="must be (a str|None or a text)"):
            tiny.load_embedding(tmp_path / "e.pt", token=value)
    assert not tiny.embeddings


@pytest.mark.parametrize("vectors", [torch.full((1, 64), float("nan")), torch.full((2, 64), 1e30), torch.ones(1, 2, 64),
                                     torch.ones(0, 64), torch.ones(76, 64)], ids=["nan", "1e30", "3-d", "empty", "76"])
def test_an_embedding_made_in_code_gets_the_same_check(tiny, vectors):
    with pytest.raises(InputError, match="made-in-code"):
        tiny.add_embedding(Embedding("<x>", vectors, Path("made-in-code"), sha256="0" * 64))
    assert "<x>" not in tiny.embeddings
