"""SDXL against the references (Podell et al., 2023): the base, inpainting and refiner files in sgm's layout (proven
by diffusers' own converters), against diffusers' UNet2DConditionModel as diffusers builds SDXL's ("text_time"
vector of the pooled text and the micro-conditions), transformers' CLIPTextModel (ViT-L) and
CLIPTextModelWithProjection (bigG), and diffusers' StableDiffusionXL{,Img2Img,Inpaint}Pipeline.

At full size (`full_size`): the files' key sets and shapes through diffusers' converters on the meta device, and the
numbers of the UNet and both text towers with ours and the reference reading the same weight tensors. End to end at
reduced widths with SDXL's block structure (no attention at the first level, transformer depths 2 and 10, heads of
64 channels; the refiner's four levels of depth 4), latents after every step: every sampler, the micro-conditions,
image-to-image, inpainting (the 9-channel UNet and the base's blend), the refiner hand-off on one generator, the
refiner alone with its aesthetic scores, AUTOMATIC1111's empty-negative rule, the prompt syntax and clip skip
against AUTOMATIC1111's formula written over transformers, DeepCache and token merging against their packages.
"""

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers", reason="diffusers is a test-only reference: pip install -r requirements-test.txt")
from diffusers import (StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline,  # noqa: E402
                       StableDiffusionXLPipeline)

from sd.checkpoint import build_network, detect_family, split_checkpoint  # noqa: E402
from sd.clip import CLIPConfig  # noqa: E402
from sd.conditioning import Conditioning  # noqa: E402
from sd.families import FAMILIES, SDXL, SDXL_INPAINTING, SDXL_REFINER, UNET_PREFIX  # noqa: E402
from sd.micro_conditioning import embed, vector_width  # noqa: E402
from sd.pipeline import StableDiffusion  # noqa: E402
from sd.prompt import PromptParser, TextEncoder, encode  # noqa: E402
from sd.samplers import SAMPLERS, make_sampler  # noqa: E402
from sd.tokenizer import CLIPTokenizer  # noqa: E402
from sd.vae import VAEConfig  # noqa: E402
from tests import compvis  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.pipelines import (assert_same, emphasized, reference_chunks, reference_tokenizer, run_ours,  # noqa: E402
                             run_reference)
from tests.reference import (big_g_text_model, random_on_meta, randomize_, reference_scheduler, sd15_clip,  # noqa: E402
                             sd15_vae, sdxl_unet, small_vae, to_compvis, to_open_clip)
from tests.test_pipeline import init_image, mask_image  # noqa: E402
from tests.test_sd2 import BIG_G, DETECTION, REFINER_UNET, SDXL_UNET, VIT_L  # noqa: E402

