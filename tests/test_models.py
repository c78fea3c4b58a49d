"""Our CLIP, VAE and UNet, loaded by `load_checkpoint` from CompVis files, against the references."""

import pytest
import torch

from tests import reference
from tests.conftest import rel_err
from sd.checkpoint import read_state_dict

TOL = 1e-4


@pytest.mark.parametrize("net", ["unet", "vae", "clip"])
def test_checkpoint_layout_is_the_compvis_one(refs, checkpoint, net):
    """diffusers' own converter turns our test file back into exactly the reference weights."""
    ref_state = getattr(refs, net).state_dict()
    converted = reference.diffusers_convert(net, getattr(refs, net), read_state_dict(checkpoint("ckpt")))
    assert converted.keys() == ref_state.keys()
    for key, value in ref_state.items():
        assert torch.equal(converted[key], value), key


LATENTS = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))
TIMESTEPS = torch.tensor([981, 21])
IMAGE = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
@torch.no_grad()
def reference_outputs(refs, prompts_ids, text_context):
    """The references' outputs on the inputs every file form is checked on: the same for every form, so
    computed once."""
    dist = refs.vae.encode(IMAGE).latent_dist
    return dict(clip=refs.clip(prompts_ids).last_hidden_state,
                unet=refs.unet(LATENTS, TIMESTEPS, encoder_hidden_states=text_context).sample,
                mean=dist.mean, logvar=dist.logvar, decoded=refs.vae.decode(dist.mean).sample)


@torch.no_grad()
def check_all_networks(models, expected, prompts_ids, text_context):
    assert rel_err(models.clip(prompts_ids), expected["clip"]) < TOL
    assert rel_err(models.unet(LATENTS, TIMESTEPS, text_context), expected["unet"]) < TOL
    mean, logvar = models.vae.encode(IMAGE)
    assert rel_err(mean, expected["mean"]) < TOL and rel_err(logvar, expected["logvar"]) < TOL
    assert rel_err(models.vae.decode(expected["mean"]), expected["decoded"]) < TOL


# Before the file forms: `loaded` keeps one model at a time, so these find the safetensors one loaded (by the
# first form here, or by test_lora.py before in the suite) instead of loading it again after the others.
@torch.no_grad()
@pytest.mark.parametrize("t", [1, 250, 999])
def test_unet_timesteps(refs, loaded, text_context, t):
    unet = loaded("safetensors").unet
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(t))
    expected = refs.unet(latents, t, encoder_hidden_states=text_context).sample
    assert rel_err(unet(latents, t, text_context), expected) < TOL


@torch.no_grad()
def test_unet_at_full_64x64_latent(refs, loaded, text_context):
    unet = loaded("safetensors").unet
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(7))
    expected = refs.unet(latents, 500, encoder_hidden_states=text_context[:1]).sample
    assert rel_err(unet(latents, 500, text_context[:1]), expected) < TOL


@pytest.mark.parametrize("variant", ["safetensors", "ckpt", "fp16", "ema"])
def test_every_file_form_loads_the_reference_model(reference_outputs, loaded, prompts_ids, text_context, variant):
    models = loaded(variant)
    assert models.kind == "text-to-image"
    check_all_networks(models, reference_outputs, prompts_ids, text_context)


def test_ema_can_be_turned_off(refs, loaded):
    models = loaded("ema", use_ema=False)
    expected = refs.unet.state_dict()["conv_in.weight"] * 0.5  # the decoy non-EMA weights
    assert torch.equal(models.unet.input_blocks[0][0].weight, expected)


@torch.no_grad()
def test_inpainting_unet(ref_inpaint_unet, loaded, text_context):
    models = loaded("inpainting")
    assert models.kind == "inpainting" and models.unet.config.in_channels == 9
    latents = torch.randn(2, 9, 16, 16, generator=torch.Generator().manual_seed(3))
    expected = ref_inpaint_unet(latents, 400, encoder_hidden_states=text_context).sample
    assert rel_err(models.unet(latents, 400, text_context), expected) < TOL
