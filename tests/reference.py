"""Reference models for the parity tests: diffusers' UNet and VAE and transformers' CLIP text model,
built at the SD v1.5 sizes with seeded random weights and written as CompVis checkpoints, and
diffusers' schedulers configured as SD v1's (`reference_scheduler`).

The CompVis key of every reference weight is found by asking diffusers' own `convert_ldm_*`
functions: a state dict in our (CompVis) naming whose tensors are tagged with their index goes
through the converter, and the tags say which diffusers key each CompVis key became. The mapping
must cover every weight of the reference model exactly once, or building the checkpoint fails.

The oracles (diffusers, transformers) are imported where they are used (`oracle`), so that the tests
that need none of them run with the runtime requirements and pytest only, and those that do are skipped,
saying why, where the oracles are not installed.
"""

import pytest
import torch

from sd.clip import CLIPTextModel
from sd.unet import UNet, UNetConfig
from sd.vae import AutoencoderKL
from tests.compvis import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX



def oracle(name: str):
    """A test-only reference package (requirements-test-only.txt); the calling test is skipped, with the
    reason, where it is not installed."""
    return pytest.importorskip(name, reason=f"{name} is a test-only reference: pip install -r requirements-test.txt")


def sd15_unet(in_channels: int = 4):
    return oracle("diffusers").UNet2DConditionModel(
        sample_size=64, in_channels=in_channels, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def sd15_vae():
    return oracle("diffusers").AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def text_model(width: int, layers: int, hidden_act: str, projection: bool = False):
    """transformers' CLIP text tower: heads of 64 channels, an MLP 4 times as wide, 77 positions; with
    `projection`, a CLIPTextModelWithProjection (its `text_embeds`: the pooled vector projected to `width`)."""
    transformers = oracle("transformers")
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=width // 64, max_position_embeddings=77, hidden_act=hidden_act, projection_dim=width))


def sd15_clip(width: int = 768, layers: int = 12):
    """CLIP ViT-L/14's text tower (SD v1's, and SDXL's first), sigmoid-approximated GELU."""
    return text_model(width, layers, "quick_gelu")


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add seeded noise to every parameter (fresh models have zero biases, unit norms and zero output
    convs, which would hide wrong wiring) and round to fp16-representable values, so that an fp16
    checkpoint holds exactly the same weights."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        scale = max(float(p.std()) if p.numel() > 1 else 0.0, 0.05)
        p.add_(torch.randn(p.shape, generator=gen) * scale)
        p.copy_(p.half().float())
    return model.eval().requires_grad_(False)


@torch.no_grad()
def random_on_meta(build, seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The reference model `build()` makes, built on the meta device (no initialisation, no memory) and given
    seeded random weights (`tests.tiny.random_weights`' distribution) by `load_state_dict(assign=True)`: one
    copy of a full-size model, made in seconds. transformers' CLIP `position_ids` (a buffer, not a weight) is
    made again. `dtype`: the weights' type (bfloat16 halves a full-size SDXL UNet's 9.6 GiB)."""
    from tests.tiny import random_weights
    with torch.device("meta"):
        model = build()
    model.load_state_dict(random_weights(model, torch.Generator().manual_seed(seed), dtype, fp16_exact=False),
                          assign=True)
    for module in model.modules():
        if isinstance(getattr(module, "position_ids", None), torch.Tensor) and module.position_ids.is_meta:
            module.position_ids = torch.arange(module.position_ids.shape[-1]).expand(1, -1)
    assert not any(b.is_meta for b in model.buffers()), "a buffer of the reference was left without values"
    return model.eval().requires_grad_(False)


def sd2_unet(in_channels: int = 4, widths: tuple[int, ...] = (320, 640, 1280, 1280), context: int = 1024):
    """diffusers' UNet as diffusers builds SD 2.x's: heads of 64 channels (its `attention_head_dim` counts
    heads), Linear projections, a 1024-wide context; `widths` smaller for fast tests."""
    return oracle("diffusers").UNet2DConditionModel(
        sample_size=96, in_channels=in_channels, out_channels=4, layers_per_block=2, block_out_channels=widths,
        cross_attention_dim=context, attention_head_dim=tuple(w // 64 for w in widths), use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def sd2_text_model(width: int = 1024, layers: int = 23):
    """transformers' CLIPTextModel as diffusers builds SD 2.x's from the OpenCLIP ViT-H tower: exact GELU, heads
    of 64, and 23 layers (diffusers' converter drops the 24th: conditioning is on the penultimate layer)."""
    return text_model(width, layers, "gelu")


def big_g_text_model(width: int = 1280, layers: int = 32):
    """transformers' CLIPTextModelWithProjection as diffusers builds SDXL's OpenCLIP bigG tower: exact GELU, heads
    of 64, all its layers (diffusers' converter keeps the last one for SDXL: conditioning reads hidden_states[-2]),
    the projection of the pooled vector as wide as the tower."""
    return text_model(width, layers, "gelu", projection=True)


SDXL_UNETS = {  # diffusers' configurations of SDXL base (also inpainting, 9 input channels) and of the refiner
    "base": dict(blocks=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), widths=(320, 640, 1280),
                 depths=(1, 2, 10), context=2048, conditions=6),  # micro-conditions: size, crop, target size
    "refiner": dict(blocks=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    widths=(384, 768, 1536, 1536), depths=4, context=1280, conditions=5),  # aesthetic score
}
UP_BLOCK = {"DownBlock2D": "UpBlock2D", "CrossAttnDownBlock2D": "CrossAttnUpBlock2D"}


def sdxl_unet(kind: str = "base", in_channels: int = 4, widths: tuple[int, ...] | None = None,
              context: int | None = None, pooled: int = 1280):
    """diffusers' UNet as diffusers builds SDXL's (`kind`: "base" or "refiner"): heads of 64 channels, Linear
    projections, the vector of the pooled text (`pooled` wide) and the micro-conditions (256 channels each) added
    to the time embedding ("text_time"); `widths` (and `context`) smaller for fast tests, the block structure
    (levels, attention levels, transformer depths) kept."""
    config = SDXL_UNETS[kind]
    widths = widths or config["widths"]
    return oracle("diffusers").UNet2DConditionModel(
        sample_size=128, in_channels=in_channels, out_channels=4, layers_per_block=2, block_out_channels=widths,
        down_block_types=config["blocks"], up_block_types=tuple(UP_BLOCK[b] for b in reversed(config["blocks"])),
        transformer_layers_per_block=config["depths"], attention_head_dim=tuple(w // 64 for w in widths),
        use_linear_projection=True, cross_attention_dim=context or config["context"],
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=pooled + 256 * config["conditions"])


def small_vae(scaling_factor: float = 0.18215):
    """SD's VAE at reduced widths; `scaling_factor` 0.13025 for SDXL's."""
    return oracle("diffusers").AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=64,
        block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=scaling_factor)


def _ours(net: str, ref: torch.nn.Module, config=None) -> torch.nn.Module:
    with torch.device("meta"):
        if net == "unet":
            return UNet(config or UNetConfig(in_channels=ref.config.in_channels))
        return (AutoencoderKL if net == "vae" else CLIPTextModel)(*[config] * (config is not None))


PREFIX = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "clip": CLIP_PREFIX}


def diffusers_convert(net: str, ref: torch.nn.Module, compvis: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What diffusers' converter makes of a CompVis state dict for one network: keys as in
    `ref.state_dict()` (transformers 5 names CLIP weights without the `text_model.` level)."""
    oracle("diffusers")
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    if net == "unet":
        return convert_ldm_unet_checkpoint(compvis, dict(ref.config))
    if net == "vae":
        return convert_ldm_vae_checkpoint(compvis, dict(ref.config))
    converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(compvis).items()}
    converted.pop("embeddings.position_ids", None)  # a buffer of transformers 4, not a weight of transformers 5
    return converted


def to_compvis(net: str, ref: torch.nn.Module, config=None, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The reference model's weights under their CompVis keys (with the network's prefix, or `prefix`: SDXL's
    ViT-L is under `conditioner.embedders.0.transformer.text_model.`); `config`: our network's configuration
    when it is not SD v1.5's. The tensors are the reference's own (no copy)."""
    prefix = prefix or PREFIX[net]
    ours = _ours(net, ref, config).state_dict()
    keys = list(ours)
    tags = {prefix + k: torch.tensor(float(i)).expand(ours[k].shape) for i, k in enumerate(keys)}
    converted = diffusers_convert(net, ref, tags)
    ref_state = ref.state_dict()
    inverse = {dk: keys[int(t.reshape(-1)[0])] for dk, t in converted.items()}
    assert inverse.keys() == ref_state.keys(), f"{net}: diffusers' converter does not cover the reference"
    assert sorted(inverse.values()) == sorted(keys), f"{net}: CompVis keys not used exactly once"
    return {prefix + ck: ref_state[dk].reshape(ours[ck].shape).contiguous() for dk, ck in inverse.items()}


def to_open_clip(ref: torch.nn.Module, seed: int, prefix: str = "cond_stage_model.model.") -> dict[str, torch.Tensor]:
    """transformers' text model as the original file holds the OpenCLIP tower, in OpenCLIP's names under `prefix`,
    with `logit_scale`. A CLIPTextModelWithProjection (SDXL's bigG as diffusers builds it) is the whole tower; a
    CLIPTextModel (SD 2.x's, 23 layers) lacks what the file has and conditioning skips: one more layer (random,
    seeded) and `text_projection`. Proven: diffusers' `convert_open_clip_checkpoint` of it gives back the
    reference's weights exactly (and the extra layer and projection, which it drops at full size, where it knows
    them)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from sd.layouts import OPEN_CLIP
    reference = {k.removeprefix("text_model."): v for k, v in ref.state_dict().items()
                 if not k.endswith("position_ids")}
    last, width = ref.config.num_hidden_layers, ref.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    extra = {}
    if "text_projection.weight" not in reference:
        extra = {k.replace(f"layers.{last - 1}.", f"layers.{last}."): v + 0.05 * torch.randn(v.shape, generator=gen)
                 for k, v in reference.items() if k.startswith(f"encoder.layers.{last - 1}.")}
        extra["text_projection.weight"] = torch.randn(width, width, generator=gen) / width ** 0.5
    state = {prefix + k: v for k, v in OPEN_CLIP.write({**reference, **extra}).items()}
    state[prefix + "logit_scale"] = torch.tensor(4.6052)
    converted = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(ref, state, prefix).items()}
    assert converted.keys() - reference.keys() <= extra.keys() and reference.keys() <= converted.keys()
    expected = {**reference, **extra}
    assert all(torch.equal(v, expected[k]) for k, v in converted.items()), "not the layout diffusers reads"
    return state


# ---- samplers --------------------------------------------------------------------------------------

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
LEADING = dict(timestep_spacing="leading", steps_offset=1)
LINSPACE = dict(timestep_spacing="linspace", steps_offset=0)


def reference_scheduler(name: str, options: dict):
    """The diffusers scheduler configured as SD's, and the extra keywords its step takes."""
    d = oracle("diffusers")
    karras = options.get("karras", False) or name == "dpmpp_2m_karras"
    if name == "ddpm":
        return d.DDPMScheduler(**SD_BETAS, **LEADING, variance_type="fixed_small", clip_sample=False), {}
    if name == "ddim":
        return (d.DDIMScheduler(**SD_BETAS, **LEADING, clip_sample=False, set_alpha_to_one=False),
                {"eta": options.get("eta", 0.0)})
    if name == "plms":
        return d.PNDMScheduler(**SD_BETAS, **LEADING, skip_prk_steps=True, set_alpha_to_one=False), {}
    if name == "ddim_inverse":
        return d.DDIMInverseScheduler(**SD_BETAS, **LEADING, clip_sample=False, set_alpha_to_one=False), {}
    if name == "lcm":  # as diffusers' LCM-LoRA examples make it: from SD's scheduler configuration
        return d.LCMScheduler(**SD_BETAS, **LEADING, set_alpha_to_one=False), {}
    if name == "euler_a":  # no Karras option: set_reference_timesteps gives it Karras sigmas
        return d.EulerAncestralDiscreteScheduler(**SD_BETAS, **LINSPACE), {}
    if name.startswith("dpmpp_2m"):
        return d.DPMSolverMultistepScheduler(**SD_BETAS, **LINSPACE, algorithm_type="dpmsolver++", solver_order=2,
                                             use_karras_sigmas=karras), {}
    cls = {"euler": d.EulerDiscreteScheduler, "heun": d.HeunDiscreteScheduler, "lms": d.LMSDiscreteScheduler}[name]
    return cls(**SD_BETAS, **LINSPACE, use_karras_sigmas=karras), {}


def set_reference_timesteps(ref, name: str, options: dict, steps: int) -> None:
    ref.set_timesteps(steps)
    if name == "euler_a" and options.get("karras"):
        euler = oracle("diffusers").EulerDiscreteScheduler(**SD_BETAS, **LINSPACE, use_karras_sigmas=True)
        euler.set_timesteps(steps)
        ref.sigmas, ref.timesteps = euler.sigmas.clone(), euler.timesteps.clone()
