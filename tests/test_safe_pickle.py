"""Pickle checkpoints load without running code: dangerous globals are refused, unknown ones are inert."""

import importlib
import io
import pickle
import random
import struct
import sys
import tracemalloc
import zipfile
from collections import OrderedDict

import pytest
import torch

from sd.errors import CheckpointError, UnsafeCheckpointError
from sd.safe_pickle import load_pickle_checkpoint
from tests.bad_files import LIGHTNING_LIKE, attacks


def weights():
    torch.manual_seed(0)
    return OrderedDict([("model.w", torch.randn(3, 4)), ("model.b", torch.arange(5)),
                        ("model.h", torch.randn(2, 2).half())])


def assert_same_weights(loaded, expected):
    assert list(loaded) == list(expected)
    for key, tensor in expected.items():
        assert loaded[key].dtype == tensor.dtype and loaded[key].device.type == "cpu"
        assert torch.equal(loaded[key], tensor)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_plain_checkpoint_round_trips(tmp_path, zip_format):
    path = tmp_path / "model.ckpt"
    state = {"state_dict": weights(), "global_step": 7, "param": torch.nn.Parameter(torch.ones(2))}
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_pickle_checkpoint(path)
    assert_same_weights(loaded["state_dict"], state["state_dict"])
    assert loaded["global_step"] == 7
    assert isinstance(loaded["param"], torch.nn.Parameter) and torch.equal(loaded["param"], state["param"])


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("global_name", list(attacks("x")))
def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path, global_name, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": weights(), "callbacks": {"x": [attacks(marker)[global_name]]}}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_pickle_checkpoint(path)
    message = str(info.value)
    assert f"calls {global_name}," in message and str(path) in message and "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize("global_name", ["builtins.exec", "subprocess.call"])
def test_the_attacks_are_real(tmp_path, global_name):
    """Control: the same files run their code under a plain torch.load."""
    marker = tmp_path / "pwned"
    torch.save(attacks(marker)[global_name], tmp_path / "model.ckpt")
    torch.load(tmp_path / "model.ckpt", weights_only=False)
    assert marker.exists()


def test_a_pickle_cannot_patch_torch(tmp_path):
    # GLOBAL torch._utils._rebuild_tensor_v2, then BUILD with slot state {"evil": 1}: setattr(it, "evil", 1).
    data = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x04\x00\x00\x00evilK\x01s\x86b."
    rebuild = torch._utils._rebuild_tensor_v2
    try:  # control: a plain unpickler patches torch
        assert pickle.loads(data) is rebuild and rebuild.evil == 1
    finally:
        del rebuild.evil
    path = tmp_path / "model.ckpt"
    torch.save({}, path)
    with zipfile.ZipFile(path) as archive:  # swap in the crafted pickle, as an attacker would
        records = {info: archive.read(info) for info in archive.infolist()}
    with zipfile.ZipFile(path, "w") as archive:
        for info, content in records.items():
            archive.writestr(info, data if info.filename.endswith("/data.pkl") else content)
    with pytest.raises(UnsafeCheckpointError, match="rewrites torch._utils._rebuild_tensor_v2"):
        load_pickle_checkpoint(path)
    assert not hasattr(rebuild, "evil")




@pytest.mark.parametrize("protocol", [1, 2])
def test_unknown_classes_become_placeholders_and_are_never_imported(tmp_path, monkeypatch, protocol):
    module_name = f"fake_lightning_{protocol}"
    (tmp_path / f"{module_name}.py").write_text(LIGHTNING_LIKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = importlib.import_module(module_name).make()
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": weights(), **extra}, path, pickle_protocol=protocol)
    del sys.modules[module_name]  # now it cannot be imported
    sys.path.remove(str(tmp_path))
    (tmp_path / f"{module_name}.py").unlink()

    loaded = load_pickle_checkpoint(path)

    assert module_name not in sys.modules
    assert_same_weights(loaded["state_dict"], weights())
    (callback_class, callback_state), = loaded["callbacks"].items()
    assert (callback_class.module, callback_class.name) == (module_name, "ModelCheckpoint")
    assert callback_state == {"best_k_models": {}}
    assert isinstance(loaded["cb"], callback_class)
    assert loaded["cb"].state == {"monitor": "val/loss", "best": {"score": 0.25}}
    hparams, history = loaded["hparams"], loaded["history"]
    assert hparams.name == "AttributeDict" and hparams.state == {"note": "x"}
    if protocol == 1:  # copyreg._reconstructor(cls, dict, {...}): the items are the argument
        assert hparams.args == ({"lr": 1e-4, "steps": 3},) and history.args == ([1, 2],)
    else:  # NEWOBJ, then SETITEMS / APPENDS
        assert hparams.dictitems == {"lr": 1e-4, "steps": 3} and history.listitems == [1, 2]
    assert loaded["factory"].name == "make"
    assert loaded["builtins"] == extra["builtins"]


def test_numpy_scalars_and_arrays_load_as_placeholders(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": weights(), "score": np.float64(0.5), "array": np.arange(3)}, path)
    loaded = load_pickle_checkpoint(path)
    assert_same_weights(loaded["state_dict"], weights())
    assert loaded["score"].name == "scalar" and loaded["array"].name == "_reconstruct"


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["half", "empty"])
def test_truncated_file_is_a_checkpoint_error(tmp_path, zip_format, keep):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": weights()}, path, _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError) as info:
        load_pickle_checkpoint(path)
    message = str(info.value)
    assert "truncated or corrupt" in message and str(path) in message and "\n" not in message
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_garbage_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"<html>404 Not Found</html>\n" * 20)
    with pytest.raises(CheckpointError) as info:
        load_pickle_checkpoint(path)
    message = str(info.value)
    assert "not a PyTorch checkpoint" in message and str(path) in message and "\n" not in message


