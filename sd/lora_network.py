"""The trainable LoRA network as kohya's sd-scripts builds it (`networks/lora.py`), and the file it saves.

kohya puts a LoRA layer (`sd.lora_layers`) on every Linear and 1x1 convolution inside the UNet's transformers
(diffusers' Transformer2DModel: proj_in, proj_out, attn1 / attn2 q, k, v, out, the feed-forward's two) and
inside the text encoders' attention and MLP, at one rank and alpha (`--rank`, `--alpha`; 4 and 1 by default).
LoCon (`--conv-dim`, `--conv-alpha`) adds the res blocks, downsamplers and upsamplers: their 3x3 convolutions at
the conv rank, their Linear (the time embedding's projection) and 1x1 convolution (the shortcut) at the rank.
`UNET_TARGETS` and `TEXT_LAYERS` say it as patterns over our module paths, the same for SD 1.x, 2.x and SDXL. A text encoder's layers
after the one whose output conditions (SD 2.x's last, SDXL ViT-L's last) change nothing and get no LoRA: kohya's
and diffusers' SD 2.x text model has 23 layers, kohya's SDXL ViT-L keeps a dead 12th.

The file (`write_lora`) is kohya's: the layers' names by `sd.lora.written_name`, `.lora_down.weight`,
`.lora_up.weight`, `.alpha`, and string metadata: the caller's training settings, what the layers decide
(`ss_network_module`, `ss_network_dim`, `ss_network_alpha`, `ss_network_args`, `ss_network_dropout`,
`ss_base_model_version`, `ss_v2`) and `sshs_model_hash`, the SHA-256 of the bytes after the header, as
AUTOMATIC1111 and sd-webui-additional-networks hash a LoRA (`addnet_hash_safetensors`). Beside it, on request,
the same layers in diffusers/PEFT's layout (`<stem>.peft.safetensors`).
"""

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from sd.checkpoint import StableDiffusionModels
from sd.errors import InputError
from sd.files import tensor_bytes, write_atomically, write_safetensors
from sd.lora_layers import LoRALayer, check_rank, lora_candidates, lora_state_dict, network_layers, wrap_lora


@dataclass(frozen=True)
class LoRANetworkConfig:
    """kohya's network settings: rank and alpha of the Linear and 1x1 layers, LoCon's of the 3x3 convolutions
    (None: no LoCon), dropout of each LoRA layer's input, and which networks get layers."""

    rank: int = 4  # --rank (kohya's --network_dim)
    alpha: float = 1.0  # --alpha (--network_alpha)
    conv_rank: int | None = None  # --conv-dim (kohya's network_args conv_dim)
    conv_alpha: float = 1.0  # --conv-alpha
    dropout: float = 0.0  # --network-dropout
    unet: bool = True
    text_encoder: bool = True

    def __post_init__(self):
        for flag, rank in (("--rank", self.rank), ("--conv-dim", self.conv_rank)):
            if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
                raise InputError(f"{flag} must be a whole number >= 1, got {rank!r}")
        for flag, alpha in (("--alpha", self.alpha), ("--conv-alpha", self.conv_alpha)):
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
                raise InputError(f"{flag} must be a finite number > 0 (kohya's default: 1), got {alpha!r}")
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise InputError(f"--network-dropout must be a number from 0 up to (not including) 1, got {dropout!r}")
        if not (self.unet or self.text_encoder):
            raise InputError("a LoRA network with neither the UNet nor the text encoder trains nothing: train one")


@dataclass(frozen=True)
class Target:
    """Layers of one kind: a pattern over our module paths, whether they take the conv rank (else the rank), and
    whether only LoCon adds them."""

    pattern: str
    conv: bool = False
    locon: bool = False


