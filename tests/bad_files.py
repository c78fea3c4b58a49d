"""Broken and hostile files for the loading tests: pickled calls that would run code (`attacks`), a
pickle of classes no one can import (`LIGHTNING_LIKE`), and checkpoints that must be refused
(`BAD_FILES`, fed to the library by test_bad_checkpoints.py and to the commands by the CLI tests)."""

import builtins
import functools
import os
import subprocess

import torch
from safetensors.torch import save_file

from sd.errors import CheckpointError, UnsafeCheckpointError
from sd.families import UNET_CONTEXT_KEY
from tests.tiny import VAE_PREFIX, tiny_compvis_state, write_tiny_checkpoint


class Evil:
    """Pickles as a call to `function(*args)`, which would create the marker file."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def attacks(marker):
    """Pickled calls that would create `marker`, keyed by the global each one names."""
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        f"{os.system.__module__}.system": Evil(os.system, f"touch {marker}"),
        "builtins.exec": Evil(builtins.exec, code),
        "builtins.eval": Evil(builtins.eval, code),
        "subprocess.call": Evil(subprocess.call, ["touch", str(marker)]),
        # Harmless here, but getattr is how pickles reach methods of the objects they build.
        "builtins.getattr": Evil(getattr, 1, "real"),
    }


LIGHTNING_LIKE = '''
class ModelCheckpoint:
    def __init__(self):
        self.monitor, self.best = "val/loss", {"score": 0.25}

class AttributeDict(dict):
    pass

class History(list):
    pass

def make():
    hparams = AttributeDict(lr=1e-4, steps=3)
    hparams.note = "x"
    return {"callbacks": {ModelCheckpoint: {"best_k_models": {}}}, "cb": ModelCheckpoint(),
            "hparams": hparams, "history": History([1, 2]), "factory": make, "builtins": BUILTINS}

BUILTINS = {"set": {1, 2}, "frozenset": frozenset({3}), "bytes": b"ab", "empty": b"", "complex": 1 + 2j,
            "slice": slice(1, 2), "range": range(3), "bytearray": bytearray(b"x"), "type": float}
'''


@functools.cache
def _state() -> dict[str, torch.Tensor]:
    return tiny_compvis_state()


def tiny_state(**changes) -> dict[str, torch.Tensor]:
    """A fresh copy of the tiny checkpoint's state; a value of None in `changes` removes that key."""
    state = {**_state(), **changes}
    return {k: v for k, v in state.items() if v is not None}


# Bad files. Each maker writes one into a folder and returns its path; BAD_FILES says which error
# it must raise and a fragment of the message. test_convert_cli.py feeds the same files to the CLI.

def save_state(path, state):
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state, "global_step": 1}, path)
    return path


def write_raw(path, content):
    """Write raw bytes, or torch.save any other object."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


def truncated(folder, suffix):
    path = write_tiny_checkpoint(folder / f"truncated{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def sd2_like(folder, tower: dict[str, torch.Tensor], name: str = "v2-1_768-ema-pruned.safetensors"):
    """SD 2.x's layout with `tower` as its OpenCLIP text tower (keys without the prefix)."""
    state = {k: v for k, v in tiny_state().items() if not k.startswith("cond_stage_model.")}
    state.update({"cond_stage_model.model." + k: v for k, v in tower.items()})
    return save_state(folder / name, state)


def sd2_tower(**changes) -> dict[str, torch.Tensor]:
    """The tiny SD 2.x tower in OpenCLIP's layout, with `changes` (key: tensor, or None to drop the key)."""
    prefix = "cond_stage_model.model."
    tower = {k[len(prefix):]: v for k, v in tiny_compvis_state(family="sd2").items() if k.startswith(prefix)}
    return {k: v for k, v in (tower | changes).items() if v is not None}


def sd2_without_tower(folder):
    """An SD 2.x UNet (1024-wide context) with no text tower at all."""
    state = {k: v for k, v in tiny_state().items() if not k.startswith("cond_stage_model.")}
    state[UNET_CONTEXT_KEY] = torch.zeros(64, 1024)
    return save_state(folder / "v2-unet-only.safetensors", state)


