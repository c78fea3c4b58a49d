"""An official SD v1.x checkpoint, loaded by `load_checkpoint`, against diffusers' own converters.

Opt-in: SD_CHECKPOINT=/path/to/v1-5-pruned-emaonly.safetensors python -m pytest tests/test_official_checkpoint.py
(any SD v1.x .ckpt or .safetensors: fp32 or fp16, full or emaonly, text-to-image or inpainting).
The same file goes through diffusers' `convert_ldm_*_checkpoint` (EMA weights where the file has
them, as our loader does) into diffusers' UNet and VAE and transformers' CLIP text model at the
SD v1.5 sizes; both sides run in fp32 and must agree. Needs about 16 GB of memory and a few minutes.
"""

import os
from pathlib import Path

import pytest
import torch

CHECKPOINT = os.environ.get("SD_CHECKPOINT", "")
if not CHECKPOINT:
    pytest.skip("set SD_CHECKPOINT to an official SD v1.x checkpoint (.ckpt or .safetensors) to compare it "
                "with diffusers' converters", allow_module_level=True)
if not Path(CHECKPOINT).is_file():
    pytest.skip(f"SD_CHECKPOINT={CHECKPOINT} is not a file", allow_module_level=True)

from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint,  # noqa: E402
                                                 convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint)

from sd.tokenizer import CLIPTokenizer  # noqa: E402
from tests import reference  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from sd.checkpoint import load_checkpoint, read_state_dict  # noqa: E402

TOL = 1e-4
PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolor painting of a fox in the snow, 4k"]


@pytest.fixture(scope="module")
def refs():
    """diffusers' UNet and VAE, transformers' CLIP, holding the file's weights as diffusers converts them."""
    state = read_state_dict(CHECKPOINT)
    unet = reference.sd15_unet(in_channels=state["model.diffusion_model.input_blocks.0.0.weight"].shape[1])
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, dict(unet.config), extract_ema=True))
    vae = reference.sd15_vae()
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, dict(vae.config)))
    clip = reference.sd15_clip()
    # transformers 5 names the weights without `text_model.` and keeps no position_ids in the state dict.
    clip_state = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()}
    clip_state.pop("embeddings.position_ids", None)
    clip.load_state_dict(clip_state)
    del state
    return {name: model.float().eval().requires_grad_(False) for name, model in
            (("unet", unet), ("vae", vae), ("clip", clip))}


@pytest.fixture(scope="module")
def ours():
    return load_checkpoint(CHECKPOINT)


@pytest.fixture(scope="module")
def ids():
    return CLIPTokenizer()(PROMPTS)  # (2, 77)


def test_same_weights(ours, refs):
    """Spot checks of one weight per network: the EMA choice, the prefixes, the fp16 -> fp32 cast."""
    assert ours.kind == ("inpainting" if refs["unet"].config.in_channels == 9 else "text-to-image")
    pairs = [(ours.unet.input_blocks[0][0].weight, refs["unet"].conv_in.weight),
             (ours.unet.out[2].weight, refs["unet"].conv_out.weight),
             (ours.vae.decoder.conv_out.weight, refs["vae"].decoder.conv_out.weight),
             (ours.clip.embeddings.token_embedding.weight,
              refs["clip"].state_dict()["embeddings.token_embedding.weight"])]
    for mine, theirs in pairs:
        assert mine.dtype == torch.float32 and torch.equal(mine, theirs)


@torch.no_grad()
def test_clip(ours, refs, ids):
    hidden = ours.clip(ids)
    assert hidden.shape == (2, 77, refs["clip"].config.hidden_size) and hidden.isfinite().all()
    assert rel_err(hidden, refs["clip"](ids).last_hidden_state) < TOL


@torch.no_grad()
def test_unet(ours, refs, ids):
    context = refs["clip"](ids).last_hidden_state  # real text conditioning, (2, 77, 768)
    in_channels = refs["unet"].config.in_channels
    latents = torch.randn(2, in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([981, 41])
    expected = refs["unet"](latents, t, encoder_hidden_states=context).sample
    assert rel_err(ours.unet(latents, t, context), expected) < TOL


@torch.no_grad()
def test_vae(ours, refs):
    # A smooth image rather than noise: what the VAE was trained on.
    y, x = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    image = torch.stack([x, y, (x * y * 3).sin()])[None]  # (1, 3, 64, 64) in [-1, 1]
    dist = refs["vae"].encode(image).latent_dist
    mean, logvar = ours.vae.encode(image)
    assert rel_err(mean, dist.mean) < TOL and rel_err(logvar, dist.logvar) < TOL
    decoded = ours.vae.decode(dist.mean)
    assert rel_err(decoded, refs["vae"].decode(dist.mean).sample) < TOL
    # Real weights reconstruct the image; random or misplaced ones do not.
    assert (decoded - image).abs().mean() < 0.2
