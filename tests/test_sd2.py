"""SD 2.x against the references: the OpenCLIP ViT-H text tower against transformers' CLIPTextModel as diffusers
builds SD 2's (23 layers, exact GELU) and the UNet at SD 2's configuration against diffusers' UNet2DConditionModel,
both at full size with seeded random weights written in the original layout (proven by diffusers' own
converters); the family detector against diffusers' `infer_diffusers_model_type`; the tokenizer's pad 0 against
transformers'; and the pipeline end to end against diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline with
v-prediction schedulers, latents after every step, for every sampler, at reduced widths with SD 2's block
structure (heads of 64 channels, Linear projections, exact GELU, conditioning on the penultimate layer).
"""

import contextlib
import copy
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers", reason="diffusers is a test-only reference: pip install -r requirements-test.txt")
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline  # noqa: E402

from sd.checkpoint import build_network, load_checkpoint, split_checkpoint  # noqa: E402
from sd.clip import CLIPConfig, CLIPTextModel  # noqa: E402
from sd.families import FAMILIES, SD2, SD2_INPAINTING, UNET_PREFIX  # noqa: E402
from sd.layouts import OPEN_CLIP  # noqa: E402
from sd.pipeline import StableDiffusion  # noqa: E402
from sd.prompt import PromptParser, TextEncoder  # noqa: E402
from sd.samplers import SAMPLERS, NoiseSchedule  # noqa: E402
from sd.tokenizer import CLIPTokenizer  # noqa: E402
from sd.unet import UNet, UNetConfig  # noqa: E402
from sd.vae import AutoencoderKL, VAEConfig  # noqa: E402
from tests import compvis  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.pipelines import (assert_same, reference_context, reference_pipeline, reference_tokenizer,  # noqa: E402
                             run_ours, run_reference)
from tests.reference import (randomize_, sd2_text_model, sd2_unet, small_vae, to_compvis,  # noqa: E402
                             to_open_clip)
from tests.test_pipeline import init_image, mask_image  # noqa: E402

PATH = Path("v2-1_768-ema-pruned.safetensors")  # named in messages only
FULL_UNET = UNetConfig(context_dim=1024, head_channels=64, linear_proj=True)
FULL_TEXT = CLIPConfig(width=1024, layers=24, heads=16, activation="gelu", projection_dim=1024)
PROMPTS = ["a photograph of an astronaut riding a horse", "watercolor fox in the snow, 4k"]


def encoder_inputs(prompts: list[str]):
    """Our parser's first chunk of each prompt, and transformers' ids of SD 2's tokenizer (pad "!")."""
    chunks = [PromptParser(CLIPTokenizer()).parse(p).chunks[0] for p in prompts]
    ids = reference_tokenizer(pad_token="!")(prompts, padding="max_length", max_length=77,
                                             return_tensors="pt").input_ids  # (N, 77)
    return chunks, ids


@pytest.mark.full_size
@torch.no_grad()
def test_full_size_text_tower_against_transformers():
    ref = randomize_(sd2_text_model(), seed=21)
    weights = split_checkpoint(PATH, to_open_clip(ref, seed=22), SD2)["clip"]
    assert SD2.configs["clip"](weights) == FULL_TEXT
    encoder = TextEncoder(SD2.text_encoders[0], build_network(PATH, SD2, "clip", weights, "cpu", None))
    chunks, ids = encoder_inputs(PROMPTS)
    assert torch.equal(torch.tensor([c.padded_with(0) for c in chunks]), ids)  # BOS, tokens, EOS, then 0s
    out = ref(ids, output_hidden_states=True)
    for clip_skip, theirs in ((1, out.last_hidden_state), (2, ref.final_layer_norm(out.hidden_states[-2]))):
        ours, pooled = encoder(chunks, clip_skip)  # (2, 77, 1024)
        assert pooled is None and rel_err(ours, theirs) < 1e-4, clip_skip


@pytest.mark.full_size
@torch.no_grad()
def test_full_size_unet_against_diffusers():
    """The UNet's weights in the CompVis layout (diffusers' convert_ldm_unet_checkpoint says which key each has),
    its configuration read off their shapes, sharing the reference's tensors (no second 3.5 GB copy)."""
    ref = randomize_(sd2_unet(), seed=23)
    weights = {k[len(UNET_PREFIX):]: v for k, v in to_compvis("unet", ref, FULL_UNET).items()}
    assert SD2.configs["unet"](weights) == FULL_UNET
    unet = build_network(PATH, SD2, "unet", weights, "cpu", None)
    gen = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 24, 16, generator=gen), torch.randn(2, 77, 1024, generator=gen)
    t = torch.tensor([10, 700])
    expected = ref(latents, t, encoder_hidden_states=context).sample
    assert rel_err(unet(latents, t, context), expected) < 1e-4