UNET_TARGETS = (
    Target(r"\.(proj_in|proj_out|attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))$"),  # inside the transformers
    Target(r"\.(emb_layers\.1|skip_connection)$", locon=True),  # the res blocks' Linear and 1x1 convolution
    Target(r"\.(in_layers\.2|out_layers\.3|op|conv)$", conv=True, locon=True),  # 3x3: res blocks and resamplers
)
TEXT_LAYERS = r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"  # CLIPAttention and CLIPMLP, after `encoder.layers.N.`
RANK_FLAGS = {False: "--rank", True: "--conv-dim"}  # by Target.conv

# ss_base_model_version by family (kohya's model_util: "_v" added for v-prediction; sdxl_model_util's SDXL)
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd1-inpainting": "sd_v1", "sd2": "sd_v2", "sd2-inpainting": "sd_v2",
                       "sdxl": "sdxl_base_v1-0", "sdxl-inpainting": "sdxl_base_v1-0"}
NETWORK_MODULE = "networks.lora"  # kohya's module of this network
LAYOUT_SUFFIXES = {"peft": ".peft.safetensors", "kohya": ".safetensors"}  # written in this order: kohya's last
WRITTEN_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_network_dropout",
                "ss_base_model_version", "ss_v2", "sshs_model_hash")


def text_target(models: StableDiffusionModels, net: str) -> Target:
    """The text encoder's attention and MLP layers, of the layers that its conditioning reads through: all of
    them where it is pooled (bigG), else those up to its hidden layer."""
    spec = next(s for s in models.family.text_encoders if s.name == net)
    layers = len(getattr(models, net).encoder.layers)
    used = layers if spec.pooled else layers + 1 + spec.hidden_layer
    return Target(rf"^encoder\.layers\.({'|'.join(map(str, range(used)))})\.{TEXT_LAYERS}")


def network_targets(models: StableDiffusionModels, cfg: LoRANetworkConfig) -> list[tuple[str, Target]]:
    """(network name, Target) for every kind of layer `cfg` puts a LoRA on."""
    rows = [("unet", t) for t in UNET_TARGETS if cfg.unet and (cfg.conv_rank is not None or not t.locon)]
    if cfg.text_encoder:
        rows += [(spec.name, text_target(models, spec.name)) for spec in models.family.text_encoders]
    return rows


def add_lora_network(models: StableDiffusionModels, cfg: LoRANetworkConfig) -> dict[str, dict[str, LoRALayer]]:
    """Freeze the UNet and the text encoders and put kohya's LoRA layers in them (`network_targets`); every rank is
    checked against every layer first, so a refusal leaves the models as they were. Returns network name ->
    module path -> layer; the layers' down and up are the parameters to train."""
    rows = network_targets(models, cfg)
    for net, target in rows:
        rank = cfg.conv_rank if target.conv else cfg.rank
        for path, module in lora_candidates(getattr(models, net), target.pattern).items():
            check_rank(module, rank, RANK_FLAGS[target.conv], path)
    for net in ("unet", *(spec.name for spec in models.family.text_encoders)):
        getattr(models, net).requires_grad_(False)
    layers: dict[str, dict[str, LoRALayer]] = {}
    for net, target in rows:
        rank, alpha = (cfg.conv_rank, cfg.conv_alpha) if target.conv else (cfg.rank, cfg.alpha)
        layers.setdefault(net, {}).update(wrap_lora(getattr(models, net), target.pattern, rank, alpha, cfg.dropout,
                                                    RANK_FLAGS[target.conv]))
    return layers


def one_value(values: set, what: str, key: str):
    """The one value of a set (None if empty); refused if the layers disagree, as kohya's metadata holds one."""
    if len(values) > 1:
        raise InputError(f"the LoRA layers have {len(values)} different {what}s ({', '.join(map(str, sorted(values)))}); "
                         f"a kohya file's {key} is one: give every layer of that kind the same {what}")
    return next(iter(values), None)


