"""Stable Diffusion model families as data: how a single-file checkpoint of each is recognised and read.

Every family keeps the latent-diffusion layout of its original single file (CompVis `ldm` for SD 1.x
and 2.x, Stability's `sgm` for SDXL): the UNet under `model.diffusion_model.`, the KL autoencoder under
`first_stage_model.`, the text encoders under their own prefixes. A `Family` says how to recognise its
files (`detect`, on the state dict's keys and shapes), where each network's weights are (`prefixes`),
which layout a network's names follow where they are not our module names (`renames`, `sd.layouts`:
SD 2.x's OpenCLIP tower), how each network's configuration is read off the weights' shapes (`configs`),
which text encoders condition it, its latent scale, image size and prediction type (and whether its files
leave the prediction type open: SD 2.x 512-base and 768-v have the same keys, `sd.prediction`), and what
SDXL adds: the micro-conditions its UNet's vector carries (`sd.micro_conditioning`), the multiple its sides
must be, its guidance default and its rule for an empty negative prompt. `FAMILIES` is in detection order:
the first family whose `detect` holds is the file's.
"""

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from sd.clip import CLIPConfig
from sd.layouts import OPEN_CLIP, Layout
from sd.text_encoders import TextEncoderSpec
from sd.unet import UNetConfig
from sd.vae import VAEConfig