# ---- the family detector ---------------------------------------------------------------------------

def meta_state(unet: UNetConfig, towers: dict[str, tuple[CLIPConfig, bool]]) -> dict[str, torch.Tensor]:
    """A full-size file's keys and shapes on the meta device: the UNet, the VAE, and each text tower under its
    prefix (True: in OpenCLIP's layout)."""
    with torch.device("meta"):
        state = {UNET_PREFIX + k: v for k, v in UNet(unet).state_dict().items()}
        state |= {"first_stage_model." + k: v for k, v in AutoencoderKL().state_dict().items()}
        for prefix, (cfg, open_clip) in towers.items():
            weights = CLIPTextModel(cfg).state_dict()
            state |= {prefix + k: v for k, v in (OPEN_CLIP.write(weights) if open_clip else weights).items()}
    return state


VIT_L, VIT_H = CLIPConfig(), FULL_TEXT
BIG_G = CLIPConfig(width=1280, layers=32, heads=20, activation="gelu", projection_dim=1280)
SDXL_UNET = UNetConfig(channel_mult=(1, 2, 4), attention_levels=(1, 2), context_dim=2048, head_channels=64,
                       linear_proj=True, transformer_depth=(0, 2, 10), adm_in_channels=2816)
REFINER_UNET = UNetConfig(model_channels=384, attention_levels=(1, 2), context_dim=1280, head_channels=64,
                          linear_proj=True, transformer_depth=4, adm_in_channels=2560)
XL_TOWERS = {"conditioner.embedders.0.transformer.text_model.": (VIT_L, False),
             "conditioner.embedders.1.model.": (BIG_G, True)}
DETECTION = {  # diffusers' model type: (a file of that type, our family)
    "v1": (lambda: meta_state(UNetConfig(), {"cond_stage_model.transformer.text_model.": (VIT_L, False)}), "sd1"),
    "inpainting": (lambda: meta_state(UNetConfig(in_channels=9),
                                      {"cond_stage_model.transformer.text_model.": (VIT_L, False)}), "sd1-inpainting"),
    "v2": (lambda: meta_state(FULL_UNET, {"cond_stage_model.model.": (VIT_H, True)}), "sd2"),
    "inpainting_v2": (lambda: meta_state(UNetConfig(**{**FULL_UNET.__dict__, "in_channels": 9}),
                                         {"cond_stage_model.model.": (VIT_H, True)}), "sd2-inpainting"),
    "xl_base": (lambda: meta_state(SDXL_UNET, XL_TOWERS), "sdxl"),
    "xl_inpaint": (lambda: meta_state(UNetConfig(**{**SDXL_UNET.__dict__, "in_channels": 9}), XL_TOWERS),
                   "sdxl-inpainting"),
    "xl_refiner": (lambda: meta_state(REFINER_UNET, {"conditioner.embedders.0.model.": (BIG_G, True)}),
                   "sdxl-refiner"),
}


@pytest.mark.parametrize("model_type", list(DETECTION))
def test_family_detector_against_diffusers(model_type):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    make, name = DETECTION[model_type]
    state = make()
    assert infer_diffusers_model_type(state) == model_type
    assert next(f for f in FAMILIES.values() if f.detect(state)).name == name


def test_detection_covers_every_family():
    assert {name for _, name in DETECTION.values()} == FAMILIES.keys()


def test_tokenizer_pads_with_zero_as_transformers_does():
    """Padding with id 0 after the end-of-text token, as transformers' tokenizer with SD 2's pad token "!" does."""
    prompts = ["a cat", "", "hello world, 4k", "a (red:1.3) ball"]
    chunks, ids = encoder_inputs([p.replace("(red:1.3)", "red") for p in prompts])
    weighted = [PromptParser(CLIPTokenizer()).parse(p).chunks[0] for p in prompts]
    assert [c.padded_with(0) for c in weighted] == [c.padded_with(0) for c in chunks] == ids.tolist()
    assert ids[1].tolist() == [49406, 49407] + [0] * 75