PATH = Path("sd_xl_base_1.0.safetensors")  # named in messages only
VIT_L_PREFIX = "conditioner.embedders.0.transformer.text_model."  # sgm's layout: transformers' names for ViT-L,
BIG_G_PREFIX, REFINER_BIG_G_PREFIX = "conditioner.embedders.1.model.", "conditioner.embedders.0.model."  # OpenCLIP's
PROMPTS = ["a photograph of an astronaut riding a horse", "watercolor fox in the snow, 4k"]


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Keys (transformers 5's CLIPTextModel names them without `text_model.`) and shapes, buffers left out."""
    return {k.removeprefix("text_model."): tuple(v.shape) for k, v in state.items() if not k.endswith("position_ids")}


# ---- full size -------------------------------------------------------------------------------------

FULL_FILES = {  # diffusers' model type: ((the UNet's kind, its input channels), {tower prefix: (reference, OpenCLIP?)})
    "xl_base": (("base", 4), {VIT_L_PREFIX: (sd15_clip, False), BIG_G_PREFIX: (big_g_text_model, True)}),
    "xl_inpaint": (("base", 9), {VIT_L_PREFIX: (sd15_clip, False), BIG_G_PREFIX: (big_g_text_model, True)}),
    "xl_refiner": (("refiner", 4), {REFINER_BIG_G_PREFIX: (big_g_text_model, True)}),
}
FULL_CONFIGS = {"xl_base": SDXL_UNET, "xl_inpaint": replace(SDXL_UNET, in_channels=9), "xl_refiner": REFINER_UNET}


@pytest.mark.full_size
@pytest.mark.parametrize("model_type", list(FULL_FILES))
@torch.no_grad()
def test_full_size_layout_against_diffusers_converters(model_type):
    """A full-size file of our networks in sgm's layout (on the meta device: no memory) goes through diffusers'
    converters into exactly the keys and shapes of diffusers' and transformers' models of that type; our loader
    reads the same file as the family, with the full configurations."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    (kind, in_channels), towers = FULL_FILES[model_type]
    make, name = DETECTION[model_type]
    state = make()
    with torch.device("meta"):
        unet, vae = sdxl_unet(kind, in_channels), sd15_vae()  # SDXL's VAE has SD's architecture
        assert shapes(convert_ldm_unet_checkpoint(state, dict(unet.config))) == shapes(unet.state_dict())
        assert shapes(convert_ldm_vae_checkpoint(state, dict(vae.config))) == shapes(vae.state_dict())
        for prefix, (build, open_clip) in towers.items():
            tower = build()
            converted = (convert_open_clip_checkpoint(tower, state, prefix) if open_clip
                         else convert_ldm_clip_checkpoint(state))
            assert shapes(converted) == shapes(tower.state_dict()), prefix
    family = detect_family(PATH, state)
    parts = split_checkpoint(PATH, state, family)
    assert family is FAMILIES[name] and family.configs["unet"](parts["unet"]) == FULL_CONFIGS[model_type]
    assert [family.configs[spec.name](parts[spec.name]) for spec in family.text_encoders] == (
        [BIG_G] if model_type == "xl_refiner" else [VIT_L, BIG_G])


@pytest.mark.full_size
@torch.no_grad()
def test_full_size_unet_against_diffusers():
    """SDXL's UNet (2.6 B parameters, 9.6 GiB): ours and diffusers' read the same tensors (the reference built on
    the meta device and given its weights by assignment, ours by `build_network`); the vector of ours is the
    pooled text and the size, crop and target embeddings (`sd.micro_conditioning.embed`), diffusers' from
    added_cond_kwargs text_embeds and time_ids. In bfloat16: beside the suite's session-wide SD v1.5 models, a
    float32 copy would take the suite past its 20 GB of resident memory."""
    ref = random_on_meta(sdxl_unet, seed=51, dtype=torch.bfloat16)
    weights = {k[len(UNET_PREFIX):]: v for k, v in to_compvis("unet", ref, SDXL_UNET).items()}
    assert SDXL.configs["unet"](weights) == SDXL_UNET
    unet = build_network(PATH, SDXL, "unet", weights, "cpu", None)
    assert {p.data_ptr() for p in unet.parameters()} == {p.data_ptr() for p in ref.parameters()}  # one copy
    gen = torch.Generator().manual_seed(0)
    latents, context = (torch.randn(shape, generator=gen).bfloat16() for shape in ((2, 4, 16, 16), (2, 77, 2048)))
    pooled, t = torch.randn(2, 1280, generator=gen).bfloat16(), torch.tensor([10, 700])
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024],
                             [1536, 640, 96, 32, 832, 1216]])  # (h, w, top, left, h, w) each
    expected = ref(latents, t, encoder_hidden_states=context,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    out = unet(latents, t, Conditioning(context, vector=embed(pooled, time_ids)))
    assert rel_err(out, expected) < 1e-4


@pytest.mark.full_size
@torch.no_grad()
def test_full_size_text_towers_against_transformers():
    """CLIP ViT-L (transformers' names, under sgm's prefix) and OpenCLIP bigG (all 32 layers and the projection,
    OpenCLIP's names): the context is ViT-L's penultimate layer (the N-th last for clip skip N > 2), padded with
    EOS, then bigG's penultimate layer, padded with 0, neither normed; the pooled vector is bigG's text_embeds."""
    vit_l, big_g = random_on_meta(sd15_clip, seed=52), random_on_meta(big_g_text_model, seed=53)
    state = {**to_compvis("clip", vit_l, VIT_L, prefix=VIT_L_PREFIX), **to_open_clip(big_g, 54, BIG_G_PREFIX)}
    parts = split_checkpoint(PATH, state, SDXL)
    stack = [TextEncoder(spec, build_network(PATH, SDXL, spec.name, parts[spec.name], "cpu", None))
             for spec in SDXL.text_encoders]
    assert [encoder.network.config for encoder in stack] == [VIT_L, BIG_G]
    parser = PromptParser(CLIPTokenizer())
    parsed = [parser.parse(p) for p in PROMPTS]
    ids = {pad: reference_tokenizer(**options)(PROMPTS, padding="max_length", max_length=77,
                                               return_tensors="pt").input_ids  # (2, 77)
           for pad, options in ((None, {}), (0, {"pad_token": "!"}))}  # ViT-L's pad (EOS), bigG's ("!": 0)
    for pad, padded in ids.items():
        assert torch.equal(torch.tensor([p.chunks[0].padded_with(pad) for p in parsed]), padded)
    out_l, out_g = vit_l(ids[None], output_hidden_states=True), big_g(ids[0], output_hidden_states=True)
    context, pooled = encode(stack, parsed)  # (2, 77, 2048), (2, 1280)
    assert rel_err(context, torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)) < 1e-4
    assert rel_err(pooled, out_g.text_embeds) < 1e-4
    for clip_skip in (2, 3):  # ViT-L alone: bigG's layer stays
        assert rel_err(stack[0]([p.chunks[0] for p in parsed], clip_skip)[0],
                       out_l.hidden_states[-max(clip_skip, 2)]) < 1e-4, clip_skip


# ---- end to end at reduced width -------------------------------------------------------------------

TEXT_L, TEXT_G = (128, 4), (192, 3)  # (width, layers): ViT-L with 2 heads, bigG with 3 (and its projection)
CONTEXT = TEXT_L[0] + TEXT_G[0]
SMALL_UNET = replace(SDXL_UNET, model_channels=32, context_dim=CONTEXT,
                     adm_in_channels=vector_width(TEXT_G[0], SDXL.micro_conditions))  # widths 32, 64, 128
SMALL_REFINER_UNET = replace(REFINER_UNET, model_channels=32, context_dim=TEXT_G[0],
                             adm_in_channels=vector_width(TEXT_G[0], SDXL_REFINER.micro_conditions))
SMALL_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 2))
SMALL_VIT_L = CLIPConfig(width=TEXT_L[0], layers=TEXT_L[1], heads=2)
WIDTH, HEIGHT, STEPS, GUIDANCE = 96, 64, 6, 7.5
PROMPT, NEGATIVE = "a red bicycle leaning on a stone wall, golden hour", "blurry, low quality"


def widths(config) -> tuple[int, ...]:
    return tuple(config.model_channels * m for m in config.channel_mult)


@pytest.fixture(scope="module")
def xl_refs():
    def unet(kind, config, seed):
        return randomize_(sdxl_unet(kind, config.in_channels, widths(config), config.context_dim, TEXT_G[0]), seed)
    return SimpleNamespace(unet=unet("base", SMALL_UNET, 41),
                           inpaint_unet=unet("base", replace(SMALL_UNET, in_channels=9), 42),
                           refiner_unet=unet("refiner", SMALL_REFINER_UNET, 43),
                           vit_l=randomize_(sd15_clip(*TEXT_L), 44), big_g=randomize_(big_g_text_model(*TEXT_G), 45),
                           refiner_big_g=randomize_(big_g_text_model(*TEXT_G), 46),
                           vae=randomize_(small_vae(scaling_factor=0.13025), 47))


ALPHAS_CUMPROD = compvis.training_buffers()["alphas_cumprod"]
SGM_BUFFERS = {  # what sgm's DiffusionEngine writes beside the weights (AUTOMATIC1111's merges carry denoiser.sigmas)
    VIT_L_PREFIX + "embeddings.position_ids": torch.arange(77)[None],
    "denoiser.sigmas": ((1 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD) ** 0.5,
}


@pytest.fixture(scope="module")
def xl_files(tmp_path_factory, xl_refs):
    """The reduced base, inpainting and refiner files in sgm's layout, the VAE without a stored scale (SDXL's)."""
    folder = tmp_path_factory.mktemp("sdxl")
    vae = to_compvis("vae", xl_refs.vae, SMALL_VAE)
    base = {**SGM_BUFFERS, **vae, **to_compvis("clip", xl_refs.vit_l, SMALL_VIT_L, prefix=VIT_L_PREFIX),
            **to_open_clip(xl_refs.big_g, 48, BIG_G_PREFIX)}
    return {"base": compvis.save_checkpoint({**base, **to_compvis("unet", xl_refs.unet, SMALL_UNET)},
                                            folder / "base.safetensors"),
            "inpainting": compvis.save_checkpoint(
                {**base, **to_compvis("unet", xl_refs.inpaint_unet, replace(SMALL_UNET, in_channels=9))},
                folder / "inpainting.safetensors"),
            "refiner": compvis.save_checkpoint({**vae, **to_open_clip(xl_refs.refiner_big_g, 49, REFINER_BIG_G_PREFIX),
                                                **to_compvis("unet", xl_refs.refiner_unet, SMALL_REFINER_UNET)},
                                               folder / "refiner.ckpt")}


@pytest.fixture(scope="module")
def xl(xl_files):
    return StableDiffusion.from_checkpoint(xl_files["base"])


@pytest.fixture(scope="module")
def refiner(xl_files):
    return StableDiffusion.from_checkpoint(xl_files["refiner"])


def xl_pipe(cls, refs, sampler: str, unet=None, refiner: bool = False, **config):
    """diffusers' SDXL pipeline `cls` of the reduced references: the base's two towers and `unet` (default the
    base's), or the refiner's (bigG alone, aesthetic scores); the sampler's scheduler configured as SD's."""
    scheduler, _ = reference_scheduler(sampler, {})
    towers = (dict(text_encoder=None, tokenizer=None, text_encoder_2=refs.refiner_big_g, requires_aesthetics_score=True)
              if refiner else dict(text_encoder=refs.vit_l, tokenizer=reference_tokenizer(), text_encoder_2=refs.big_g))
    pipe = cls(vae=refs.vae, unet=refs.refiner_unet if refiner else unet or refs.unet, scheduler=scheduler,
               tokenizer_2=reference_tokenizer(pad_token="!"), add_watermarker=False, **towers, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(sd: StableDiffusion, method: str, sampler: str, seed, **inputs):
    return run_ours(sd, method, seed, **{"prompt": PROMPT, "negative_prompt": NEGATIVE, "sampler": sampler,
                                         "steps": STEPS, "guidance_scale": GUIDANCE, **inputs})


def theirs(pipe, seed, **inputs):
    return run_reference(pipe, seed, **{"prompt": PROMPT, "negative_prompt": NEGATIVE, "num_inference_steps": STEPS,
                                        "guidance_scale": GUIDANCE, **inputs})


SIZE = dict(width=WIDTH, height=HEIGHT)


def test_the_small_files_load_as_sdxl(xl, refiner, xl_files):
    models = xl.models
    assert (models.family, models.scale_factor, models.image_size) == (SDXL, 0.13025, 1024)
    assert models.unet.config == SMALL_UNET and widths(SMALL_UNET) == (32, 64, 128)
    assert models.clip.config == SMALL_VIT_L
    assert models.clip_g.config == CLIPConfig(width=TEXT_G[0], layers=TEXT_G[1], heads=3, activation="gelu",
                                              projection_dim=TEXT_G[0])
    assert (refiner.models.family, refiner.models.clip, refiner.models.unet.config) == (SDXL_REFINER, None,
                                                                                         SMALL_REFINER_UNET)
    assert StableDiffusion.from_checkpoint(xl_files["inpainting"]).models.family is SDXL_INPAINTING


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_text_to_image(xl_refs, xl, sampler):
    assert_same(ours(xl, "text_to_image", sampler, 11, **SIZE),
                theirs(xl_pipe(StableDiffusionXLPipeline, xl_refs, sampler), 11, **SIZE))


def test_micro_conditions(xl_refs, xl):
    """Original size (h, w), crop (top, left) and target size (h, w) other than the defaults, each pair uneven."""
    sizes = dict(original_size=(1536, 640), target_size=(832, 1216))
    assert_same(ours(xl, "text_to_image", "euler", 2, crop=(96, 32), **sizes, **SIZE),
                theirs(xl_pipe(StableDiffusionXLPipeline, xl_refs, "euler"), 2, crops_coords_top_left=(96, 32),
                       **sizes, **SIZE))


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_karras"])
def test_image_to_image(xl_refs, xl, sampler):
    inputs = dict(image=init_image(), strength=0.6)
    assert_same(ours(xl, "image_to_image", sampler, 5, **inputs),
                theirs(xl_pipe(StableDiffusionXLImg2ImgPipeline, xl_refs, sampler), 5, **inputs))


@pytest.mark.parametrize("model, strength", [("inpainting", 1.0), ("inpainting", 0.7), ("base", 1.0)])
def test_inpainting(xl_refs, xl, xl_files, model, strength):
    """The 9-channel SDXL inpainting UNet (mask and masked image as input), and the base's 4-channel UNet (the
    known region blended back after every step)."""
    sd = xl if model == "base" else StableDiffusion.from_checkpoint(xl_files["inpainting"])
    inputs = dict(image=init_image(), mask_image=mask_image(), strength=strength)
    pipe = xl_pipe(StableDiffusionXLInpaintPipeline, xl_refs, "dpmpp_2m_karras",
                   xl_refs.unet if model == "base" else xl_refs.inpaint_unet)
    assert_same(ours(sd, "inpaint", "dpmpp_2m_karras", 9, image=init_image(), mask=mask_image(), strength=strength),
                theirs(pipe, 9, **inputs, **SIZE))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_refiner_hand_off(xl_refs, xl, refiner, sampler):
    """Ours: the base with `refiner=` and `refiner_switch=0.8`, one generator; diffusers: the base with
    denoising_end=0.8 to latents, then the refiner's image-to-image pipeline (as its files configure it) with
    denoising_start=0.8, the same generator object passed on. Heun's second-order step is split by diffusers'
    rule (the refiner takes one more entry where an even count would split it)."""
    generator = torch.Generator("cpu").manual_seed(7)
    base_steps, latents = run_reference(xl_pipe(StableDiffusionXLPipeline, xl_refs, sampler), generator,
                                        output_type="latent", prompt=PROMPT, negative_prompt=NEGATIVE,
                                        num_inference_steps=STEPS, guidance_scale=GUIDANCE, denoising_end=0.8, **SIZE)
    refiner_steps, images = theirs(xl_pipe(StableDiffusionXLImg2ImgPipeline, xl_refs, sampler, refiner=True,
                                           force_zeros_for_empty_prompt=False), generator, image=latents,
                                   denoising_start=0.8)
    mine = ours(xl, "text_to_image", sampler, 7, refiner=refiner, refiner_switch=0.8, **SIZE)
    assert 0 < len(base_steps) < len(mine[0]) == len(base_steps) + len(refiner_steps)
    if sampler == "lms":  # our LMS's order grows with the slopes its run has seen (k-diffusion's), where
        # diffusers' takes the step index's: its refiner weighs its first slope as a fourth-order method's last
        assert max(rel_err(a, b) for a, b in zip(mine[0], base_steps)) < 1e-3
        return
    assert_same(mine, (base_steps + refiner_steps, images))


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_karras", "ddim"])
def test_an_image_to_image_base_that_begins_past_the_switch_hands_over_where_it_began(xl, refiner, sampler):
    """Strength 0.1 of 10 steps begins at the 10th step, past the switch at 0.8: the base runs no step and the
    refiner begins where the image was noised, not at the switch (diffusers' denoising_start would begin there,
    on latents noised for a later step: AUTOMATIC1111 switches on the run's own steps, as here)."""
    seen = []
    xl.image_to_image(PROMPT, init_image(), strength=0.1, steps=10, sampler=sampler, seed=3, refiner=refiner,
                      refiner_switch=0.8, output_type="latent", progress=False,
                      callback=lambda i, t, x, x0: seen.append(float(t)), **SIZE)
    schedule = make_sampler(sampler)
    schedule.set_timesteps(10)
    schedule.set_strength(0.1)
    assert seen == schedule.timesteps[schedule.begin_index:].tolist() and len(seen) == 1


def test_refiner_image_to_image_with_aesthetic_scores(xl_refs, refiner):
    scores = dict(aesthetic_score=7.5, negative_aesthetic_score=1.5)
    assert_same(ours(refiner, "image_to_image", "dpmpp_2m_karras", 6, image=init_image(), strength=0.6, **scores),
                theirs(xl_pipe(StableDiffusionXLImg2ImgPipeline, xl_refs, "dpmpp_2m_karras", refiner=True), 6,
                       image=init_image(), strength=0.6, **scores))


@pytest.mark.parametrize("model", ["base", "refiner"])
def test_an_empty_negative_is_zeros(xl_refs, xl, refiner, model):
    """AUTOMATIC1111's rule: a negative prompt "" conditions as zeros (context and pooled), what diffusers does when
    no negative prompt is given (force_zeros_for_empty_prompt; the refiner's files switch it off, diffusers then
    encodes "": here it is on, AUTOMATIC1111's rule for both)."""
    if model == "base":
        mine = ours(xl, "text_to_image", "euler_a", 3, negative_prompt="", **SIZE)
        reference = theirs(xl_pipe(StableDiffusionXLPipeline, xl_refs, "euler_a"), 3, negative_prompt=None, **SIZE)
    else:
        mine = ours(refiner, "image_to_image", "euler_a", 3, negative_prompt="", image=init_image(), strength=0.6)
        reference = theirs(xl_pipe(StableDiffusionXLImg2ImgPipeline, xl_refs, "euler_a", refiner=True,
                                   force_zeros_for_empty_prompt=True), 3, negative_prompt=None, image=init_image(),
                           strength=0.6)
    assert_same(mine, reference)


LONG_TEXT = ("a photograph of (an astronaut:1.3) (riding a horse) on the moon" + " in the style of an old master" * 12
             + " BREAK [a quiet lake] at dawn")  # 95 tokens (chunks of 75 and 20), then BREAK: a third chunk
LONG_RUNS = [("a photograph of ", 1.0), ("an astronaut", 1.3), (" ", 1.0), ("riding a horse", 1.1),
             (" on the moon" + " in the style of an old master" * 12, 1.0), None, ("a quiet lake", 1 / 1.1),
             (" at dawn", 1.0)]
NEGATIVE_TEXT, NEGATIVE_RUNS = "(blurry:1.4) low quality", [("blurry", 1.4), (" low quality", 1.0)]


def reference_xl_context(refs, runs, chunks: int = 0, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """AUTOMATIC1111's SDXL encoding written out over transformers: each chunk read by both towers (ViT-L padded
    with EOS, at hidden_states[-N] for clip skip N > 2, else the penultimate; bigG padded with 0, penultimate;
    neither normed), the emphasis on each tower's output, concatenated; the pooled vector: bigG's text_embeds of
    the first chunk. Returns (context (1, 77 k, C), pooled (1, P))."""
    parts, pooled = [], None
    for (ids_l, weights), (ids_g, _) in zip(reference_chunks(runs, chunks), reference_chunks(runs, chunks, pad_id=0)):
        out_l, out_g = refs.vit_l(ids_l, output_hidden_states=True), refs.big_g(ids_g, output_hidden_states=True)
        parts.append(torch.cat([emphasized(out_l.hidden_states[-max(clip_skip, 2)], weights),
                                emphasized(out_g.hidden_states[-2], weights)], dim=-1))
        pooled = out_g.text_embeds if pooled is None else pooled
    return torch.cat(parts, dim=1), pooled


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_weighted_long_prompt_with_break_and_clip_skip(xl_refs, xl, clip_skip):
    """Our pipeline given the text; diffusers' given AUTOMATIC1111's encoding of it (`reference_xl_context`). Clip
    skip is AUTOMATIC1111's sdxl_clip_l_skip: ViT-L's N-th last layer (1 and 2 both the penultimate), bigG's stays."""
    with torch.no_grad():
        prompt_embeds, pooled = reference_xl_context(xl_refs, LONG_RUNS, clip_skip=clip_skip)
        negative_embeds, negative_pooled = reference_xl_context(xl_refs, NEGATIVE_RUNS, prompt_embeds.shape[1] // 77,
                                                                clip_skip)
    assert prompt_embeds.shape == (1, 3 * 77, CONTEXT)
    mine = ours(xl, "text_to_image", "euler_a", 3, prompt=LONG_TEXT, negative_prompt=NEGATIVE_TEXT,
                clip_skip=clip_skip, **SIZE)
    reference = run_reference(xl_pipe(StableDiffusionXLPipeline, xl_refs, "euler_a"), 3, prompt_embeds=prompt_embeds,
                              pooled_prompt_embeds=pooled, negative_prompt_embeds=negative_embeds,
                              negative_pooled_prompt_embeds=negative_pooled, num_inference_steps=STEPS,
                              guidance_scale=GUIDANCE, **SIZE)
    assert_same(mine, reference)


def test_deep_cache_against_the_deepcache_package(xl_refs, xl):
    """DeepCache on SDXL as the `deepcache` package runs it on diffusers' SDXL pipeline (same interval and branch);
    interval 1 is the plain run, bit for bit, and a cached run is another image."""
    DeepCacheSDHelper = pytest.importorskip("DeepCache").DeepCacheSDHelper
    pipe = xl_pipe(StableDiffusionXLPipeline, xl_refs, "dpmpp_2m_karras")
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        reference = theirs(pipe, 4, **SIZE)
    finally:
        helper.disable()
    cached = ours(xl, "text_to_image", "dpmpp_2m_karras", 4, deep_cache=3, **SIZE)
    assert_same(cached, reference)
    plain = ours(xl, "text_to_image", "dpmpp_2m_karras", 4, **SIZE)
    assert torch.equal(ours(xl, "text_to_image", "dpmpp_2m_karras", 4, deep_cache=1, **SIZE)[0][-1], plain[0][-1])
    assert not torch.allclose(cached[0][-1], plain[0][-1], atol=1e-3)


def test_token_merging_against_tomesd(xl_refs, xl):
    """Token merging on SDXL by default merges in the UNet's finest transformers, at half the latents' size (SDXL has
    no attention at its first level): as tomesd's patch runs diffusers' SDXL pipeline with max_downsample 2 (its
    bound counts from the latents); another image than the plain run, which ratio 0 gives bit for bit."""
    tomesd = pytest.importorskip("tomesd")
    pipe = xl_pipe(StableDiffusionXLPipeline, xl_refs, "dpmpp_2m_karras")
    tomesd.apply_patch(pipe, ratio=0.5, max_downsample=2, use_rand=False)
    try:
        reference = theirs(pipe, 4, **SIZE)
    finally:
        tomesd.remove_patch(pipe)
    merged = ours(xl, "text_to_image", "dpmpp_2m_karras", 4, token_merging=0.5, **SIZE)
    assert_same(merged, reference)
    plain = ours(xl, "text_to_image", "dpmpp_2m_karras", 4, **SIZE)[0][-1]
    assert not torch.allclose(merged[0][-1], plain, atol=1e-3)
    assert torch.equal(ours(xl, "text_to_image", "dpmpp_2m_karras", 4, token_merging=0.0, **SIZE)[0][-1], plain)


def test_hires_fix_on_sdxl(xl):
    """The hires fix upscales to SDXL's side multiple (32): 96x64 by 1.5 is 144x96, rounded down to 128x96; its
    second pass is image-to-image of the base latents upscaled to that size."""
    base = dict(steps=4, seed=8, width=WIDTH, height=HEIGHT, progress=False)
    out = xl.hires_fix(PROMPT, hires_scale=1.5, hires_strength=0.6, output_type="latent", **base)
    first = xl.generate(PROMPT, output_type="latent", **base)  # (1, 4, 8, 12)
    upscaled = F.interpolate(first, size=(12, 16), mode="bilinear")
    second = {k: v for k, v in base.items() if k not in ("width", "height")}
    expected = xl.generate(PROMPT, image_latents=upscaled, strength=0.6, output_type="latent", **second)
    assert out.shape == (1, 4, 12, 16) and torch.equal(out, expected)
    image = xl.decode(out, "np")
    assert image.shape == (1, 96, 128, 3) and np.isfinite(image).all()
