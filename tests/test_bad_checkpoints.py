"""`load_checkpoint` on the files users actually have: good tiny checkpoints load and run; missing,
damaged, foreign, SD 2.x / SDXL, incomplete and malicious files give one-line errors naming the file."""

import functools
import importlib
import sys

import pytest
import torch

from sd.errors import CheckpointError, UnsafeCheckpointError, UnsupportedModelError
from tests.bad_files import BAD_FILES, LIGHTNING_LIKE, SYSTEM, malicious, save_state, tiny_state
from tests.tiny import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, tiny_compvis_state, write_tiny_checkpoint
from sd.checkpoint import load_checkpoint


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
    expected = _inpainting_state() if inpainting else tiny_state()  # with EMA: what model_ema.* carries
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
    assert torch.equal(models.unet.state_dict()[key], tiny_state()[UNET_PREFIX + key] * 0.5)  # the decoys


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
                       tiny_state()[CLIP_PREFIX + "final_layer_norm.weight"])


# ---------------------------------------------------------------------------------------------------


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
    path = malicious(tmp_path, global_name)
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
    path = save_state(tmp_path / "incomplete.safetensors", tiny_state(**{key: None}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert fragment.format(key=key) in assert_one_line_naming(info.value, path)


@pytest.mark.parametrize("key, fragment", [
    (UNET_PREFIX + "input_blocks.1.0.extra.weight", "the unet weights do not fit SD v1: unexpected: {key} (1 in all)"),
    (CLIP_PREFIX + "encoder.layers.1.mlp.fc3.bias", "the clip weights do not fit SD v1: unexpected: {key}"),
    ("lora_unet_down_blocks_0.alpha", "has 1 keys that are not part of SD v1: {key}"),
])
def test_unknown_key_is_named(tmp_path, key, fragment):
    path = save_state(tmp_path / "extra.safetensors", tiny_state(**{key: torch.zeros(4)}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert fragment.format(key=key) in assert_one_line_naming(info.value, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_shape_mismatch_is_named(tmp_path, suffix):
    key = UNET_PREFIX + "time_embed.2.bias"
    path = save_state(tmp_path / f"bad_shape{suffix}", tiny_state(**{key: torch.zeros(7)}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert f"{key} has shape (7,), expected (128,)" in assert_one_line_naming(info.value, path)