def test_a_literal_exclamation_mark_stays_a_word():
    """Decided: a "!" the prompt holds is OpenCLIP's token "!</w>" (256), what the tower was trained on and what
    AUTOMATIC1111 (OpenCLIP's tokenizer) gives; transformers' tokenizer with pad token "!" turns it into the pad
    id 0 (diffusers #4153), which would silently drop it."""
    prompts = ["!", "hello!! world"]
    bang, double = (PromptParser(CLIPTokenizer()).parse(p).chunks[0].padded_with(0) for p in prompts)
    plain = reference_tokenizer()(prompts, padding="max_length", max_length=77).input_ids  # OpenCLIP's tokens
    assert bang[:3] == plain[0][:3] == [49406, 256, 49407] and double[:5] == plain[1][:5]
    padded_as_bang = reference_tokenizer(pad_token="!")(prompts, padding="max_length", max_length=77).input_ids
    assert padded_as_bang[0][1] == 0 != bang[1]


# ---- end to end at reduced width -------------------------------------------------------------------

WIDTHS, TEXT_WIDTH, TEXT_LAYERS = (64, 128, 256, 256), 128, 4  # heads of 64: 1, 2, 4, 4; the tower: 2 heads
SMALL_UNET = UNetConfig(model_channels=64, context_dim=TEXT_WIDTH, head_channels=64, linear_proj=True)
SMALL_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 2))
WIDTH, HEIGHT = 96, 64
PROMPT, NEGATIVE = "a red bicycle leaning on a stone wall, golden hour", "blurry, low quality"
SETTINGS = dict(num_inference_steps=6, guidance_scale=7.5, height=HEIGHT, width=WIDTH)


@pytest.fixture(scope="module")
def sd2_refs():
    return SimpleNamespace(unet=randomize_(sd2_unet(widths=WIDTHS, context=TEXT_WIDTH), seed=31),
                           inpaint_unet=randomize_(sd2_unet(9, WIDTHS, TEXT_WIDTH), seed=32),
                           clip=randomize_(sd2_text_model(TEXT_WIDTH, TEXT_LAYERS), seed=33),
                           vae=randomize_(small_vae(), seed=34))


@pytest.fixture(scope="module")
def sd2_files(tmp_path_factory, sd2_refs):
    """The reduced SD 2.x checkpoint in the original layout: "v" (.safetensors) and "inpainting" (.ckpt)."""
    folder = tmp_path_factory.mktemp("sd2")
    common = {**compvis.training_buffers(), **to_compvis("vae", sd2_refs.vae, SMALL_VAE),
              **to_open_clip(sd2_refs.clip, seed=35)}
    inpainting = UNetConfig(**{**SMALL_UNET.__dict__, "in_channels": 9})
    return {"v": compvis.save_checkpoint({**common, **to_compvis("unet", sd2_refs.unet, SMALL_UNET)},
                                         folder / "v.safetensors"),
            "inpainting": compvis.save_checkpoint({**common, **to_compvis("unet", sd2_refs.inpaint_unet, inpainting)},
                                                  folder / "inpainting.ckpt")}


@pytest.fixture(scope="module")
def sd2(sd2_files):
    return StableDiffusion.from_checkpoint(sd2_files["v"], prediction="v")


def pipe_of(cls, sd2_refs, sampler: str, unet=None, prediction_type: str = "v_prediction"):
    return reference_pipeline(cls, sd2_refs, unet or sd2_refs.unet, sampler, tokenizer=reference_tokenizer(pad_token="!"),
                              prediction_type=prediction_type)


def ours(sd: StableDiffusion, method: str, sampler: str, seed: int, **inputs):
    return run_ours(sd, method, seed, prompt=PROMPT, negative_prompt=NEGATIVE, sampler=sampler,
                    steps=SETTINGS["num_inference_steps"], guidance_scale=SETTINGS["guidance_scale"], width=WIDTH,
                    height=HEIGHT, **inputs)


