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
from sd.lora import diffusers_unet_path, lora_targets, read_lora
from sd.lora_layers import LoRALinear, lora_layers, network_layers, unwrap_lora
from sd.lora_network import LoRANetworkConfig, add_lora_network, write_lora
from sd.objectives import DiffusionObjective, mse
from sd.pipeline import StableDiffusion
from sd.unet import UNet, UNetConfig
from sd.vae import AutoencoderKL, VAEConfig
from tests import compvis
from tests.conftest import rel_err
from tests.pipelines import reference_pipeline
from tests.reference import oracle, randomize_, reference_scheduler, sd15_clip, sd15_unet, small_vae, to_compvis
from tests.tiny import TINY, tiny_compvis_state, write_tiny_checkpoint

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
def test_full_size_sd1_layers_are_kohyas(variant, tmp_path, monkeypatch):
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
    from sd.lora import written_name
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
    """max |ours - ref| / max |ref|: gradients are small, and of very different scales from layer to layer."""
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
        t, ids = torch.tensor([17, 730]), torch.randint(0, 49408, (2, 77), generator=gen)
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
                assert relative(mine.grad, other.grad) < 1e-4, layer
                ours_params.append((mine, mine.grad))
                their_params.append((other, other.grad))
        assert all(layer.down.weight.grad.abs().max() > 0 for layer, _ in pairs)  # up is non-zero: down learns
        for optimizer, options in ((torch.optim.AdamW, dict(lr=1e-4, weight_decay=1e-2)), (torch.optim.SGD, dict(lr=0.1))):
            mine, other = step(ours_params, optimizer, **options), step(their_params, optimizer, **options)
            for after, their_after, (start, _) in zip(mine, other, their_params):  # the steps made, compared
                assert relative(after - start, their_after - start) < 1e-3, optimizer.__name__
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


@pytest.mark.parametrize("variant", LOCON)
@pytest.mark.parametrize("family", REFERENCES)
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
        lora = ours.load_lora(path)
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