def sdxl_like(folder):
    """An SD v1 file whose text encoder is replaced by two stray SDXL tower keys: an SDXL file cut short."""
    state = {k: v for k, v in tiny_state().items() if not k.startswith("cond_stage_model.")}
    state["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(8, 4)
    state["conditioner.embedders.1.model.positional_embedding"] = torch.zeros(77, 4)
    return save_state(folder / "sd_xl_base_1.0.safetensors", state)


SYSTEM = f"{os.system.__module__}.system"  # posix.system or nt.system


def malicious(folder, global_name):
    marker = folder / "pwned"
    return save_state(folder / "malicious.ckpt", {**tiny_state(), "hook": attacks(marker)[global_name]})


BAD_FILES = {
    # name: (maker(folder) -> path, error class, fragment of the message)
    "missing": (lambda f: f / "nowhere" / "model.ckpt", CheckpointError, "checkpoint not found"),
    "missing_safetensors": (lambda f: f / "model.safetensors", CheckpointError, "checkpoint not found"),
    "truncated_safetensors": (lambda f: truncated(f, ".safetensors"), CheckpointError,
                              "not a readable .safetensors file"),
    "truncated_ckpt": (lambda f: truncated(f, ".ckpt"), CheckpointError, "truncated or corrupt"),
    "empty_ckpt": (lambda f: write_raw(f / "model.ckpt", b""), CheckpointError, "truncated or corrupt"),
    "garbage_ckpt": (lambda f: write_raw(f / "model.ckpt", b"<html>404 Not Found</html>\n" * 50), CheckpointError,
                     "not a PyTorch checkpoint"),
    "garbage_safetensors": (lambda f: write_raw(f / "model.safetensors", bytes(range(256)) * 8), CheckpointError,
                            "not a readable .safetensors file"),
    "no_tensors": (lambda f: write_raw(f / "model.ckpt", {"epoch": 3, "note": "no weights"}), CheckpointError,
                   "holds no model weights"),
    "other_model": (lambda f: save_state(f / "resnet.safetensors", {"fc.weight": torch.zeros(10, 4),
                                                                "fc.bias": torch.zeros(10)}),
                    CheckpointError, "as SD v1 it has no weights for the unet, vae, clip"),
    "vae_only": (lambda f: save_state(f / "vae.safetensors", {k: v for k, v in tiny_state().items()
                                                         if k.startswith(VAE_PREFIX)}),
                 CheckpointError, "no weights for the unet, clip"),
    "sd2_partial_tower": (lambda f: sd2_like(f, {"transformer.resblocks.0.attn.in_proj_weight": torch.zeros(192, 64),
                                                 "positional_embedding": torch.zeros(77, 64)}),
                          CheckpointError, "lack cond_stage_model.model.token_embedding.weight"),
    "sd2_tower_without_layer": (lambda f: sd2_like(f, sd2_tower(**{"transformer.resblocks.1.mlp.c_fc.weight": None})),
                                CheckpointError, "missing: cond_stage_model.model.transformer.resblocks.1.mlp.c_fc.weight"),
    "sd2_unfused_in_proj": (lambda f: sd2_like(f, sd2_tower(**{"transformer.resblocks.2.attn.in_proj_weight":
                                                               torch.zeros(100, 64)})),
                            CheckpointError, "in_proj_weight has shape (100, 64), not q, k and v stacked"),
    "sd2_misshaped_in_proj": (lambda f: sd2_like(f, sd2_tower(**{"transformer.resblocks.2.attn.in_proj_weight":
                                                                 torch.zeros(96, 64)})),
                              CheckpointError, "resblocks.2.attn.in_proj_weight has shape (96, 64), not q, k and v"),
    "sd2_no_tower": (sd2_without_tower, CheckpointError, "as SD 2.x it has no weights for the clip"),
    "sdxl": (sdxl_like, CheckpointError, "the clip weights lack conditioner.embedders.0.transformer.text_model."),
    "malicious": (lambda f: malicious(f, SYSTEM), UnsafeCheckpointError, f"calls {SYSTEM}"),
}