StateDict = Mapping[str, torch.Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD_V1_SCALE = 0.18215  # SD v1's latent scale, for files without a stored scale_factor
SD_V1_SIZE = 512
UNET_CONTEXT_KEY = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"  # (C, context width)


def transformer_blocks(s: StateDict, block: str) -> int:
    """How many transformer blocks the spatial transformer `block` ("input_blocks.1.1") holds; 0 if none."""
    pattern = re.compile(re.escape(block) + r"\.transformer_blocks\.(\d+)\.")
    return len({m[1] for k in s if (m := pattern.match(k))})


def unet_config_from_shapes(s: StateDict, **fixed) -> UNetConfig:
    """The UNet's configuration from its weights (keys without the prefix); `fixed`: what shapes cannot tell
    (the head count or width)."""
    ch = s["input_blocks.0.0.weight"].shape[0]
    n_levels = 1 + sum(1 for k in s if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))  # downsamplers + 1
    n_res = len({k.split(".")[1] for k in s if k.startswith("input_blocks.")}) // n_levels - 1
    first_block = [1 + level * (n_res + 1) for level in range(n_levels)]  # input_blocks index per level
    attention_levels = tuple(lv for lv, i in enumerate(first_block) if f"input_blocks.{i}.1.norm.weight" in s)
    per_level = tuple(transformer_blocks(s, f"input_blocks.{i}.1") for i in first_block)  # (0 without attention)
    middle = transformer_blocks(s, "middle_block.1")
    depths = {per_level[level] for level in attention_levels}
    cfg = UNetConfig(
        in_channels=s["input_blocks.0.0.weight"].shape[1],
        out_channels=s["out.2.weight"].shape[0],
        model_channels=ch,
        channel_mult=tuple(s[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // ch for i in first_block),
        attention_levels=attention_levels,
        context_dim=s["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        num_res_blocks=n_res,
        transformer_depth=per_level if len(depths) > 1 else next(iter(depths), middle),
        linear_proj=any(w.dim() == 2 for k, w in s.items() if k.endswith(".proj_in.weight")),  # Linear, not 1x1 conv
        adm_in_channels=s["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in s else None,
        **fixed,
    )
    return cfg if cfg.middle_depth == middle else replace(cfg, transformer_depth_middle=middle)


def vae_config(s: StateDict) -> VAEConfig:
    ch = s["encoder.conv_in.weight"].shape[0]
    n_levels = len({k.split(".")[2] for k in s if k.startswith("encoder.down.")})
    return VAEConfig(
        image_channels=s["encoder.conv_in.weight"].shape[1],
        latent_channels=s["post_quant_conv.weight"].shape[0],
        base_channels=ch,
        channel_mult=tuple(s[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(n_levels)),
        num_res_blocks=len({k.split(".")[4] for k in s if k.startswith("encoder.down.0.block.")}),
    )


def clip_config(s: StateDict, activation: str = "quick_gelu") -> CLIPConfig:
    """A text tower's configuration from its weights (our names); heads of 64 channels, as in every CLIP of
    SD; `activation`: what shapes cannot tell (OpenCLIP's towers use exact GELU)."""
    vocab, width = s["embeddings.token_embedding.weight"].shape
    return CLIPConfig(
        vocab_size=vocab, width=width, heads=width // 64,
        max_positions=s["embeddings.position_embedding.weight"].shape[0],
        layers=len({k.split(".")[2] for k in s if k.startswith("encoder.layers.")}),
        activation=activation,
        projection_dim=s["text_projection.weight"].shape[0] if "text_projection.weight" in s else None,
    )


SD1_CONFIGS = {"unet": unet_config_from_shapes, "vae": vae_config, "clip": clip_config}
HEADS_OF_64 = partial(unet_config_from_shapes, head_channels=64)  # SD 2.x and SDXL UNets


@dataclass(frozen=True)
class Family:
    name: str  # "sd1", "sdxl", ...: how code and metadata name it
    title: str  # how messages name it: "SD v1", "SDXL"
    detect: Callable[[StateDict], bool]  # whether a checkpoint's full state dict is of this family
    prefixes: Mapping[str, tuple[str, ...]]  # network -> its key prefixes in the file (the first is written)
    text_encoders: tuple[TextEncoderSpec, ...]
    configs: Mapping[str, Callable[[StateDict], object]] = field(default_factory=lambda: SD1_CONFIGS)
    # network -> its configuration from its weights (our names, prefix removed)
    renames: Mapping[str, Layout] = field(default_factory=dict)  # network -> the layout of its file keys
    kind: str = "text-to-image"  # "inpainting" (the UNet takes the mask and masked latents too) or "refiner"
    # (it refines images: image-to-image, or the last steps of a base's run)
    scale_factor: float = SD_V1_SCALE  # the latent scale, for files that do not store one
    image_size: int = SD_V1_SIZE  # the size it was trained at: the default width and height
    v_image_size: int | None = None  # the size of its v-prediction models, where it differs (SD 2.x 768-v)
    prediction_type: str = "epsilon"  # what the UNet predicts (`sd.parameterization.PREDICTION_TYPES`)
    prediction_open: bool = False  # its files do not tell the prediction type (`sd.prediction` probes the UNet)
    micro_conditions: tuple[str, ...] = ()  # what the UNet's vector embeds beside the pooled text (SDXL)
    side_multiple: int = 8  # image sides must be multiples of this (SDXL: 32, latents a multiple of 4)
    guidance_scale: float = 7.5  # the default classifier-free guidance scale (diffusers' for SD 1.x and 2.x)
    zero_empty_negative: bool = False  # an empty negative prompt conditions as zeros (AUTOMATIC1111's SDXL rule)
    vae_upcast: bool = False  # its VAE overflows in float16: a float16 VAE computes in float32 (SDXL's)
    refinable: bool = False  # an SDXL refiner may take over the last steps of its runs

    def default_size(self, prediction_type: str) -> int:
        """The default width and height of its models of `prediction_type`."""
        return self.v_image_size if prediction_type == "v_prediction" and self.v_image_size else self.image_size


def has_prefix(s: StateDict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in s)


def missing_networks(s: StateDict, prefixes: Mapping[str, tuple[str, ...]]) -> list[str]:
    """The networks of `prefixes` that `s` holds no weights for."""
    return [net for net, ps in prefixes.items() if not any(k.startswith(ps) for k in s)]


def unet_in_channels(s: StateDict) -> int | None:
    weight = s.get(UNET_PREFIX + "input_blocks.0.0.weight")
    return weight.shape[1] if weight is not None and weight.dim() == 4 else None


SD1_PREFIXES = {
    "unet": (UNET_PREFIX,),
    "vae": (VAE_PREFIX,),
    "clip": ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."),
}
SD1 = Family(name="sd1", title="SD v1", detect=lambda s: not missing_networks(s, SD1_PREFIXES),
             prefixes=SD1_PREFIXES, text_encoders=(TextEncoderSpec(),))
SD1_INPAINTING = replace(SD1, name="sd1-inpainting", kind="inpainting",
                         detect=lambda s: SD1.detect(s) and unet_in_channels(s) == 9)

# SD 2.x: OpenCLIP ViT-H, conditioning on its penultimate layer then ln_final, padded with id 0; UNet heads of
# 64 channels, Linear projections. 512-base (epsilon) and 768-v (v) files have the same keys and shapes. The
# same networks also come in sgm's layout (the tower under conditioner.embedders.0.model.), which without a
# label_emb is not the SDXL refiner's.
SD2_CLIP_PREFIXES = ("cond_stage_model.model.", "conditioner.embedders.0.model.")


def is_sd2(s: StateDict) -> bool:
    return has_prefix(s, SD2_CLIP_PREFIXES[0]) or (
        has_prefix(s, SD2_CLIP_PREFIXES[1]) and not has_prefix(s, "conditioner.embedders.1.")
        and UNET_PREFIX + "label_emb.0.0.weight" not in s)


SD2 = Family(name="sd2", title="SD 2.x", detect=is_sd2,
             prefixes={"unet": (UNET_PREFIX,), "vae": (VAE_PREFIX,), "clip": SD2_CLIP_PREFIXES},
             text_encoders=(TextEncoderSpec(pad_id=0, hidden_layer=-2),),
             configs={**SD1_CONFIGS, "unet": HEADS_OF_64, "clip": partial(clip_config, activation="gelu")},
             renames={"clip": OPEN_CLIP}, v_image_size=768, prediction_open=True)
SD2_INPAINTING = replace(SD2, name="sd2-inpainting", title="SD 2.x inpainting", kind="inpainting",
                         v_image_size=None, prediction_open=False,
                         detect=lambda s: SD2.detect(s) and unet_in_channels(s) == 9)

# SDXL (Podell et al., 2023): CLIP ViT-L and OpenCLIP bigG, both on their penultimate layer without the final
# norm, concatenated (2048); bigG's pooled output and the micro-conditions form the vector label_emb takes (2816
# wide; the refiner's: 2560, bigG alone, with the aesthetic score in place of the target size). Clip skip N moves
# CLIP ViT-L only, to its N-th last layer, never nearer the end than the penultimate (AUTOMATIC1111's
# "sdxl_clip_l_skip" but at 1, the default, which stays SDXL's own); bigG stays.
# Their textual-inversion files hold vectors for each, {"clip_l": (n, 768), "clip_g": (n, 1280)} (kohya's, A1111's).
VIT_L_XL = TextEncoderSpec(hidden_layer=-2, final_norm=False, clip_skip="from_last", embedding_key="clip_l")
BIG_G = TextEncoderSpec(name="clip_g", pad_id=0, hidden_layer=-2, final_norm=False, pooled=True, clip_skip="none",
                        embedding_key="clip_g")
SDXL_CONFIGS = {**SD1_CONFIGS, "unet": HEADS_OF_64, "clip_g": partial(clip_config, activation="gelu")}
SDXL = Family(name="sdxl", title="SDXL", detect=lambda s: has_prefix(s, "conditioner.embedders.1."),
              prefixes={"unet": (UNET_PREFIX,), "vae": (VAE_PREFIX,),
                        "clip": ("conditioner.embedders.0.transformer.text_model.",
                                 "conditioner.embedders.0.transformer."),
                        "clip_g": ("conditioner.embedders.1.model.",)},
              text_encoders=(VIT_L_XL, BIG_G), configs=SDXL_CONFIGS, renames={"clip_g": OPEN_CLIP},
              scale_factor=0.13025, image_size=1024, micro_conditions=("original_size", "crop", "target_size"),
              side_multiple=32, guidance_scale=7.0, zero_empty_negative=True, vae_upcast=True, refinable=True)
SDXL_INPAINTING = replace(SDXL, name="sdxl-inpainting", title="SDXL inpainting", kind="inpainting",
                          detect=lambda s: SDXL.detect(s) and unet_in_channels(s) == 9)
SDXL_REFINER = replace(SDXL, name="sdxl-refiner", title="SDXL refiner", kind="refiner", refinable=False,
                       text_encoders=(BIG_G,),
                       prefixes={"unet": (UNET_PREFIX,), "vae": (VAE_PREFIX,),
                                 "clip_g": ("conditioner.embedders.0.model.",)},
                       micro_conditions=("original_size", "crop", "aesthetic_score"),
                       detect=lambda s: has_prefix(s, "conditioner.embedders.0.model.")
                       and not has_prefix(s, "conditioner.embedders.1.") and not is_sd2(s))

FAMILIES = {f.name: f for f in (SDXL_REFINER, SDXL_INPAINTING, SDXL, SD2_INPAINTING, SD2, SD1_INPAINTING,
                                SD1)}  # detection order
