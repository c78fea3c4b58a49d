"""`load_checkpoint` on the files users actually have: good tiny checkpoints load and run; missing,
damaged, foreign, SD 2.x / SDXL, incomplete and malicious files give one-line errors naming the file."""

import functools
import importlib
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

from sd.errors import CheckpointError, UnsafeCheckpointError, UnsupportedModelError
from tests.test_safe_pickle import LIGHTNING_LIKE, attacks
from tests.tiny import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, tiny_compvis_state, write_tiny_checkpoint
from sd.checkpoint import load_checkpoint


@functools.cache
def _state() -> dict[str, torch.Tensor]:
    return tiny_compvis_state()


def tiny_state(**changes) -> dict[str, torch.Tensor]:
    """A fresh copy of the tiny checkpoint's state; a value of None in `changes` removes that key."""
    state = {**_state(), **changes}
    return {k: v for k, v in state.items() if v is not None}


def assert_one_line_naming(error: Exception, path) -> str:
    message = str(error)
    assert str(path) in message and "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------
# Good files

@functools.cache
def _inpainting_state() -> dict[str, torch.Tensor]:
    return tiny_compvis_state(in_channels=9)


@pytest.mark.parametrize("suffix, kw", [(".safetensors", {}), (".ckpt", {}), (".ckpt", {"ema": True}),
                                        (".safetensors", {"in_channels": 9})],
                         ids=["safetensors", "ckpt", "ema", "inpainting"])
def test_tiny_checkpoints_load_their_weights(tmp_path, suffix, kw):
    models = load_checkpoint(write_tiny_checkpoint(tmp_path / f"tiny{suffix}", **kw))
    inpainting = kw.get("in_channels") == 9
    assert models.kind == ("inpainting" if inpainting else "text-to-image")
    expected = _inpainting_state() if inpainting else _state()  # with EMA: what model_ema.* carries
    for prefix, model in ((UNET_PREFIX, models.unet), (VAE_PREFIX, models.vae), (CLIP_PREFIX, models.clip)):
        for key, value in model.state_dict().items():
            assert value.dtype == torch.float32 and torch.equal(value, expected[prefix + key]), prefix + key


@torch.no_grad()
def test_tiny_models_run(tmp_path):
    models = load_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.safetensors"))
    context = models.clip(torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(0)))
    noise = models.unet(torch.randn(1, 4, 8, 8), 500, context)
    image = models.vae.decode(torch.randn(1, 4, 8, 8))
    mean, logvar = models.vae.encode(image.clamp(-1, 1))
    assert context.shape == (1, 77, 64) and noise.shape == (1, 4, 8, 8) and image.shape == (1, 3, 64, 64)
    assert mean.shape == logvar.shape == (1, 4, 8, 8)
    for t in (context, noise, image, mean, logvar):
        assert t.isfinite().all() and 0.1 < t.std() < 10  # random weights, yet outputs of a sane scale


def test_non_ema_weights_on_request(tmp_path):
    models = load_checkpoint(write_tiny_checkpoint(tmp_path / "full.ckpt", ema=True), use_ema=False)
    key = "input_blocks.0.0.weight"
    assert torch.equal(models.unet.state_dict()[key], _state()[UNET_PREFIX + key] * 0.5)  # the decoys


def test_unknown_classes_beside_the_weights_are_harmless(tmp_path, monkeypatch):
    """Official .ckpt files pickle PyTorch Lightning objects: they load without importing anything."""
    module_name = "fake_lightning_for_sd"
    (tmp_path / f"{module_name}.py").write_text(LIGHTNING_LIKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = importlib.import_module(module_name).make()
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": tiny_state(), **extra}, path)
    del sys.modules[module_name]
    (tmp_path / f"{module_name}.py").unlink()

    models = load_checkpoint(path)

    assert module_name not in sys.modules
    assert torch.equal(models.clip.state_dict()["final_layer_norm.weight"],
                       _state()[CLIP_PREFIX + "final_layer_norm.weight"])


# ---------------------------------------------------------------------------------------------------
# Bad files. Each maker writes one into a folder and returns its path; BAD_FILES says which error
# it must raise and a fragment of the message. test_convert_cli.py feeds the same files to the CLI.

def _save(path, state):
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state, "global_step": 1}, path)
    return path