def test_the_small_files_load_as_sd2(sd2, sd2_files):
    models = sd2.models
    assert (models.family, models.prediction_type, models.prediction_rule) == (SD2, "v_prediction", "as asked")
    assert models.unet.config == SMALL_UNET and models.image_size == 768
    assert models.clip.config == CLIPConfig(width=TEXT_WIDTH, layers=TEXT_LAYERS + 1, heads=2, activation="gelu",
                                            projection_dim=TEXT_WIDTH)
    inpainting = load_checkpoint(sd2_files["inpainting"])
    assert (inpainting.family, inpainting.prediction_type, inpainting.image_size) == (SD2_INPAINTING, "epsilon", 512)


@contextlib.contextmanager
def eps_of_v(unet):
    """The v model read as CompVis' samplers read it: every call's v turned into eps at its own (integer)
    timestep, eps = sqrt(1 - a_bar) x_t + sqrt(a_bar) v."""
    forward, alphas_cumprod = unet.forward, NoiseSchedule().alphas_cumprod

    def eps_forward(sample, timestep, *args, **kwargs):
        v = forward(sample, timestep, *args, **kwargs)[0]
        a_bar = alphas_cumprod[int(timestep)]
        return ((1 - a_bar) ** 0.5 * sample + a_bar ** 0.5 * v,)

    unet.forward = eps_forward
    try:
        yield
    finally:
        del unet.forward


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_text_to_image_with_v_prediction(sd2_refs, sd2, sampler):
    """PLMS as CompVis' plms.py (SD 2's own code) runs a v model: each call's v made eps, then the multistep
    combination; diffusers' PNDM combines the v's and converts the mix once, with the newest sample, which is
    another method. Its oracle is diffusers' PNDM in epsilon mode over the v model's eps (`eps_of_v`)."""
    prediction = "epsilon" if sampler == "plms" else "v_prediction"
    with eps_of_v(sd2_refs.unet) if sampler == "plms" else contextlib.nullcontext():
        theirs = run_reference(pipe_of(StableDiffusionPipeline, sd2_refs, sampler, prediction_type=prediction), 11,
                               prompt=PROMPT, negative_prompt=NEGATIVE, **SETTINGS)
    assert_same(ours(sd2, "text_to_image", sampler, seed=11), theirs)


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_karras"])
def test_image_to_image_with_v_prediction(sd2_refs, sd2, sampler):
    inputs = dict(image=init_image(), strength=0.6)
    assert_same(ours(sd2, "image_to_image", sampler, seed=5, **inputs),
                run_reference(pipe_of(StableDiffusionImg2ImgPipeline, sd2_refs, sampler), 5, prompt=PROMPT,
                              negative_prompt=NEGATIVE, **SETTINGS, **inputs))


def test_inpainting_with_the_v_model(sd2_refs, sd2):
    """The 4-channel v model: the known region blended back after every step."""
    inputs = dict(image=init_image(), strength=1.0)
    assert_same(ours(sd2, "inpaint", "euler_a", seed=3, mask=mask_image(), **inputs),
                run_reference(pipe_of(StableDiffusionInpaintPipeline, sd2_refs, "euler_a"), 3, prompt=PROMPT,
                              negative_prompt=NEGATIVE, mask_image=mask_image(), **SETTINGS, **inputs))


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_sd2_inpainting_checkpoint(sd2_refs, sd2_files, strength):
    """512-inpainting-ema: the 9-channel UNet, epsilon."""
    inputs = dict(image=init_image(), strength=strength)
    sd = StableDiffusion.from_checkpoint(sd2_files["inpainting"])
    pipe = pipe_of(StableDiffusionInpaintPipeline, sd2_refs, "dpmpp_2m_karras", sd2_refs.inpaint_unet, "epsilon")
    assert_same(ours(sd, "inpaint", "dpmpp_2m_karras", seed=9, mask=mask_image(), **inputs),
                run_reference(pipe, 9, prompt=PROMPT, negative_prompt=NEGATIVE, mask_image=mask_image(), **SETTINGS,
                              **inputs))


LONG_TEXT = "a photograph of (an astronaut:1.3) (riding a horse) on the moon" + " in the style of an old master" * 25
LONG_RUNS = [("a photograph of ", 1.0), ("an astronaut", 1.3), (" ", 1.0), ("riding a horse", 1.1),
             (" on the moon" + " in the style of an old master" * 25, 1.0)]
NEGATIVE_TEXT, NEGATIVE_RUNS = "(blurry:1.4) low quality", [("blurry", 1.4), (" low quality", 1.0)]