def test_missing_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "nowhere" / "model.ckpt"
    with pytest.raises(CheckpointError, match="checkpoint not found") as info:
        load_pickle_checkpoint(path)
    assert str(path) in str(info.value) and "README" in str(info.value)


class Allocates:
    """Pickles as bytearray(n): a few bytes that would make the loader allocate n."""

    def __init__(self, n):
        self.n = n

    def __reduce__(self):
        return bytearray, (self.n,)


def test_a_pickle_cannot_allocate_more_than_its_file_holds(tmp_path):
    path = tmp_path / "bomb.ckpt"
    torch.save({"state_dict": weights(), "buffer": Allocates(1_500_000_000)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"asks for a bytearray of 1500000000 items, more than its \d+ "
                                                    r"bytes could hold"):
        load_pickle_checkpoint(path)
    torch.save({"state_dict": weights(), "buffer": Allocates(100)}, path)  # within the file's size: loads
    assert load_pickle_checkpoint(path)["buffer"] == bytearray(100)


HUGE = 1_500_000_000
LENGTHS = {  # opcodes whose length, given in the stream, the unpickler allocates or reads: a few bytes asking HUGE
    "BYTEARRAY8": pickle.BYTEARRAY8 + struct.pack("<Q", HUGE),
    "BINBYTES8": pickle.BINBYTES8 + struct.pack("<Q", HUGE),
    "BINUNICODE8": pickle.BINUNICODE8 + struct.pack("<Q", HUGE),
    "BINBYTES": pickle.BINBYTES + struct.pack("<I", HUGE),
    "BINUNICODE": pickle.BINUNICODE + struct.pack("<I", HUGE),
    "LONG4": pickle.LONG4 + struct.pack("<i", HUGE),
    "FRAME": pickle.FRAME + struct.pack("<Q", HUGE),
}
LEGACY_HEADER = b"".join(pickle.dumps(value, protocol=2) for value in (
    torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION,
    {"protocol_version": torch.serialization.PROTOCOL_VERSION, "little_endian": True,
     "type_sizes": {"short": 2, "int": 4, "long": 4}}))


def with_pickle(path, data: bytes, zip_format: bool):
    """A torch.save file at `path` whose (main) pickle is `data`."""
    if not zip_format:
        return path.write_bytes(LEGACY_HEADER + data)
    torch.save({"a": torch.ones(2)}, path)
    with zipfile.ZipFile(path) as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in records.items():
            archive.writestr(name, data if name.endswith("/data.pkl") else content)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("opcode", list(LENGTHS))
def test_no_opcode_allocates_more_than_the_file_holds(tmp_path, opcode, zip_format):
    path = tmp_path / "bomb.ckpt"
    with_pickle(path, pickle.PROTO + b"\x05" + LENGTHS[opcode] + b"x" * 8, zip_format)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="asks for a bytearray of|truncated or corrupt"):
            load_pickle_checkpoint(path)
        assert tracemalloc.get_traced_memory()[1] < 50 * 2**20  # not HUGE bytes
    finally:
        tracemalloc.stop()


class HugeStorage(pickle.Pickler):
    """Writes a storage's persistent id as torch.save does, claiming HUGE elements."""

    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", HUGE, None) if obj is HugeStorage else None


def test_a_legacy_storage_cannot_claim_more_elements_than_the_file_holds(tmp_path):
    stream = io.BytesIO()
    HugeStorage(stream, protocol=2).dump({"w": HugeStorage})
    path = tmp_path / "bomb.ckpt"
    path.write_bytes(LEGACY_HEADER + stream.getvalue() + pickle.dumps(["0"], protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=f"asks for a storage of {HUGE} items"):
        load_pickle_checkpoint(path)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_fuzzed_pickles_load_or_are_checkpoint_errors(tmp_path, zip_format):
    """Seeded byte changes of a small checkpoint's pickle: each loads or is refused as a CheckpointError."""
    stream = io.BytesIO()
    pickle.dump({"step": 3, "name": "x" * 20, "items": [1.5, (2, b"ab")], "big": 2**70}, stream, protocol=5)
    data, rng = stream.getvalue(), random.Random(0)
    for case in range(60):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.choice([rng.randrange(256), 0xFF, 0x96, 0x8E, 0x95])
        with_pickle(tmp_path / "fuzz.ckpt", bytes(mutated), zip_format)
        try:
            load_pickle_checkpoint(tmp_path / "fuzz.ckpt")
        except CheckpointError:
            pass


def test_torchscript_archives_are_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(UnsafeCheckpointError, match="TorchScript archive"):
        load_pickle_checkpoint(path)
