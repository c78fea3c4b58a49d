"""SDXL's LoRAs and textual-inversion embeddings (`sd.lora`, `sd.embeddings`) against diffusers, on an SDXL
pipeline of reduced width with seeded random weights, written in the sgm single-file layout (the layout
diffusers' converters read): kohya's LoRAs in both UNet spellings (diffusers' names and the sgm names kohya's
SDXL trainer writes) with `lora_te1_` / `lora_te2_`, and diffusers/PEFT's (`text_encoder_2.`), merged by us and
by diffusers' `load_lora_weights` + `fuse_lora`, layer by layer and latents after every step; an LCM-LoRA of the
UNet run with the lcm sampler; `{"clip_l", "clip_g"}` embeddings against diffusers' `load_textual_inversion`
(one call per tokenizer and text encoder). Files for another family, and embeddings whose sets do not fit the
model's text encoders, are refused in one line with the model unchanged.
"""

import copy
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from sd.clip import CLIPConfig
from sd.errors import CheckpointError, InputError
from sd.families import SDXL
from sd.layouts import OPEN_CLIP
from sd.lora import lora_targets
from sd.micro_conditioning import vector_width
from sd.pipeline import StableDiffusion
from sd.unet import UNetConfig
from sd.vae import VAEConfig
from tests import compvis
from tests.conftest import rel_err
from tests.pipelines import assert_same, reference_tokenizer, run_ours, run_reference
from tests.reference import oracle, randomize_, reference_scheduler, small_vae, to_compvis
from tests.test_lora import diffusers_fused, random_lora
from tests.tiny import write_tiny_checkpoint

L_WIDTH, G_WIDTH = 64, 128  # CLIP ViT-L and bigG at reduced width (768 and 1280), heads of 64 channels
XL_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), attention_levels=(1, 2), head_channels=64,
                     context_dim=L_WIDTH + G_WIDTH, linear_proj=True, transformer_depth=(0, 1, 2),
                     adm_in_channels=vector_width(G_WIDTH, SDXL.micro_conditions))
XL_CLIP = CLIPConfig(width=L_WIDTH, layers=3, heads=1)
PREFIXES = {net: prefixes[0] for net, prefixes in SDXL.prefixes.items()}  # where the sgm file keeps each network
SETTINGS = dict(prompt="a red bicycle leaning on a stone wall", negative_prompt="blurry", width=64, height=64,
                guidance_scale=7.0)


def xl_references() -> SimpleNamespace:
    """diffusers' SDXL UNet, transformers' CLIP ViT-L and bigG (with projection) and a small VAE, as diffusers
    builds SDXL's (no attention at the first level, depths growing, Linear projections, the text_time vector), at
    reduced width, seeded."""
    diffusers, transformers = oracle("diffusers"), oracle("transformers")
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(64, 128, 128), attention_head_dim=(1, 2, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), use_linear_projection=True, cross_attention_dim=XL_UNET.context_dim,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=XL_UNET.adm_in_channels)

    def text(cls, width, act, **options):
        return cls(transformers.CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                                               num_hidden_layers=3, num_attention_heads=width // 64,
                                               max_position_embeddings=77, hidden_act=act, **options))

    vae = small_vae()
    vae.register_to_config(scaling_factor=SDXL.scale_factor)
    clip = text(transformers.CLIPTextModel, L_WIDTH, "quick_gelu")
    clip_g = text(transformers.CLIPTextModelWithProjection, G_WIDTH, "gelu", projection_dim=G_WIDTH)
    return SimpleNamespace(unet=randomize_(unet, 61), clip=randomize_(clip, 62), clip_g=randomize_(clip_g, 63),
                           vae=randomize_(vae, 64))