def test_weighted_long_prompt_with_clip_skip_2(sd2_refs, sd2):
    """Our pipeline given the text; diffusers' given the reference encoding of it (A1111's chunks of 75, emphasis,
    pad 0, the penultimate layer's output one further back, then the final LayerNorm)."""
    with torch.no_grad():
        prompt_embeds = reference_context(sd2_refs.clip, LONG_RUNS, clip_skip=2, pad_id=0)
        negative_embeds = reference_context(sd2_refs.clip, NEGATIVE_RUNS, chunks=prompt_embeds.shape[1] // 77,
                                            clip_skip=2, pad_id=0)
    mine = run_ours(sd2, "text_to_image", 3, prompt=LONG_TEXT, negative_prompt=NEGATIVE_TEXT, steps=6,
                    sampler="euler_a", clip_skip=2, width=WIDTH, height=HEIGHT, guidance_scale=7.5)
    theirs = run_reference(pipe_of(StableDiffusionPipeline, sd2_refs, "euler_a"), 3, prompt_embeds=prompt_embeds,
                           negative_prompt_embeds=negative_embeds, **SETTINGS)
    assert_same(mine, theirs)



def without_last_layer(clip: CLIPTextModel) -> CLIPTextModel:
    """A view of our tower (the same layer objects) without what diffusers' 23-layer reference drops: the last
    layer and the unused projection."""
    def view(module, drop=(), **children):
        shallow = copy.copy(module)
        shallow._modules = {k: v for k, v in {**module._modules, **children}.items() if k not in drop}
        return shallow
    return view(clip, drop=("text_projection",),
                encoder=view(clip.encoder, layers=torch.nn.ModuleList(list(clip.encoder.layers)[:-1])))


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_lora_on_sd2_end_to_end(sd2_refs, sd2, tmp_path, layout):
    """A LoRA of SD 2.x's layers (attention, Linear proj_in/out, convolutions, the OpenCLIP tower's first layer)
    in kohya's or diffusers/PEFT's names, merged by us and fused by diffusers: the same run."""
    from tests.test_lora import diffusers_fused, random_lora, reference_layers
    path = tmp_path / f"{layout}.safetensors"
    save_file(random_lora(sd2.models, 5, peft=layout == "peft"), path)
    layers = reference_layers(dataclasses.replace(sd2.models, clip=without_last_layer(sd2.models.clip)), sd2_refs)
    assert any("proj_in" in name for name in layers) and any("lora_te_" in name for name in layers)
    lora = sd2.load_lora(path, 0.8)
    try:
        assert not lora.unmatched and len(lora.layers) == len(layers)
        mine = ours(sd2, "text_to_image", "dpmpp_2m_karras", seed=4)
    finally:
        sd2.unload_lora()
    with diffusers_fused(sd2_refs, [(path, 0.8)], layers) as pipe:
        v_pipe = pipe_of(StableDiffusionPipeline, sd2_refs, "dpmpp_2m_karras")
        theirs = run_reference(v_pipe, 4, prompt=PROMPT, negative_prompt=NEGATIVE, **SETTINGS)
    assert_same(mine, theirs)


def test_an_embedding_on_sd2_stands_for_its_vectors(sd2):
    """A textual-inversion embedding as wide as the OpenCLIP tower (here 128; 1024 for SD 2.x) whose vector is
    the tower's own for "cat": "a <kitty>" encodes as "a cat", padded with 0, at the penultimate layer."""
    from sd.embeddings import Embedding
    [[cat]] = sd2.tokenizer.tokenize(["cat"])
    vectors = sd2.models.clip.embeddings.token_embedding.weight[cat][None].clone()  # (1, 128)
    sd2.add_embedding(Embedding("<kitty>", vectors, Path("kitty.pt"), "0" * 64))
    try:
        with torch.no_grad():
            assert rel_err(sd2.encode_prompts(["a <kitty>"], None, 1), sd2.encode_prompts(["a cat"], None, 1)) < 1e-6
    finally:
        sd2.embeddings.clear()


def test_float16_attention_is_computed_in_float32():
    """Scores over float16's range (SD 2.1's, diffusers #1614) give the float32 answer, not inf or NaN."""
    from sd.attention import plain_attention
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 64, generator=gen) * 80 for _ in range(3))  # q.k up to ~2e5 > 65504
    expected = plain_attention(q, k, v)
    out = plain_attention(q.half(), k.half(), v.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert rel_err(out.float(), expected) < 1e-2