def network_metadata(models: StableDiffusionModels) -> dict[str, str]:
    """What the LoRA layers of `models` (and the model) decide of kohya's metadata."""
    version = BASE_MODEL_VERSIONS.get(models.family.name)
    if version is None:
        raise InputError(f"kohya's LoRA files have no base model version for the {models.family.title}; train "
                         f"the LoRA on one of: {', '.join(sorted(BASE_MODEL_VERSIONS))}")
    layers = [layer for found in network_layers(models).values() for layer in found.values()]
    if not layers:
        raise InputError("the models have no LoRA layers to write: add them first (add_lora_network)")
    kinds = {conv: [layer for layer in layers if (math.prod(layer.down.weight.shape[2:]) > 1) is conv]
             for conv in (False, True)}  # LoCon's k x k convolutions, and the rest
    if not kinds[False]:
        raise InputError("the LoRA has only k x k convolution layers; kohya's file needs Linear or 1x1 layers, "
                         "whose rank is ss_network_dim")
    rank = one_value({layer.down.weight.shape[0] for layer in kinds[False]}, "rank", "ss_network_dim")
    alpha = one_value({layer.alpha for layer in kinds[False]}, "alpha", "ss_network_alpha")
    conv_rank = one_value({layer.down.weight.shape[0] for layer in kinds[True]}, "conv rank", "conv_dim")
    conv_alpha = one_value({layer.alpha for layer in kinds[True]}, "conv alpha", "conv_alpha")
    dropout = one_value({getattr(layer.dropout, "p", 0.0) for layer in layers}, "dropout", "ss_network_dropout")
    args = {} if conv_rank is None else {"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)}
    v = "_v" if models.prediction_type == "v_prediction" and not version.startswith("sdxl") else ""
    return {"ss_network_module": NETWORK_MODULE, "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_network_args": json.dumps(args), "ss_network_dropout": str(dropout),
            "ss_base_model_version": version + v, "ss_v2": str(version == "sd_v2")}


def metadata_text(value: object) -> str:
    """A metadata value as kohya writes it: strings as they are, dicts and lists as JSON, the rest by str()."""
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)


def data_sha256(state: dict) -> str:
    """SHA-256 of a .safetensors file's bytes after its header: the tensors' values in the order written."""
    digest = hashlib.sha256()
    for tensor in state.values():
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def write_lora(path: str | Path, models: StableDiffusionModels, metadata: dict[str, object], *,
               formats: tuple[str, ...] = ("kohya",)) -> list[Path]:
    """Write the LoRA layers of `models` to `path` in kohya's layout with `metadata` (the training settings,
    `ss_...` keys) and what the layers decide, all values strings; with "peft" in `formats` also in
    diffusers/PEFT's layout beside it (`<stem>.peft.safetensors`). Each file is written atomically, kohya's last.
    Returns the paths written."""
    path = Path(path)
    unknown = set(formats) - LAYOUT_SUFFIXES.keys()
    if unknown or not formats:
        raise InputError(f"LoRA file formats {sorted(unknown) or '(none)'}: give some of {', '.join(LAYOUT_SUFFIXES)}")
    if path.suffix.lower() != ".safetensors" or not path.parent.is_dir():
        raise InputError(f"{path}: a LoRA is written as a .safetensors file in a folder that exists")
    clash = sorted(k for k in metadata if not isinstance(k, str) or k in WRITTEN_KEYS)
    if clash:
        raise InputError(f"LoRA metadata {clash} is written from the layers themselves: leave it out")
    texts = {key: metadata_text(value) for key, value in metadata.items()}
    decided = network_metadata(models)
    written = []
    for layout, suffix in LAYOUT_SUFFIXES.items():
        if layout not in formats:
            continue
        state = lora_state_dict(models, layout)
        if layout == "kohya":  # (the PEFT file's up has alpha / r folded in: kohya's network keys would mislead)
            texts |= decided | {"sshs_model_hash": data_sha256(state)}
        target = path if layout == "kohya" else path.with_name(path.name[: -len(".safetensors")] + suffix)
        write_atomically(target, lambda tmp: write_safetensors(tmp, state, texts))
        written.append(target)
    return written
