"""The trainable LoRA network in kohya's layout and its file (`sd.lora_network`).

- One optimizer step against peft at full SD v1.5 size: diffusers' UNet and transformers' CLIP wrapped by peft
  on the same targets with our initial down and (non-zero) up, the same batch and loss: the loss, every LoRA
  gradient, and the weights after an AdamW and an SGD step.
- The layers are kohya's: the names `kohya_rule` finds by kohya's own rule (the Linear and Conv2d children of
  diffusers' Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D and transformers' CLIPAttention, CLIPMLP,
  3x3 convolutions only with LoCon) on the reference models (SD v1 at full size on the meta device: 192 and 72).
- The file through diffusers' `load_lora_weights` + `fuse_lora` equals our merge of it, kohya's and the PEFT
  layout, SD v1 and SDXL; `read_lora` of it merges to the trained layers' own merge, bit for bit.
- Every key maps to a layer of the original checkpoint's model, shapes fitting, under AUTOMATIC1111's name rules
  and under ComfyUI's (written out here from their rules), SD v1, SD 2.x and SDXL, with and without LoCon.
- The metadata: strings, kohya's keys, `sshs_model_hash` recomputed from the file's bytes.
- Bad settings and a failed write: one line, and nothing written (an old file left as it was).
"""

import copy
import dataclasses
import hashlib
import json
import re
import struct
from types import SimpleNamespace

import pytest
import torch

from sd.checkpoint import StableDiffusionModels
from sd.clip import CLIPConfig, CLIPTextModel
from sd.errors import InputError
from sd.lora import diffusers_unet_path, lora_targets, written_name
from sd.lora_layers import LoRALinear, lora_layers, network_layers, unwrap_lora
from sd.lora_network import LoRANetworkConfig, add_lora_network, write_lora
from sd.objectives import DiffusionObjective, mse
from sd.pipeline import StableDiffusion
from sd.unet import UNet, UNetConfig
from sd.vae import AutoencoderKL, VAEConfig
from tests import compvis
from tests.conftest import rel_err
from tests.pipelines import reference_pipeline
from tests.reference import oracle, reference_scheduler, sd15_clip, sd15_unet, small_vae, to_compvis
from tests.tiny import tiny_compvis_state, write_tiny_checkpoint

LOCON = {"lora": LoRANetworkConfig(rank=4, alpha=2.0), "locon": LoRANetworkConfig(rank=4, alpha=2.0, conv_rank=2,
                                                                                    conv_alpha=0.5)}


def tiny_models(tmp_path, family: str) -> StableDiffusion:
    return StableDiffusion.from_checkpoint(write_tiny_checkpoint(tmp_path / f"{family}.safetensors", family=family))


