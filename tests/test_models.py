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


@torch.no_grad()
def check_all_networks(models, refs, prompts_ids, text_context):
    assert rel_err(models.clip(prompts_ids), refs.clip(prompts_ids).last_hidden_state) < TOL

    latents = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([981, 21])
    expected = refs.unet(latents, t, encoder_hidden_states=text_context).sample
    assert rel_err(models.unet(latents, t, text_context), expected) < TOL

    image = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    dist = refs.vae.encode(image).latent_dist
    mean, logvar = models.vae.encode(image)
    assert rel_err(mean, dist.mean) < TOL and rel_err(logvar, dist.logvar) < TOL
    assert rel_err(models.vae.decode(dist.mean), refs.vae.decode(dist.mean).sample) < TOL


@pytest.mark.parametrize("variant", ["safetensors", "ckpt", "fp16", "ema"])
def test_every_file_form_loads_the_reference_model(refs, loaded, prompts_ids, text_context, variant):
    models = loaded(variant)
    assert models.kind == "text-to-image"
    check_all_networks(models, refs, prompts_ids, text_context)


def test_ema_can_be_turned_off(refs, loaded):
    models = loaded("ema", use_ema=False)
    expected = refs.unet.state_dict()["conv_in.weight"] * 0.5  # the decoy non-EMA weights
    assert torch.equal(models.unet.input_blocks[0][0].weight, expected)


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


@torch.no_grad()
def test_inpainting_unet(ref_inpaint_unet, loaded, text_context):
    models = loaded("inpainting")
    assert models.kind == "inpainting" and models.unet.config.in_channels == 9
    latents = torch.randn(2, 9, 16, 16, generator=torch.Generator().manual_seed(3))
    expected = ref_inpaint_unet(latents, 400, encoder_hidden_states=text_context).sample
    assert rel_err(models.unet(latents, 400, text_context), expected) < TOL
