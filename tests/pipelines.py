"""Running our pipeline and diffusers' pipelines on the same inputs, and comparing them step by step."""

import numpy as np
import torch
import transformers

from sd.files import DATA_DIR
from sd.pipeline import StableDiffusion
from tests.conftest import rel_err
from tests.reference import reference_scheduler


def reference_tokenizer() -> transformers.CLIPTokenizer:
    return transformers.CLIPTokenizer(vocab=str(DATA_DIR / "vocab.json"), merges=str(DATA_DIR / "merges.txt"),
                                      model_max_length=77)


def reference_pipeline(cls, refs, unet, sampler: str, text_encoder=None):
    """A diffusers pipeline of the reference models (text_encoder: another CLIP in place of refs.clip)."""
    scheduler, _ = reference_scheduler(sampler, {})
    pipe = cls(vae=refs.vae, text_encoder=text_encoder or refs.clip, tokenizer=reference_tokenizer(), unet=unet,
               scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(pipe, seed: int, **inputs):
    """diffusers' pipeline; returns (the latents after every step, images in [0, 1])."""
    steps = []

    def keep_latents(pipe, i, t, tensors):
        steps.append(tensors["latents"])
        return tensors

    images = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                  callback_on_step_end=keep_latents, **inputs).images
    return steps, images


def run_ours(sd: StableDiffusion, method: str, seed: int, **inputs):
    """Our pipeline; returns (the latents after every step, from its step callback, images in [0, 1])."""
    steps = []
    latents = getattr(sd, method)(seed=seed, output_type="latent", progress=False,
                                  callback=lambda i, t, x, x0: steps.append(x.clone()), **inputs)
    assert torch.equal(steps[-1], latents)
    return steps, sd.decode(latents, "np")


def assert_same(ours, theirs):
    """The same latents after every step, and the same images."""
    (steps, images), (ref_steps, ref_images) = ours, theirs
    assert len(steps) == len(ref_steps) and images.shape == ref_images.shape
    errors = [rel_err(a, b) for a, b in zip(steps, ref_steps)]
    assert max(errors) < 1e-3, f"worst step {errors.index(max(errors))} of {len(errors)}: {max(errors):.2e}"
    assert np.abs(images - ref_images).mean() < 1 / 255