def _write(path, content):
    """Write raw bytes, or torch.save any other object."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


def _truncated(folder, suffix):
    path = write_tiny_checkpoint(folder / f"truncated{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _sd2_like(folder):
    # SD 2.x: OpenCLIP ViT-H text encoder under cond_stage_model.model., UNet and VAE as in v1.
    state = {k: v for k, v in tiny_state().items() if not k.startswith("cond_stage_model.")}
    state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3 * 64, 64)
    state["cond_stage_model.model.positional_embedding"] = torch.zeros(77, 64)
    return _save(folder / "v2-1_768-ema-pruned.safetensors", state)


def _sdxl_like(folder):
    state = {k: v for k, v in tiny_state().items() if not k.startswith("cond_stage_model.")}
    state["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(8, 4)
    state["conditioner.embedders.1.model.positional_embedding"] = torch.zeros(77, 4)
    return _save(folder / "sd_xl_base_1.0.safetensors", state)


SYSTEM = f"{os.system.__module__}.system"  # posix.system or nt.system


def _malicious(folder, global_name):
    marker = folder / "pwned"
    return _save(folder / "malicious.ckpt", {**tiny_state(), "hook": attacks(marker)[global_name]})


BAD_FILES = {
    # name: (maker(folder) -> path, error class, fragment of the message)
    "missing": (lambda f: f / "nowhere" / "model.ckpt", CheckpointError, "checkpoint not found"),
    "missing_safetensors": (lambda f: f / "model.safetensors", CheckpointError, "checkpoint not found"),
    "truncated_safetensors": (lambda f: _truncated(f, ".safetensors"), CheckpointError,
                              "not a readable .safetensors file"),
    "truncated_ckpt": (lambda f: _truncated(f, ".ckpt"), CheckpointError, "truncated or corrupt"),
    "empty_ckpt": (lambda f: _write(f / "model.ckpt", b""), CheckpointError, "truncated or corrupt"),
    "garbage_ckpt": (lambda f: _write(f / "model.ckpt", b"<html>404 Not Found</html>\n" * 50), CheckpointError,
                     "not a PyTorch checkpoint"),
    "garbage_safetensors": (lambda f: _write(f / "model.safetensors", bytes(range(256)) * 8), CheckpointError,
                            "not a readable .safetensors file"),
    "no_tensors": (lambda f: _write(f / "model.ckpt", {"epoch": 3, "note": "no weights"}), CheckpointError,
                   "holds no model weights"),
    "other_model": (lambda f: _save(f / "resnet.safetensors", {"fc.weight": torch.zeros(10, 4),
                                                                "fc.bias": torch.zeros(10)}),
                    CheckpointError, "not a Stable Diffusion v1 checkpoint: it has no weights for the unet, vae, clip"),
    "vae_only": (lambda f: _save(f / "vae.safetensors", {k: v for k, v in tiny_state().items()
                                                         if k.startswith(VAE_PREFIX)}),
                 CheckpointError, "no weights for the unet, clip"),
    "sd2": (_sd2_like, UnsupportedModelError, "is an SD 2.x checkpoint"),
    "sdxl": (_sdxl_like, UnsupportedModelError, "is an SDXL checkpoint"),
    "malicious": (lambda f: _malicious(f, SYSTEM), UnsafeCheckpointError, f"calls {SYSTEM}"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file(tmp_path, name):
    make, error, fragment = BAD_FILES[name]
    path = make(tmp_path)
    with pytest.raises(error) as info:
        load_checkpoint(path)
    assert fragment in assert_one_line_naming(info.value, path)
    if error is CheckpointError:
        assert not isinstance(info.value, (UnsupportedModelError, UnsafeCheckpointError))


@pytest.mark.parametrize("global_name", [SYSTEM, "builtins.exec"])
def test_malicious_ckpt_never_runs_its_code(tmp_path, global_name):
    path = _malicious(tmp_path, global_name)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    assert f"calls {global_name}" in assert_one_line_naming(info.value, path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("key, fragment", [
    (UNET_PREFIX + "input_blocks.1.1.proj_out.bias", "the unet weights do not fit SD v1: missing: {key} (1 in all)"),
    (UNET_PREFIX + "out.2.weight", "the unet weights lack {key}"),  # one the configuration is read from
    (VAE_PREFIX + "decoder.up.0.block.2.norm1.bias", "the vae weights do not fit SD v1: missing: {key}"),
    (CLIP_PREFIX + "encoder.layers.1.mlp.fc2.weight", "the clip weights do not fit SD v1: missing: {key}"),
])
def test_missing_key_is_named(tmp_path, key, fragment):
    path = _save(tmp_path / "incomplete.safetensors", tiny_state(**{key: None}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert fragment.format(key=key) in assert_one_line_naming(info.value, path)


@pytest.mark.parametrize("key, fragment", [
    (UNET_PREFIX + "input_blocks.1.0.extra.weight", "the unet weights do not fit SD v1: unexpected: {key} (1 in all)"),
    (CLIP_PREFIX + "encoder.layers.1.mlp.fc3.bias", "the clip weights do not fit SD v1: unexpected: {key}"),
    ("lora_unet_down_blocks_0.alpha", "has 1 keys that are not part of SD v1: {key}"),
])
def test_unknown_key_is_named(tmp_path, key, fragment):
    path = _save(tmp_path / "extra.safetensors", tiny_state(**{key: torch.zeros(4)}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert fragment.format(key=key) in assert_one_line_naming(info.value, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_shape_mismatch_is_named(tmp_path, suffix):
    key = UNET_PREFIX + "time_embed.2.bias"
    path = _save(tmp_path / f"bad_shape{suffix}", tiny_state(**{key: torch.zeros(7)}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert f"{key} has shape (7,), expected (128,)" in assert_one_line_naming(info.value, path)
