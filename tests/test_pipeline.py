"""The pipeline end to end against diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline, built from the
same random full-size checkpoint, with the same seed, settings, negative prompt and a non-square size."""

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline  # noqa: E402

from sd.pipeline import StableDiffusion
from tests import pipelines
from tests.pipelines import assert_same, reference_pipeline

WIDTH, HEIGHT = 96, 64  # latents (12, 8): not a multiple of 64, so the UNet's odd-size path runs too
PROMPT, NEGATIVE = "a red bicycle leaning on a stone wall, golden hour", "blurry, low quality"
SETTINGS = dict(guidance_scale=7.5, height=HEIGHT, width=WIDTH)
# Denoising steps per case: as few as the case's sampler logic needs, each UNet call of both full-size pipelines
# costing seconds. 4 steps run every branch of the multistep DPM++ 2M (first order, second order, the lower order
# final step); PLMS keeps 10 at strength 0.6, 7 UNet calls: its first step, the correction, orders 2, 3 and 4
# and the sliding window of the last four predictions; strengths times steps that are not whole (0.7 x 5 = 3.5)
# check that the begin index rounds down as diffusers' does.
T2I_STEPS = 4
IMG2IMG_STEPS = {"euler_a": 5, "plms": 10}  # 3 and 7 UNet calls at strength 0.6
INPAINT_STEPS = {1.0: 4, 0.7: 5}  # 4 and 3 DPM++ 2M steps


def init_image() -> Image.Image:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.stack([x / WIDTH, y / HEIGHT, 0.5 + 0.5 * np.sin(x / 7.0) * np.cos(y / 5.0)], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def mask_image() -> Image.Image:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[16:48, 24:72] = 255  # white = repaint
    return Image.fromarray(mask)


def run_reference(cls, refs, unet, sampler: str, seed: int, steps: int, **inputs):
    pipe = reference_pipeline(cls, refs, unet, sampler)
    return pipelines.run_reference(pipe, seed, prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                                   **SETTINGS, **inputs)


def run_ours(sd: StableDiffusion, method: str, sampler: str, seed: int, steps: int, **inputs):
    return pipelines.run_ours(sd, method, seed, prompt=PROMPT, negative_prompt=NEGATIVE, sampler=sampler,
                              steps=steps, guidance_scale=SETTINGS["guidance_scale"], width=WIDTH, height=HEIGHT,
                              **inputs)


# First in the file: `loaded` keeps one model at a time, and test_models.py, just before in the suite, ends
# with the inpainting one; the ordinary model loaded next stays for test_prompt.py after.
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_with_inpainting_checkpoint(refs, ref_inpaint_unet, loaded, strength):
    steps, inputs = INPAINT_STEPS[strength], dict(image=init_image(), strength=strength)
    sd = StableDiffusion(loaded("inpainting"))
    ours = run_ours(sd, "inpaint", "dpmpp_2m_karras", seed=9, steps=steps, mask=mask_image(), **inputs)
    theirs = run_reference(StableDiffusionInpaintPipeline, refs, ref_inpaint_unet, "dpmpp_2m_karras", seed=9,
                           steps=steps, mask_image=mask_image(), **inputs)
    assert_same(ours, theirs)


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "euler_a", "ddim", "lcm"])
def test_text_to_image(refs, loaded, sampler):
    ours = run_ours(StableDiffusion(loaded("safetensors")), "text_to_image", sampler, seed=11, steps=T2I_STEPS)
    assert_same(ours, run_reference(StableDiffusionPipeline, refs, refs.unet, sampler, seed=11, steps=T2I_STEPS))


@pytest.mark.parametrize("sampler", ["euler_a", "plms"])
def test_image_to_image(refs, loaded, sampler):
    steps, inputs = IMG2IMG_STEPS[sampler], dict(image=init_image(), strength=0.6)
    ours = run_ours(StableDiffusion(loaded("safetensors")), "image_to_image", sampler, seed=5, steps=steps, **inputs)
    assert_same(ours, run_reference(StableDiffusionImg2ImgPipeline, refs, refs.unet, sampler, seed=5, steps=steps,
                                    **inputs))


@pytest.mark.parametrize("sampler", ["euler_a"])
def test_inpaint_with_ordinary_checkpoint(refs, loaded, sampler):
    inputs = dict(image=init_image(), strength=1.0)
    ours = run_ours(StableDiffusion(loaded("safetensors")), "inpaint", sampler, seed=3, steps=4, mask=mask_image(),
                    **inputs)
    theirs = run_reference(StableDiffusionInpaintPipeline, refs, refs.unet, sampler, seed=3, steps=4,
                           mask_image=mask_image(), **inputs)
    assert_same(ours, theirs)
