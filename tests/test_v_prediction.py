"""v-prediction through every sampler and mode: the tiny model's UNet turned into one that predicts v (by the
identity v = (eps - s x_t) / alpha, at the (alpha, s) of the sample it is given) and read as v-prediction must
make what the epsilon model makes, in text-to-image, image-to-image, both inpaintings, the hires fix, DDIM
inversion, DeepCache and token merging, with the same predicted x0 in the step callback. This shows every path
reads the UNet through the one conversion (`sd.parameterization.to_epsilon`); that the conversion and each
sampler's scales are right is shown against diffusers' v-prediction schedulers (test_samplers.py) and pipelines
(test_sd2.py)."""

import dataclasses

import pytest
import torch
from PIL import Image

from sd.checkpoint import load_checkpoint
from sd.pipeline import StableDiffusion
from sd.samplers import SAMPLERS
from tests.conftest import rel_err
from tests.tiny import write_tiny_checkpoint

SMALL = dict(width=64, height=48, steps=5, seed=7, guidance_scale=5.0, progress=False, negative_prompt="blurry")


def models_of(tmp_path_factory, in_channels: int):
    return load_checkpoint(write_tiny_checkpoint(tmp_path_factory.mktemp("v") / "tiny.ckpt", in_channels=in_channels))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """pair(in_channels) -> (the epsilon model, the same networks predicting v)."""
    made = {}

    def make(in_channels: int = 4):
        if in_channels not in made:
            models = models_of(tmp_path_factory, in_channels)
            made[in_channels] = (StableDiffusion(models), v_model(models))
        return made[in_channels]

    return make


def v_model(models) -> StableDiffusion:
    """A copy of the pipeline whose UNet answers v, read as v-prediction. The (alpha, s) of each call are the
    sampler's `input_scales` at that call, the sampler being the one the denoising loop runs."""
    unet = copy_unet(models.unet)
    pipe = StableDiffusion(dataclasses.replace(models, unet=unet, prediction_type="v_prediction"))
    running = {}
    denoise, forward = pipe.denoise, unet.forward

    def recording_denoise(latents, cond, *, sampler, **options):
        running["sampler"] = sampler
        return denoise(latents, cond, sampler=sampler, **options)

    def v_forward(x, t, cond, **options):
        eps = forward(x, t, cond, **options)  # (2B or B, 4, h, w)
        alpha, s = running["sampler"].input_scales(t, x)
        return (eps.float() - s * x.float()) / alpha

    pipe.denoise, unet.forward = recording_denoise, v_forward
    return pipe


def copy_unet(unet):
    """The same weights (shared), another module object, so patching its forward leaves the original alone."""
    copy = type(unet)(unet.config).to("meta")
    copy.load_state_dict(unet.state_dict(), assign=True)
    return copy.eval().requires_grad_(False)


def run(pipe: StableDiffusion, method: str, *args, **options):
    """The final latents and the predicted x0 of every step."""
    x0s = []
    latents = getattr(pipe, method)(*args, output_type="latent", callback=lambda i, t, x, x0: x0s.append(x0),
                                    **options)
    return latents, x0s


def assert_same(eps_run, v_run, tolerance: float = 1e-4):
    (a, a_x0), (b, b_x0) = eps_run, v_run
    assert len(a_x0) == len(b_x0) and rel_err(b, a) < tolerance
    assert max(rel_err(x, y) for x, y in zip(b_x0, a_x0)) < 1e-3


def image():
    return Image.linear_gradient("L").resize((64, 48)).convert("RGB")


def mask():
    m = Image.new("L", (64, 48))
    m.paste(255, (16, 8, 48, 40))
    return m


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_text_to_image(pair, sampler):
    eps, v = pair()
    assert_same(*(run(p, "text_to_image", "a red circle", sampler=sampler, **SMALL) for p in (eps, v)))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_image_to_image(pair, sampler):
    eps, v = pair()
    assert_same(*(run(p, "image_to_image", "a red circle", image(), sampler=sampler, strength=0.6,
                      **{k: v for k, v in SMALL.items() if k not in ("width", "height")}) for p in (eps, v)))


@pytest.mark.parametrize("in_channels, sampler", [(4, "euler_a"), (4, "ddim"), (9, "dpmpp_2m_karras"), (9, "lcm")])
def test_inpainting(pair, in_channels, sampler):
    eps, v = pair(in_channels)
    options = {k: v for k, v in SMALL.items() if k not in ("width", "height")}
    assert_same(*(run(p, "inpaint", "a red circle", image(), mask(), sampler=sampler, strength=0.9, **options)
                  for p in (eps, v)))


@pytest.mark.parametrize("upscaler, tolerance", [("latent", 1e-4), ("lanczos", 1e-3)])
def test_hires_fix(pair, upscaler, tolerance):
    """(lanczos passes an 8-bit image between the passes: float rounding may move a pixel by one level.)"""
    eps, v = pair()
    assert_same(*(run(p, "hires_fix", "a red circle", hires_scale=1.5, hires_steps=3, hires_upscaler=upscaler,
                      sampler="dpmpp_2m", **SMALL) for p in (eps, v)), tolerance)


@pytest.mark.parametrize("speedup", [dict(deep_cache=2), dict(deep_cache=3, deep_cache_branch=1),
                                     dict(token_merging=0.5)])
def test_speedups(pair, speedup):
    eps, v = pair()
    assert_same(*(run(p, "text_to_image", "a red circle", sampler="euler", **speedup, **SMALL) for p in (eps, v)))


@torch.inference_mode()
def test_ddim_inversion_and_back(pair):
    eps, v = pair()
    inverted = [p.invert(image(), "a red circle", steps=5, progress=False) for p in (eps, v)]
    assert rel_err(inverted[1], inverted[0]) < 1e-4
    remade = [run(p, "text_to_image", "a red circle", latents=x, sampler="ddim", steps=5, guidance_scale=1.0,
                  progress=False) for p, x in zip((eps, v), inverted)]
    assert_same(*remade)