def xl_state(refs) -> dict[str, torch.Tensor]:
    """The references in the sgm single file's layout: the UNet and VAE by diffusers' converters (`to_compvis`),
    ViT-L under `conditioner.embedders.0.transformer.text_model.`, bigG in OpenCLIP's names under
    `conditioner.embedders.1.model.`, proven by diffusers' `convert_open_clip_checkpoint`, which reads it back."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    state = {**to_compvis("unet", refs.unet, XL_UNET),
             **to_compvis("vae", refs.vae, VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 2)))}
    vit_l = to_compvis("clip", refs.clip, XL_CLIP)  # under SD v1's prefix
    state |= {PREFIXES["clip"] + k[len(compvis.CLIP_PREFIX):]: v for k, v in vit_l.items()}
    big_g = {k: v for k, v in refs.clip_g.state_dict().items() if "position_ids" not in k}
    ours = {k.removeprefix("text_model."): v for k, v in big_g.items()}  # transformers' names are our modules'
    state |= {PREFIXES["clip_g"] + k: v for k, v in OPEN_CLIP.write(ours).items()}
    read_back = convert_open_clip_checkpoint(refs.clip_g, state, PREFIXES["clip_g"])
    assert read_back.keys() == big_g.keys() and all(torch.equal(v, big_g[k]) for k, v in read_back.items())
    return state


@pytest.fixture(scope="module")
def xl_refs():
    return xl_references()


@pytest.fixture(scope="module")
def xl(tmp_path_factory, xl_refs):
    path = compvis.save_checkpoint(xl_state(xl_refs), tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors")
    sd = StableDiffusion.from_checkpoint(path)
    assert sd.models.family == SDXL and sd.models.unet.config == XL_UNET
    return sd


def xl_pipe(refs, sampler: str, **models):
    """diffusers' SDXL pipeline of the references (`models`: others in their place), SDXL's tokenizers (bigG's
    pads with "!", id 0)."""
    scheduler, _ = reference_scheduler(sampler, {})
    pipe = oracle("diffusers").StableDiffusionXLPipeline(**{
        "vae": refs.vae, "unet": refs.unet, "text_encoder": refs.clip, "text_encoder_2": refs.clip_g,
        "tokenizer": reference_tokenizer(), "tokenizer_2": reference_tokenizer(pad_token="!"),
        "scheduler": scheduler, **models})
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- LoRAs -----------------------------------------------------------------------------------------

# The layers the test LoRAs change: every kind, in a few blocks: a downsampler and the res blocks (3x3 LoCon
# convolutions, time embedding, shortcut) and transformers of level 1, the middle, the first up level with its
# upsampler; the time and vector embeddings; the first layer of each text encoder.
CHANGED = re.compile(r"(input_blocks\.[3-5]|middle_block|output_blocks\.[23]|time_embed|label_emb|"
                     r"encoder\.layers\.0)\.")
# How each layout spells the layers, as a pattern of the names `lora_targets` gives: kohya's with diffusers' UNet
# names, kohya's with the sgm names (what kohya's SDXL trainer writes), diffusers/PEFT's with transformers 5's
# names (its CLIPTextModel has no text_model level; CLIPTextModelWithProjection keeps it).
LAYOUTS = {
    "kohya": r"lora_unet_(down_blocks|mid_block|up_blocks)_|lora_te1_text_model_|lora_te2_text_model_",
    "kohya_sgm": r"lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb)_|lora_te1_text_model_|"
                 r"lora_te2_text_model_",
    "peft": r"unet\.|text_encoder\.encoder\.|text_encoder_2\.text_model\.",
}
LCM_TARGETS = re.compile(r"lora_unet_(down_blocks|mid_block|up_blocks)_.*(to_[qkv]|to_out_0|proj_in|proj_out|"
                         r"ff_net_0_proj|ff_net_2|conv[12]|conv_shortcut|samplers_0_conv|time_emb_proj)$")  # its peft
# targets (diffusers' train_lcm_distill_lora_sdxl.py)


def changed_modules(models) -> set[torch.nn.Module]:
    """Our CHANGED layers (Linear and Conv2d)."""
    return {module for net in ("unet", "clip", "clip_g") for path, module in getattr(models, net).named_modules()
            if CHANGED.match(path + ".") and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}


def xl_lora(models, layout: str, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """A random LoRA of the CHANGED layers in `layout` (or, "lcm", of LCM-LoRA's UNet layers in kohya's names),
    both halves non-zero, with alpha (kohya's)."""
    gen, state = torch.Generator().manual_seed(seed), {}
    changed = changed_modules(models)
    for name, module in lora_targets(models).items():
        if not (LCM_TARGETS.match(name) if layout == "lcm" else re.match(LAYOUTS[layout], name) and module in changed):
            continue
        w = module.weight
        down = torch.randn(rank, *w.shape[1:], generator=gen) * 0.05  # (r, in[, k, k])
        up = torch.randn(w.shape[0], rank, *(1,) * (w.dim() - 2), generator=gen) * 0.05  # (out, r[, 1, 1])
        if layout == "peft":
            state.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
        else:
            state.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                          f"{name}.alpha": torch.tensor(2.0)})
    return state


@pytest.fixture(scope="module")
def xl_loras(tmp_path_factory, xl):
    folder = tmp_path_factory.mktemp("xl_loras")
    for seed, layout in enumerate([*LAYOUTS, "lcm"]):
        save_file(xl_lora(xl.models, layout, seed), folder / f"{layout}.safetensors")
    return {layout: folder / f"{layout}.safetensors" for layout in [*LAYOUTS, "lcm"]}