def trained(models, cfg: LoRANetworkConfig, seed: int = 0):
    """The network of `cfg` on `models`, its up matrices 'trained' (seeded random), as after some steps."""
    layers = add_lora_network(models, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for found in layers.values():
            for layer in found.values():
                layer.up.weight.copy_(torch.randn(layer.up.weight.shape, generator=gen) * 0.05)
    return layers


def header(path) -> tuple[int, dict]:
    """(the header's length, the header) of a .safetensors file, read from its bytes."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


# ---- kohya's rule, on the reference models -------------------------------------------------------------

KOHYA_MODULES = {"unet": ("Transformer2DModel",), "locon": ("ResnetBlock2D", "Downsample2D", "Upsample2D"),
                 "text": ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")}  # its classes, networks/lora.py


def kohya_rule(prefix: str, model: torch.nn.Module, classes: tuple[str, ...], locon: bool) -> set[str]:
    """kohya's names for a diffusers / transformers model: every Linear and Conv2d child of a module of `classes`,
    the 3x3 (k x k) convolutions only with LoCon; transformers 4's `text_model.` level kept in the name."""
    names = set()
    for name, module in model.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            kxk = type(child).__name__ == "Conv2d" and child.kernel_size != (1, 1)
            if type(child).__name__ in ("Linear", "Conv2d") and (locon or not kxk):
                path = f"{name}.{child_name}"
                if prefix.startswith("lora_te") and not path.startswith("text_model."):
                    path = "text_model." + path
                names.add(prefix + path.replace(".", "_"))
    return names


def file_layers(path) -> set[str]:
    return {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in header(path)[1]
            if k != "__metadata__"}


@pytest.mark.parametrize("variant", LOCON)
def test_full_size_sd1_layers_are_kohyas(variant):
    """At SD v1's full size (on the meta device, nothing allocated): the layers are those kohya's rule finds on
    diffusers' UNet and transformers' CLIP, 192 and 72 without LoCon."""
    cfg = LOCON[variant]
    with torch.device("meta"):
        ours = StableDiffusionModels(clip=CLIPTextModel(CLIPConfig()), vae=AutoencoderKL(VAEConfig()),
                                     unet=UNet(UNetConfig()))
        unet, clip = sd15_unet(), sd15_clip()
    layers = add_lora_network(ours, cfg)
    locon = cfg.conv_rank is not None
    expected_unet = kohya_rule("lora_unet_", unet, KOHYA_MODULES["unet"] + KOHYA_MODULES["locon"] * locon, locon)
    expected_text = kohya_rule("lora_te_", clip, KOHYA_MODULES["text"], locon)
    names = {net: {written_name("kohya", net, path, ours) for path in found} for net, found in layers.items()}
    assert names == {"unet": expected_unet, "clip": expected_text}
    if not locon:  # the figures of kohya's log for SD v1 ("create LoRA for U-Net: 192 modules")
        assert (len(expected_unet), len(expected_text)) == (16 * 12, 12 * 6)
    for found in layers.values():
        assert all(l.down.weight.shape[0] == (cfg.conv_rank if l.down.weight.shape[2:] == (3, 3) else cfg.rank)
                   for l in found.values())
    assert not [p for net in ("unet", "clip") for n, p in getattr(ours, net).named_parameters()
                if p.requires_grad and not n.endswith(("down.weight", "up.weight"))]  # only down and up train


# ---- one optimizer step against peft at full size -------------------------------------------------------

def peft_layers(ref, paths: list[str], cfg: LoRANetworkConfig):
    """peft's LoRA layers put in `ref` (in place) at `paths`: {path: peft LoraLayer}."""
    peft = oracle("peft")
    peft.inject_adapter_in_model(peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=paths), ref)
    return {path: ref.get_submodule(path) for path in paths}


def unpeft(ref) -> None:
    """Put each peft LoRA layer's base layer back in its place (the session's reference models are shared)."""
    peft = oracle("peft")
    for path, module in list(ref.named_modules()):
        if isinstance(module, peft.tuners.lora.LoraLayer):
            parent, _, name = path.rpartition(".")
            setattr(ref.get_submodule(parent), name, module.get_base_layer())


def relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: gradients are small, and of very different scales from layer to layer (here,
    on this CPU, ours and peft's agree bit for bit)."""
    return float((ours.detach() - ref.detach()).abs().max() / ref.detach().abs().max())


def step(params: list[tuple[torch.Tensor, torch.Tensor]], optimizer, **options) -> list[torch.Tensor]:
    """The values after one step of `optimizer` from (value, gradient) pairs (copies; nothing changed)."""
    leaves = [p.detach().clone().requires_grad_() for p, _ in params]
    for leaf, (_, grad) in zip(leaves, params):
        leaf.grad = grad.clone()
    optimizer(leaves, **options).step()
    return [leaf.detach() for leaf in leaves]


def test_one_step_against_peft_at_full_size(refs, loaded):
    cfg = LoRANetworkConfig(rank=4, alpha=8.0)
    models = copy.copy(loaded("safetensors"))  # the cached models' networks are wrapped, then put back
    ours = trained(models, cfg, seed=3)
    try:
        their = {"unet": peft_layers(refs.unet, [diffusers_unet_path(p, models.unet.config) for p in ours["unet"]], cfg),
                 "clip": peft_layers(refs.clip, list(ours["clip"]), cfg)}
        pairs = []  # (our layer, peft's) for every LoRA layer
        for net, found in ours.items():
            for path, layer in found.items():
                theirs = their[net][diffusers_unet_path(path, models.unet.config) if net == "unet" else path]
                with torch.no_grad():  # our initial down and (non-zero) up copied into peft's
                    theirs.lora_A["default"].weight.copy_(layer.down.weight)
                    theirs.lora_B["default"].weight.copy_(layer.up.weight)
                pairs.append((layer, theirs))
        gen = torch.Generator().manual_seed(5)
        x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
        t, ids = torch.tensor([17, 730]), torch.randint(0, 49408, (2, 16), generator=gen)  # 16 tokens: 5 x less text
        noisy, wanted, weights = DiffusionObjective().training_pair(x0, noise, t)
        loss = mse(models.unet(noisy, t, models.clip(ids)).float(), wanted, weights)
        scheduler, _ = reference_scheduler("ddpm", {})  # diffusers' noising and epsilon target, its loss
        their_noisy = scheduler.add_noise(x0, noise, t)
        their_loss = torch.nn.functional.mse_loss(
            refs.unet(their_noisy, t, encoder_hidden_states=refs.clip(ids).last_hidden_state).sample, noise)
        assert rel_err(noisy, their_noisy) < 1e-6 and torch.equal(wanted, noise) and weights is None
        assert abs(loss.item() - their_loss.item()) <= 1e-5 * their_loss.item()
        loss.backward()
        their_loss.backward()
        ours_params, their_params = [], []
        for layer, theirs in pairs:
            for mine, other in ((layer.down.weight, theirs.lora_A["default"].weight),
                                (layer.up.weight, theirs.lora_B["default"].weight)):
                assert relative(mine.grad, other.grad) < 1e-5, layer
                ours_params.append((mine, mine.grad))
                their_params.append((other, other.grad))
        assert all(layer.down.weight.grad.abs().max() > 0 for layer, _ in pairs)  # up is non-zero: down learns
        for optimizer, options in ((torch.optim.AdamW, dict(lr=1e-4, weight_decay=1e-2)), (torch.optim.SGD, dict(lr=0.1))):
            mine, other = step(ours_params, optimizer, **options), step(their_params, optimizer, **options)
            for after, their_after, (start, _) in zip(mine, other, their_params):  # the steps made, compared
                assert relative(after - start, their_after - start) < 1e-5, optimizer.__name__
    finally:
        for net in ("unet", "clip"):
            unwrap_lora(getattr(models, net), merge=False)
            unpeft(getattr(refs, net))
            getattr(refs, net).zero_grad(set_to_none=True)


# ---- the file through diffusers, and through read_lora ------------------------------------------------------

def sd1_references():
    """diffusers' UNet and transformers' CLIP at the tiny SD v1 sizes (seeded), a small VAE, and the checkpoint of
    them in the CompVis layout."""
    from tests.test_lora import tiny_references
    from tests.tiny import TINY_CLIP, TINY_UNET
    unet, clip = tiny_references()
    state = {**to_compvis("unet", unet, TINY_UNET), **to_compvis("clip", clip, TINY_CLIP), **compvis.training_buffers(),
             **{k: v for k, v in tiny_compvis_state().items() if k.startswith(compvis.VAE_PREFIX)}}
    refs = SimpleNamespace(unet=unet, clip=clip, vae=small_vae())
    return refs, state, lambda r: reference_pipeline(oracle("diffusers").StableDiffusionPipeline, r, r.unet, "ddim")


def sdxl_references():
    from tests.test_sdxl_lora import xl_pipe, xl_references, xl_state
    refs = xl_references()
    return refs, xl_state(refs), lambda r: xl_pipe(r, "euler")


REFERENCES = {"sd1": sd1_references, "sdxl": sdxl_references}
REFERENCE_NETS = {"unet.": "unet", "text_encoder.": "clip", "text_encoder_2.": "clip_g"}


def reference_layer(refs, name: str) -> torch.nn.Module:
    """The diffusers / transformers layer of a diffusers-spelled LoRA name (transformers 5's CLIPTextModel has no
    `text_model.` level)."""
    prefix = next(p for p in REFERENCE_NETS if name.startswith(p))
    model, path = getattr(refs, REFERENCE_NETS[prefix]), name[len(prefix):]
    names = dict(model.named_modules())
    return names.get(path) or names[path.removeprefix("text_model.")]


@pytest.mark.parametrize("family, variant", [("sd1", "lora"), ("sd1", "locon"), ("sdxl", "locon")])
def test_written_files_merge_as_diffusers_and_as_the_layers(family, variant, tmp_path):
    refs, state, pipeline = REFERENCES[family]()
    ours = StableDiffusion.from_checkpoint(compvis.save_checkpoint(state, tmp_path / "base.safetensors"))
    models = ours.models
    layers = trained(models, LOCON[variant])
    nets = list(layers)
    merged_by_layers = {net: unwrap_lora(copy.deepcopy(getattr(models, net))).state_dict() for net in nets}
    files = write_lora(tmp_path / "trained.safetensors", models, {"ss_output_name": "trained"}, formats=("kohya", "peft"))
    assert [f.name for f in files] == ["trained.peft.safetensors", "trained.safetensors"]
    for net in nets:
        unwrap_lora(getattr(models, net), merge=False)
    spelled = {}  # each Linear and Conv2d layer by its first diffusers spelling
    for name, module in lora_targets(models).items():
        if name.startswith(tuple(REFERENCE_NETS)):
            spelled.setdefault(module, name)
    targets = {name: module for module, name in spelled.items()}
    for path in files:
        lora = ours.load_lora(path)  # read_lora and the merger
        assert not lora.unmatched and len(lora.layers) == sum(map(len, layers.values()))
        try:
            for net in nets:  # read_lora and the merger give the layers' own merge; kohya's file bit for bit
                for key, value in getattr(models, net).state_dict().items():
                    assert (torch.equal if path == files[1] else lambda a, b: rel_err(a, b) < 1e-6)(
                        value, merged_by_layers[net][key]), key
            theirs = copy.deepcopy(refs)
            pipe = pipeline(theirs)
            pipe.load_lora_weights(str(path))
            pipe.fuse_lora()
            pipe.unload_lora_weights()
            changed = 0
            for name, module in targets.items():  # every Linear and Conv2d weight, changed or not
                ref = reference_layer(theirs, name)
                assert rel_err(module.weight, ref.weight.reshape(module.weight.shape)) < 1e-6, (path.name, name)
                changed += rel_err(ref.weight, reference_layer(refs, name).weight) > 1e-5
            assert changed == len(lora.layers)
        finally:
            ours.unload_lora()


# ---- AUTOMATIC1111's and ComfyUI's names ----------------------------------------------------------------------

SUFFIXES = {"resnets": {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                        "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}}
OPEN_CLIP_NAMES = {"mlp_fc1": "mlp_c_fc", "mlp_fc2": "mlp_c_proj", "self_attn": "attn"}


def a1111_compvis_name(key: str, is_sd2: bool) -> str:
    """AUTOMATIC1111's `convert_diffusers_name_to_compvis` rules (diffusers' SD v1 block layout: 3 modules a level)."""
    def tower(layer, rest, root):
        for name, theirs in OPEN_CLIP_NAMES.items():
            rest = rest.replace(name, theirs)
        return f"{root}transformer_resblocks_{layer}_{rest}"

    rules = [
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda i, kind, j, rest:
         f"diffusion_model_input_blocks_{1 + 3 * int(i) + int(j)}_{int(kind == 'attentions')}_"
         f"{SUFFIXES.get(kind, {}).get(rest, rest)}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", lambda kind, j, rest:
         f"diffusion_model_middle_block_{1 if kind == 'attentions' else 2 * int(j)}_{SUFFIXES.get(kind, {}).get(rest, rest)}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda i, kind, j, rest:
         f"diffusion_model_output_blocks_{3 * int(i) + int(j)}_{int(kind == 'attentions')}_"
         f"{SUFFIXES.get(kind, {}).get(rest, rest)}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda i: f"diffusion_model_input_blocks_{3 + 3 * int(i)}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", lambda i:
         f"diffusion_model_output_blocks_{2 + 3 * int(i)}_{2 if int(i) > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda layer, rest:
         tower(layer, rest, "model_") if is_sd2 else f"transformer_text_model_encoder_layers_{layer}_{rest}"),
        (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", lambda layer, rest: tower(layer, rest, "1_model_")),
    ]
    for pattern, convert in rules:
        if m := re.match(pattern, key):
            return convert(*m.groups())
    return key


def a1111_module(name: str, mapping: dict[str, torch.Size]) -> str | None:
    """The layer AUTOMATIC1111's Lora extension finds for a kohya layer name, or None: the converted name, its
    attention module for q/k/v (OpenCLIP's in_proj), then the sgm names SDXL files use as they are."""
    key = a1111_compvis_name(name, any(k.startswith("model_transformer_resblocks") for k in mapping))
    if key in mapping:
        return key
    if (m := re.match(r"(.*)_([qkv]_proj)$", key)) and m[1] in mapping:
        return m[1]
    for theirs, ours in (("lora_unet", "diffusion_model"), ("lora_te1_text_model", "0_transformer_text_model"),
                         ("lora_te1_text_model", "transformer_text_model")):
        if theirs in name and name.replace(theirs, ours) in mapping:
            return name.replace(theirs, ours)
    return None


A1111_ROOTS = ("model.", "cond_stage_model.", "conditioner.embedders.")  # the LDM model's modules it names


def a1111_mapping(state: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    """AUTOMATIC1111's `network_layer_mapping` of a checkpoint's model: each weight's module, '.' -> '_' (the shape
    of its weight; OpenCLIP's attention by its in_proj_weight)."""
    mapping = {}
    for key, value in state.items():
        root = next((r for r in A1111_ROOTS if key.startswith(r)), None)
        if root and key.endswith(("weight", "in_proj_weight")):
            module = key[len(root):].removesuffix(".in_proj_weight").removesuffix(".weight")
            mapping[module.replace(".", "_")] = value.shape
    return mapping


def fits(shape: torch.Size, down: list[int], up: list[int], fused_qkv: bool) -> bool:
    """Whether the layer's weight has the pair's shape (a third of it for OpenCLIP's fused q, k, v)."""
    return list(shape) == [up[0] * (3 if fused_qkv else 1), down[1], *down[2:]]


COMFY_TOWERS = {"sd1": {"clip": "clip_l"}, "sd2": {"clip": "clip_h"}, "sdxl": {"clip": "clip_l", "clip_g": "clip_g"}}
COMFY_CLIP = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """diffusers' UNet2DConditionModel options of one of our configurations."""
    levels = range(len(cfg.channel_mult))
    down = tuple("CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels)
    widths = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    options = dict(sample_size=8, layers_per_block=cfg.num_res_blocks, block_out_channels=widths,
                   down_block_types=down, up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)),
                   cross_attention_dim=cfg.context_dim, use_linear_projection=cfg.linear_proj,
                   attention_head_dim=tuple(w // cfg.head_channels for w in widths) if cfg.head_channels else 8,
                   transformer_layers_per_block=tuple(max(cfg.depth(i), 1) for i in levels))
    if cfg.adm_in_channels:
        options |= dict(addition_embed_type="text_time", addition_time_embed_dim=256,
                        projection_class_embeddings_input_dim=cfg.adm_in_channels)
    return options


def comfy_keys(family: str, state: dict[str, torch.Tensor], models) -> dict[str, tuple]:
    """ComfyUI's `model_lora_keys_unet` and `model_lora_keys_clip` for the model: LoRA layer name -> the shape of the
    weight it changes. The UNet by its sgm names and by diffusers' (its `unet_to_diffusers`, here diffusers' own
    converter, run on index-tagged weights); each text tower by transformers' names, all its layers."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    unet = {k[len(compvis.UNET_PREFIX):]: v for k, v in state.items() if k.startswith(compvis.UNET_PREFIX)}
    keys = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): v.shape for k, v in unet.items()
            if k.endswith(".weight")}
    with torch.device("meta"):
        config = oracle("diffusers").UNet2DConditionModel(**diffusers_unet_config(models.unet.config)).config
    names = list(unet)
    tags = {compvis.UNET_PREFIX + k: torch.tensor(float(i)).expand(unet[k].shape) for i, k in enumerate(names)}
    for dk, tag in convert_ldm_unet_checkpoint(tags, dict(config)).items():
        if dk.endswith(".weight"):
            keys["lora_unet_" + dk.removesuffix(".weight").replace(".", "_")] = unet[names[int(tag.reshape(-1)[0])]].shape
    towers = COMFY_TOWERS[family]
    for net, tower in towers.items():
        cfg = getattr(models, net).config
        shapes = {"mlp.fc1": (4 * cfg.width, cfg.width), "mlp.fc2": (cfg.width, 4 * cfg.width)}
        prefixes = {"clip_l": ("lora_te_", "lora_te1_"), "clip_h": ("lora_te_", "lora_te1_"),
                    "clip_g": ("lora_te2_",) if "clip_l" in towers.values() else ("lora_te_",)}[tower]
        for b in range(cfg.layers):
            for c in COMFY_CLIP:
                for prefix in prefixes:
                    keys[f"{prefix}text_model_encoder_layers_{b}_{c.replace('.', '_')}"] = shapes.get(c, (cfg.width,) * 2)
    return keys


@pytest.mark.parametrize("variant", LOCON)
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_key_maps_under_a1111_and_comfyui(family, variant, tmp_path):
    state = tiny_compvis_state(family=family)
    models = StableDiffusion.from_checkpoint(compvis.save_checkpoint(state, tmp_path / "base.safetensors")).models
    trained(models, LOCON[variant])
    path, = write_lora(tmp_path / "lora.safetensors", models, {})
    _, head = header(path)
    mapping, comfy = a1111_mapping(state), comfy_keys(family, state, models)
    layers = file_layers(path)
    assert len(layers) == sum(map(len, network_layers(models).values()))
    for name in layers:
        down, up = head[name + ".lora_down.weight"]["shape"], head[name + ".lora_up.weight"]["shape"]
        module = a1111_module(name, mapping)
        assert module is not None, f"AUTOMATIC1111 finds no layer for {name}"
        assert fits(mapping[module], down, up, module != a1111_compvis_name(name, True) and module.endswith("_attn")), name
        assert name in comfy, f"ComfyUI finds no layer for {name}"
        assert fits(torch.Size(comfy[name]), down, up, False), name


# ---- the metadata ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", LOCON)
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_metadata_is_kohyas(family, variant, tmp_path):
    models = tiny_models(tmp_path, family).models
    if family == "sd2":  # SD 2.x's 768-v: kohya's version says v-prediction
        models = dataclasses.replace(models, prediction_type="v_prediction")
    cfg = LOCON[variant]
    trained(models, cfg)
    settings = {"ss_output_name": "trained", "ss_learning_rate": 1e-4, "ss_tag_frequency": {"sks": {"dog": 3}},
                "ss_resolution": [512, 512]}
    path, = write_lora(tmp_path / "lora.safetensors", models, settings)
    n, head = header(path)
    meta = head["__metadata__"]
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["ss_tag_frequency"]) == settings["ss_tag_frequency"] and meta["ss_learning_rate"] == "0.0001"
    args = {} if cfg.conv_rank is None else {"conv_dim": str(cfg.conv_rank), "conv_alpha": str(cfg.conv_alpha)}
    assert {k: meta[k] for k in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_v2",
                                 "ss_base_model_version")} == {
        "ss_network_module": "networks.lora", "ss_network_dim": str(cfg.rank), "ss_network_alpha": str(cfg.alpha),
        "ss_v2": str(family == "sd2"), "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2_v",
                                                                 "sdxl": "sdxl_base_v1-0"}[family]}
    assert json.loads(meta["ss_network_args"]) == args
    assert meta["sshs_model_hash"] == hashlib.sha256(path.read_bytes()[8 + n:]).hexdigest()
    prefixes = {name.split("_")[1] for name in file_layers(path)}
    assert prefixes == {"sd1": {"unet", "te"}, "sd2": {"unet", "te"}, "sdxl": {"unet", "te1", "te2"}}[family]


# ---- bad input ----------------------------------------------------------------------------------------------------

BAD_SETTINGS = {
    "rank 0": (dict(rank=0), "--rank must be a whole number >= 1, got 0"),
    "rank -1": (dict(rank=-1), "--rank must be a whole number >= 1, got -1"),
    "rank 2.5": (dict(rank=2.5), "--rank must be a whole number >= 1, got 2.5"),
    "rank True": (dict(rank=True), "--rank must be a whole number >= 1, got True"),
    "rank text": (dict(rank="4"), "--rank must be a whole number >= 1, got '4'"),
    "conv rank 0": (dict(conv_rank=0), "--conv-dim must be a whole number >= 1, got 0"),
    "alpha 0": (dict(alpha=0.0), "--alpha must be a finite number > 0"),
    "alpha -1": (dict(alpha=-1.0), "--alpha must be a finite number > 0"),
    "alpha nan": (dict(alpha=float("nan")), "--alpha must be a finite number > 0"),
    "alpha inf": (dict(alpha=float("inf")), "--alpha must be a finite number > 0"),
    "conv alpha nan": (dict(conv_alpha=float("nan")), "--conv-alpha must be a finite number > 0"),
    "dropout -0.1": (dict(dropout=-0.1), "--network-dropout must be a number from 0 up to (not including) 1"),
    "dropout 1": (dict(dropout=1.0), "--network-dropout must be a number from 0 up to (not including) 1"),
    "dropout nan": (dict(dropout=float("nan")), "--network-dropout must be a number from 0 up to (not including) 1"),
    "nothing": (dict(unet=False, text_encoder=False), "trains nothing"),
}


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_bad_settings_are_one_line(case):
    options, message = BAD_SETTINGS[case]
    with pytest.raises(InputError, match=re.escape(message)) as error:
        LoRANetworkConfig(**options)
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("tiny"), "sd1")


# A rank above a layer's width: the tiny model's text encoder is 64 wide, its UNet's first level 32 (3x3
# convolutions: min(32 * 9, 32) = 32 output channels)
TOO_WIDE = {
    "linear": (dict(rank=33), "--rank 33 is above the width of the layer input_blocks.1.1.proj_in (32"),
    "text": (dict(rank=65, unet=False), "--rank 65 is above the width of the layer encoder.layers.0.self_attn.q_proj (64"),
    "conv": (dict(conv_rank=33), "--conv-dim 33 is above the width of the layer input_blocks.1.0.in_layers.2 (32"),
}


@pytest.mark.parametrize("case", TOO_WIDE)
def test_a_rank_above_a_layers_width_is_refused_with_the_models_unchanged(tiny, case):
    options, message = TOO_WIDE[case]
    with pytest.raises(InputError, match=re.escape(message)) as error:
        add_lora_network(tiny.models, LoRANetworkConfig(**options))
    assert "\n" not in str(error.value) and "give" in str(error.value)
    assert not lora_layers(tiny.models.unet) and not lora_layers(tiny.models.clip)


def test_a_rank_above_the_width_of_one_layer_is_refused_by_the_layer():
    with pytest.raises(InputError, match=re.escape("the LoRA rank 6 is above the width of the layer")):
        LoRALinear(torch.nn.Linear(5, 9), 6, 1.0)


@pytest.mark.parametrize("formats", [("kohya",), ("kohya", "peft")])
@pytest.mark.parametrize("old", [False, True])
def test_a_failed_write_leaves_nothing_and_the_old_file(tmp_path, monkeypatch, formats, old):
    models = tiny_models(tmp_path, "sd1").models
    trained(models, LOCON["lora"])
    path = tmp_path / "lora.safetensors"
    if old:
        path.write_bytes(b"the old LoRA")

    def half_then_fail(target, tensors, metadata):
        target.write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr("sd.lora_network.write_safetensors", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        write_lora(path, models, {}, formats=formats)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["sd1.safetensors"] + ["lora.safetensors"] * old)
    assert not old or path.read_bytes() == b"the old LoRA"


@pytest.mark.parametrize("case, message", [
    ("no layers", "the models have no LoRA layers to write"),
    ("metadata clash", "LoRA metadata ['ss_network_dim'] is written from the layers themselves"),
    ("format", "LoRA file formats ['onnx']"),
    ("suffix", "a LoRA is written as a .safetensors file in a folder that exists"),
])
def test_bad_writes_are_refused_before_writing(tmp_path, case, message):
    models = tiny_models(tmp_path, "sd1").models
    if case != "no layers":
        trained(models, LOCON["lora"])
    arguments = {"no layers": (tmp_path / "a.safetensors", {}, ("kohya",)),
                 "metadata clash": (tmp_path / "a.safetensors", {"ss_network_dim": 8}, ("kohya",)),
                 "format": (tmp_path / "a.safetensors", {}, ("onnx",)),
                 "suffix": (tmp_path / "a.ckpt", {}, ("kohya",))}[case]
    path, metadata, formats = arguments
    with pytest.raises(InputError, match=re.escape(message)):
        write_lora(path, models, metadata, formats=formats)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd1.safetensors"]