def xl_reference_layers(models, refs, lora) -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    """(our layer, the reference's) for every layer `lora` changes, by the reference's own name of it."""
    roots = {"unet.": refs.unet, "text_encoder.text_model.": refs.clip,
             "text_encoder_2.text_model.": refs.clip_g.text_model}
    targets = lora_targets(models)
    changed = {targets[name] for name in lora.layers}
    return {name: (module, root.get_submodule(name[len(prefix):])) for name, module in targets.items()
            for prefix, root in roots.items() if name.startswith(prefix) and module in changed}


def test_our_names_are_the_layers_of_diffusers_sdxl_unet(xl_refs, xl):
    """The diffusers names our rules give (label_emb: add_embedding) are exactly diffusers' SDXL UNet's layers."""
    ours = {k[len("unet."):] for k in lora_targets(xl.models) if k.startswith("unet.")}
    assert ours == {n for n, m in xl_refs.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


# layout: (sampler, guidance) of a run end to end, or None for the merged weights alone
RUNS = {"kohya": None, "peft": None, "kohya_sgm": ("dpmpp_2m_karras", 7.0), "lcm": ("lcm", 1.0)}


@pytest.mark.parametrize("layout", list(RUNS))
def test_sdxl_lora_against_diffusers(xl_refs, xl, xl_loras, layout):
    """Each layout at weight 0.8: every layer the file changes has diffusers' fused weight, and unloading restores
    every weight bit for bit. kohya's SDXL LoRA as its trainer writes it (sgm names, both text encoders), and an
    LCM-LoRA of the UNet (kohya's layout of diffusers' names, as lcm-lora-sdxl) with the lcm sampler, 4 steps,
    no guidance, also make the same run."""
    before = {net: copy.deepcopy(getattr(xl.models, net).state_dict()) for net in ("unet", "clip", "clip_g")}
    sampler, guidance = RUNS[layout] or ("euler", 7.0)
    settings = {**SETTINGS, "guidance_scale": guidance}
    lora = xl.load_lora(xl_loras[layout], 0.8)
    try:
        layers = xl_reference_layers(xl.models, xl_refs, lora)
        assert not lora.unmatched and len(lora.layers) == len(layers)
        assert {name.split(".")[0] for name in layers} == ({"unet"} if layout == "lcm" else
                                                          {"unet", "text_encoder", "text_encoder_2"})
        mine = run_ours(xl, "text_to_image", 5, steps=4, sampler=sampler, **settings) if RUNS[layout] else None
        with diffusers_fused(xl_refs, [(xl_loras[layout], 0.8)], layers, xl_pipe(xl_refs, sampler)) as pipe:
            for name, (layer, ref) in layers.items():
                assert rel_err(layer.weight, ref.weight.reshape(layer.weight.shape)) < 1e-6, name
            theirs = run_reference(pipe, 5, num_inference_steps=4, **settings) if RUNS[layout] else None
    finally:
        xl.unload_lora()
    for net, state in before.items():
        assert all(torch.equal(v, state[k]) for k, v in getattr(xl.models, net).state_dict().items()), net
    if RUNS[layout]:
        assert_same(mine, theirs)


# ---- textual inversion -----------------------------------------------------------------------------

def xl_embedding_files(folder: Path) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """SDXL embeddings, {"clip_l": (n, 64), "clip_g": (n, 128)}: kohya's .safetensors (2 vectors) and a .pt (1)."""
    gen = torch.Generator().manual_seed(7)
    files = {}
    for name, n, suffix in (("xl-style", 2, ".safetensors"), ("xl-dot", 1, ".pt")):
        vectors = {key: torch.randn(n, width, generator=gen) * 0.5 for key, width in (("clip_l", L_WIDTH),
                                                                                      ("clip_g", G_WIDTH))}
        path = folder / f"{name}{suffix}"
        if suffix == ".pt":
            torch.save(vectors, path)
        else:
            save_file(vectors, path)
        files[f"<{name}>"] = (path, vectors)
    return files


TI_PROMPT, TI_NEGATIVE = "a <xl-style> fox by <xl-dot>, golden hour", "<xl-dot>, blurry"


def test_sdxl_embeddings_against_diffusers(xl_refs, xl, tmp_path):
    """Each text encoder takes its own vectors at the same positions: diffusers' load_textual_inversion, called
    once per tokenizer and text encoder (bigG's "clip_g", ViT-L's "clip_l"), gives the same context, pooled
    vector and run."""
    files = xl_embedding_files(tmp_path)
    pipe = xl_pipe(xl_refs, "euler_a", text_encoder=copy.deepcopy(xl_refs.clip),
                   text_encoder_2=copy.deepcopy(xl_refs.clip_g))  # copies: loading resizes their token embeddings
    try:
        for token, (path, vectors) in files.items():
            pipe.load_textual_inversion(vectors["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
            pipe.load_textual_inversion(vectors["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            xl.load_embedding(path, token)
        with torch.no_grad():
            theirs, theirs_negative, pooled, pooled_negative = pipe.encode_prompt(
                TI_PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                negative_prompt=TI_NEGATIVE)
            context, our_pooled = xl.encode_text([TI_PROMPT], [TI_NEGATIVE], 1)  # (2, 77, 192), (2, 128)
        assert rel_err(context, torch.cat([theirs_negative, theirs])) < 1e-4
        assert rel_err(our_pooled, torch.cat([pooled_negative, pooled])) < 1e-4
        settings = {**SETTINGS, "prompt": TI_PROMPT, "negative_prompt": TI_NEGATIVE}
        mine = run_ours(xl, "text_to_image", 3, steps=4, sampler="euler_a", **settings)
    finally:
        xl.embeddings.clear()
    assert_same(mine, run_reference(pipe, 3, num_inference_steps=4, **settings))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return {family: StableDiffusion.from_checkpoint(write_tiny_checkpoint(folder / f"{family}.safetensors",
                                                                          family=family))
            for family in ("sd1", "sdxl-refiner")}


def test_the_refiner_takes_the_clip_g_vectors_of_an_sdxl_embedding(tiny_models, tmp_path):
    """Decided: bigG alone, the refiner reads an SDXL embedding's "clip_g" set (as diffusers and AUTOMATIC1111 give
    the refiner's tower that set): an embedding whose clip_g vector is bigG's own for "cat" reads as "cat"."""
    refiner = tiny_models["sdxl-refiner"]
    [[cat]] = refiner.tokenizer.tokenize(["cat"])
    big_g = refiner.models.clip_g.embeddings.token_embedding.weight
    save_file({"clip_l": torch.randn(1, 32), "clip_g": big_g[cat][None].clone()}, tmp_path / "kitty.safetensors")
    try:
        refiner.load_embedding(tmp_path / "kitty.safetensors", "<kitty>")
        with torch.no_grad():
            kitty, cat_text = (refiner.encode_text([prompt], None, 1) for prompt in ("a <kitty>", "a cat"))
        for mine, expected in zip(kitty, cat_text):  # the context and the pooled vector
            assert rel_err(mine, expected) < 1e-6
    finally:
        refiner.embeddings.clear()


# ---- files that do not fit -------------------------------------------------------------------------

def one_layer(name: str, down: tuple[int, ...], up: tuple[int, ...]) -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": torch.zeros(down), f"{name}.lora_up.weight": torch.zeros(up)}


TO_K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"  # reads the text context
FC1 = "text_model_encoder_layers_0_mlp_fc1"
BAD_LORAS = {  # name: (the model, (a LoRA of `lora_sources` or None, layers added or replaced), the refusal)
    "a tiny SD v1 LoRA on SDXL": ("sdxl", ("tiny SD v1", {}),
                                  "is a LoRA for another model (its cross-attention reads a text context 64 wide, "
                                  "this model's 192); this is an SDXL model: use a LoRA made for SDXL"),
    "SD v1's to_k on SDXL": ("sdxl", (None, one_layer(TO_K, (4, 768), (128, 4))),
                             "is a LoRA for SD v1 (its cross-attention reads a text context 768 wide, this model's "
                             "192)"),
    "an SDXL LoRA on a tiny SD v1": ("sd1", ("SDXL", {}),
                                     "is a LoRA for another model (its cross-attention reads a text context 192 wide, "
                                     "this model's 64); this is an SD v1 model: use a LoRA made for SD v1"),
    "SDXL's to_k on SD v1": ("sd1", (None, one_layer(TO_K, (4, 2048), (640, 4))),
                             "is a LoRA for SDXL (its cross-attention reads a text context 2048 wide"),
    "bigG's layers on SD v1": ("sd1", (None, one_layer("lora_te2_" + FC1, (2, 64), (256, 2))),
                               f"is a LoRA for SDXL (its layer lora_te2_{FC1} is of a text encoder this one lacks); "
                               f"this is an SD v1 model"),
    "an SDXL base LoRA on the refiner": ("sdxl-refiner", ("SDXL", {}),
                                         "is a LoRA for another model (its cross-attention reads a text context 192 "
                                         "wide, this model's 64); this is an SDXL refiner model"),
    "ViT-L's layers on the refiner": ("sdxl-refiner", (None, one_layer("lora_te1_" + FC1, (2, 64), (256, 2))),
                                      f"is a LoRA for another model (its layer lora_te1_{FC1} is of a text encoder "
                                      f"this one lacks); this is an SDXL refiner model"),
    "an SDXL LoRA with one bigG layer of another width": (
        "sdxl", ("SDXL", {f"lora_te2_{FC1}.lora_down.weight": torch.zeros(4, 96)}),
        f"lora_te2_{FC1} makes a change of shape (512, 96) for a layer of shape (512, 128)"),
}


@pytest.fixture(scope="module")
def lora_sources(tiny_models, xl_loras):
    from safetensors.torch import load_file
    return {"tiny SD v1": random_lora(tiny_models["sd1"].models, 8), "SDXL": load_file(xl_loras["kohya_sgm"])}


def models_of(name: str, xl: StableDiffusion, tiny: dict) -> StableDiffusion:
    return xl if name == "sdxl" else tiny[name]


def weights(sd: StableDiffusion) -> list[torch.Tensor]:
    return [p.detach().clone() for net in (sd.models.unet, *sd.models.text_towers) for p in net.parameters()]


@pytest.mark.parametrize("case", list(BAD_LORAS))
def test_a_lora_for_another_family_is_refused_and_the_model_is_unchanged(xl, tiny_models, lora_sources, tmp_path,
                                                                         case):
    model, (source, layers), message = BAD_LORAS[case]
    sd = models_of(model, xl, tiny_models)
    path = tmp_path / "other.safetensors"
    save_file({**lora_sources.get(source, {}), **layers}, path)
    before = weights(sd)
    with pytest.raises((InputError, CheckpointError), match=re.escape(str(path)) + ".*" + re.escape(message)):
        sd.load_lora(path)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(sd))) and not sd.loras.loaded


BAD_EMBEDDINGS = {  # name: (the model, the file's tensors, the refusal)
    "one set on SDXL": ("sdxl", {"emb_params": (2, 64)},
                        "is an embedding of one set of vectors, (n, 64); this model takes SDXL's, a set per text "
                        "encoder: use an embedding made for it, {'clip_l': (n, 64), 'clip_g': (n, 128)}"),
    "clip_l only": ("sdxl", {"clip_l": (2, 64)},
                    "has no vectors for this model's 'clip_g' text encoder (it holds 'clip_l')"),
    "clip_g of another width": ("sdxl", {"clip_l": (2, 64), "clip_g": (2, 96)},
                                "is an embedding whose 'clip_g' vectors are 96 wide; this model's 'clip_g' text "
                                "encoder is 128 wide"),
    "clip_l of another width": ("sdxl", {"clip_l": (1, 768), "clip_g": (1, 128)},
                                "is an embedding whose 'clip_l' vectors are 768 wide; this model's 'clip_l' text "
                                "encoder is 64 wide"),
    "sets of different lengths": ("sdxl", {"clip_l": (2, 64), "clip_g": (3, 128)},
                                  "holds 2 'clip_l' and 3 'clip_g' vectors; an embedding has as many for each text "
                                  "encoder"),
    "an SDXL embedding on SD v1": ("sd1", {"clip_l": (1, 64), "clip_g": (1, 128)},
                                   "is an SDXL embedding, {'clip_l': (n, 64), 'clip_g': (n, 128)}; this model takes "
                                   "one set of vectors: use an embedding made for it, (n, 64)"),
    "one set on the refiner": ("sdxl-refiner", {"emb_params": (1, 64)},
                               "this model takes SDXL's, a set per text encoder: use an embedding made for it, "
                               "{'clip_g': (n, 64)}"),
    "clip_l only on the refiner": ("sdxl-refiner", {"clip_l": (1, 64)},
                                   "has no vectors for this model's 'clip_g' text encoder"),
}


@pytest.mark.parametrize("case", list(BAD_EMBEDDINGS))
def test_an_embedding_that_does_not_fit_is_refused(xl, tiny_models, tmp_path, case):
    model, shapes, message = BAD_EMBEDDINGS[case]
    sd = models_of(model, xl, tiny_models)
    path = tmp_path / "other.safetensors"
    save_file({key: torch.ones(shape) for key, shape in shapes.items()}, path)
    with pytest.raises(InputError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        sd.load_embedding(path, "<other>")
    assert not sd.embeddings
