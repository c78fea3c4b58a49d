"""LoRA: low-rank additions to the weights of a Stable Diffusion model (Hu et al., 2021).

A LoRA file holds, for some layers W (out, in) of the UNet and the text encoder, two thin matrices,
down (r, in) and up (out, r), and a scale alpha; applied with a weight w, the layer becomes
W + w (alpha / r) up @ down. For 3x3 convolutions (LoCon) down is an r-channel k x k convolution and
up a 1x1 one, so the product is again a kernel of W's shape. Merged into W, a LoRA costs nothing when
sampling; the original values of the layers it touches (only those) are kept so that `unmerge`
restores them exactly.

Each kind of layer a file can hold is a patch: a frozen dataclass that reads itself from the file's keys
and gives `delta(shape)`, the change it makes to a weight of that shape. `PATCHES` says which key marks
which kind, so another kind (LoHa's Hadamard product, LoKr's Kronecker product) is one class and one row;
`LoRAPatch` is the one above, for Linear layers, 1x1 convolutions and k x k LoCon alike. The merger only
adds `delta` to the weights. Trainable, unmerged layers that save as such a file are in `sd/lora_layers.py`.

Two file layouts:
- kohya's (what model sites share): `lora_unet_<UNet module path, "." -> "_">` and `lora_te_` / `lora_te1_`
  (the first text encoder: CLIP ViT-L, SD 2.x's ViT-H) and `lora_te2_` (SDXL's OpenCLIP bigG, in
  transformers' names `text_model.encoder.layers.N.self_attn.q_proj`) `<text-model path>` keys with
  `.lora_down.weight`, `.lora_up.weight`, `.alpha` (alpha missing or 0 means alpha = r). The UNet path is
  diffusers' (`down_blocks_1_attentions_0_...`: kohya trains SD v1 and 2.x on diffusers' UNet) or the
  CompVis/sgm one, which is ours (`input_blocks_4_1_...`: kohya's SDXL trainer has its own sgm UNet);
  diffusers' `convert_state_dict_to_kohya` writes SD v1's text encoder as `lora_te1_` (AUTOMATIC1111 reads
  it as `lora_te_` on SD v1 and 2.x);
- diffusers/PEFT's: `unet.<diffusers path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<transformers
  path>...` and `text_encoder_2.` (bigG), alpha = r unless an `.alpha` key says otherwise.
The SDXL refiner's one text encoder is bigG, named as in diffusers' refiner pipeline (`text_encoder_2`):
`lora_te2_` and `text_encoder_2.`; a layer of a text encoder the model lacks is refused.
The text encoder's path is `text_model.encoder.layers...` up to transformers 4 and `encoder.layers...` from
transformers 5 on (its CLIPTextModel lost the `text_model` level): both spellings are read, in both layouts.
A file for another family is refused in one line that names both (`family_fault`): by the width of the text
context its cross-attention reads (768 SD v1, 1024 SD 2.x, 2048 SDXL, 1280 the refiner), or by layers of a
text encoder the model lacks (`lora_te2_` is SDXL's).
Every tensor a layer uses is checked (`sd.tensor_checks`), and so are the shapes of the pair, before
anything is merged; the merger also computes every new weight once before it changes the first, so a LoRA
that would overflow the model's dtype is refused with the model unchanged.
Our UNet keeps CompVis names, so the diffusers path of each of its layers is derived by the rules of
`diffusers_unet_path` (those of AUTOMATIC1111's `convert_diffusers_name_to_compvis`, run backwards).
"""

import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn

from sd.checkpoint import StableDiffusionModels, as_path, read_state_dict
from sd.errors import CheckpointError, InputError
from sd.tensor_checks import check_tensors, tensor_fault, value_fault
from sd.unet import UNetConfig

# Each network's prefixes: (kohya's, diffusers/PEFT's); the first is the one we write.
PREFIXES = {"unet": (("lora_unet_",), ("unet.",)), "clip": (("lora_te_", "lora_te1_"), ("text_encoder.",)),
            "clip_g": (("lora_te2_",), ("text_encoder_2.",))}
TEXT_MODEL = "text_model."  # the level above a text tower's modules up to transformers 4 (and in kohya's names)
EMBEDDING_NAMES = {"time_embed": "time_embedding", "label_emb": "add_embedding"}  # the UNet's MLPs of t and the vector
RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
# The families by the width of the text context their UNet's cross-attention reads, and by a text encoder of theirs
CONTEXT_FAMILIES = {768: "SD v1", 1024: "SD 2.x", 2048: "SDXL", 1280: "the SDXL refiner"}
TOWER_FAMILIES = {"clip_g": "SDXL"}  # (the first text encoder, ViT-L or ViT-H, is that of several)
CROSS_ATTENTION = re.compile(r"attn2[._]to_[kv]$")  # the layers that read the text context, in every spelling
_DOWN, _UP = (".lora_down.weight", ".lora_A.weight"), (".lora_up.weight", ".lora_B.weight")


def diffusers_unet_path(path: str, cfg: UNetConfig) -> str:
    """The diffusers name of one of our (CompVis-named) UNet modules, e.g. 'input_blocks.4.1.proj_in' ->
    'down_blocks.1.attentions.0.proj_in', 'output_blocks.2.1.conv' -> 'up_blocks.0.upsamplers.0.conv'."""
    head, *rest = path.split(".")
    per_level = cfg.num_res_blocks + 1  # down: res blocks + a downsampler; up: res blocks, the last upsampling
    if head in EMBEDDING_NAMES:  # time_embed.0, label_emb.0.2
        return f"{EMBEDDING_NAMES[head]}.linear_{int(rest[-1]) // 2 + 1}"
    if head == "out":
        return {"0": "conv_norm_out", "2": "conv_out"}[rest[0]]
    if head == "input_blocks" and rest[0] == "0":
        return "conv_in"
    if head == "middle_block":
        k, tail = int(rest[0]), rest[1:]
        block = "mid_block.attentions.0" if k == 1 else f"mid_block.resnets.{k // 2}"
    else:
        n, k, tail = int(rest[0]), int(rest[1]), rest[2:]
        level, j = divmod(n - 1 if head == "input_blocks" else n, per_level)
        side = "down" if head == "input_blocks" else "up"
        if tail in (["op"], ["conv"]):  # the resamplers
            return f"{side}_blocks.{level}.{side}samplers.0.conv"
        block = f"{side}_blocks.{level}.{'resnets' if k == 0 else 'attentions'}.{j}"
    tail = ".".join(tail)
    for compvis, diffusers in RESNET_NAMES.items():
        if tail == compvis or tail.startswith(compvis + "."):
            tail = diffusers + tail[len(compvis):]
    return f"{block}.{tail}"


def lora_names(net: str, path: str, config) -> tuple[str, ...]:
    """The names a LoRA file gives the module at `path` of our network `net` ('unet', 'clip' or 'clip_g'):
    kohya's spellings, then diffusers/PEFT's, e.g. ('lora_unet_down_blocks_1_attentions_0_proj_in',
    'lora_unet_input_blocks_4_1_proj_in', 'unet.down_blocks.1.attentions.0.proj_in')."""
    kohya, peft = PREFIXES[net]
    if net == "unet":  # diffusers' path, then ours (the CompVis/sgm one); PEFT's files have only diffusers'
        diffusers = diffusers_unet_path(path, config)
        paths, peft_paths = (diffusers, path), (diffusers,)
    else:  # with and without transformers 4's text_model. level
        paths = peft_paths = (TEXT_MODEL + path, path)
    return (*(k + p.replace(".", "_") for k in kohya for p in paths), *(k + p for k in peft for p in peft_paths))


def written_name(layout: str, net: str, path: str, models: StableDiffusionModels) -> str:
    """The name the module at `path` of our network `net` gets in a file we write, in `layout` "kohya" (as
    kohya's trainers name it: SD 1.x and 2.x on diffusers' UNet, `lora_unet_<diffusers path>` and `lora_te_`; SDXL
    on its own sgm UNet, `lora_unet_<our path>` and `lora_te1_` / `lora_te2_`, numbered where there are two text
    encoders) or "peft" (`unet.<diffusers path>`, `text_encoder.text_model.<path>`, `text_encoder_2.text_model.`)."""
    two_towers = models.clip_g is not None
    if net == "unet":
        diffusers = diffusers_unet_path(path, models.unet.config)
        name = {"kohya": (path if two_towers else diffusers).replace(".", "_"), "peft": diffusers}[layout]
    else:
        name = {"kohya": (TEXT_MODEL + path).replace(".", "_"), "peft": TEXT_MODEL + path}[layout]
    kohya_prefix = {"unet": "lora_unet_", "clip": "lora_te1_" if two_towers else "lora_te_", "clip_g": "lora_te2_"}
    return {"kohya": kohya_prefix[net], "peft": PREFIXES[net][1][0]}[layout] + name


def lora_targets(models: StableDiffusionModels) -> dict[str, nn.Module]:
    """Every layer a LoRA can change, by each name a LoRA file may give it (`lora_names`): kohya's and
    diffusers' spellings, 'lora_unet_down_blocks_0_...', 'lora_unet_input_blocks_1_...', 'unet.down_blocks.0....';
    the names we write (each layer's first) come first."""
    named = [(lora_names(net, path, model.config), module) for net in PREFIXES
             if (model := getattr(models, net)) is not None
             for path, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    return {names[k]: module for k in range(max(len(names) for names, _ in named))
            for names, module in named if k < len(names)}


class Patch:
    """What each kind of layer of a LoRA file is, as a frozen dataclass of tensors (and numbers):
    `read(state, name, path)` builds it from the file's keys for layer `name`; `shape` is the shape of the
    change it makes before it is laid out like the weight; `delta(shape, strength)` is that change in
    float32, of the weight's `shape`."""

    shape: tuple[int, ...]

    def fits(self, shape: torch.Size) -> bool:
        """Whether the change can be laid out as a weight of `shape`: the same (out, in), as many values."""
        return self.shape[:2] == tuple(shape[:2]) and math.prod(self.shape) == shape.numel()

    def to(self, device: torch.device) -> "Patch":
        """The same patch with its tensors on `device`."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def alpha_fault(alpha: torch.Tensor) -> str | None:
    """Why a (structurally sound) `.alpha` tensor is not one number, finite and at most MAX_MAGNITUDE; or None."""
    if alpha.numel() != 1:
        return f"has shape {tuple(alpha.shape)} where alpha is one number"
    if alpha.dtype == torch.bool:
        return "is a bool where alpha is a number"
    return value_fault(alpha.double(), min_dim=0)


def file_alpha(state: dict[str, torch.Tensor], name: str, path: Path, rank: int) -> float:
    """The `.alpha` of layer `name`; missing or 0 means alpha = r (no scaling)."""
    alpha = state.get(name + ".alpha")
    if alpha is None:
        return float(rank)
    check_tensors(path, {name + ".alpha": alpha}, "LoRA", alpha_fault)
    return float(alpha) or float(rank)


def pair_fault(down: torch.Tensor, up: torch.Tensor) -> str | None:
    """Why down and up cannot be a low-rank pair, down (r, in[, k, k]) and up (out, r[, 1, 1]); or None."""
    shapes = f"down {tuple(down.shape)} and up {tuple(up.shape)}"
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        return f"has matrices of shapes {shapes}, where a pair is (r, in) and (out, r) or, for a convolution, " \
               f"(r, in, k, k) and (out, r, 1, 1)"
    if up.shape[2:] != (1, 1)[: up.dim() - 2] or up.shape[1] != down.shape[0]:
        return f"has matrices of shapes {shapes}: up must be (out, r) or (out, r, 1, 1), with down's rank r"
    return None


@dataclass(frozen=True)
class LoRAPatch(Patch):
    """W + strength (alpha / r) up @ down: a Linear layer (down (r, in), up (out, r)), a 1x1 convolution, or
    LoCon's k x k one (down an r-channel k x k kernel (r, in, k, k), up a 1x1 one (out, r, 1, 1))."""

    down: torch.Tensor  # (r, in[, k, k])
    up: torch.Tensor  # (out, r[, 1, 1])
    alpha: float

    @classmethod
    def read(cls, state: dict[str, torch.Tensor], name: str, path: Path) -> "LoRAPatch":
        down_key = next(name + s for s in _DOWN if name + s in state)
        up_key = next((name + s for s in _UP if name + s in state), None)
        if up_key is None:
            raise InputError(f"{path}: {name} has a down matrix but no up matrix; the file is damaged")
        check_tensors(path, {down_key: state[down_key], up_key: state[up_key]}, "LoRA", lambda t: tensor_fault(t, 2))
        down, up = state[down_key], state[up_key]
        problem = pair_fault(down, up)
        if problem:
            raise CheckpointError(f"{path}: {name} {problem}; the LoRA is damaged: get a trusted copy")
        return cls(down, up, file_alpha(state, name, path, down.shape[0]))

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], self.down.shape[1], *self.down.shape[2:])  # (out, in[, k, k])

    def delta(self, shape: torch.Size, strength: float = 1.0) -> torch.Tensor:
        """strength (alpha / r) up @ down in float32, shaped like the weight: (out, in) or (out, in, k, k)."""
        return strength * (self.alpha / self.rank) * \
            (self.up.float().flatten(1) @ self.down.float().flatten(1)).reshape(shape)  # (out, in[, k, k])

    def kohya_state(self, name: str) -> dict[str, torch.Tensor]:
        """The patch as layer `name` of a kohya file."""
        return {name + _DOWN[0]: self.down, name + _UP[0]: self.up, name + ".alpha": torch.tensor(self.alpha)}

    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        """The patch as layer `name` of a diffusers/PEFT file: lora_A = down, lora_B = (alpha / r) up, the scale
        folded into up, since such a file has no alpha (diffusers and we read it as alpha = r)."""
        return {name + _DOWN[1]: self.down, name + _UP[1]: self.up * (self.alpha / self.rank)}


PATCHES: dict[str, type[Patch]] = {_DOWN[0]: LoRAPatch, _DOWN[1]: LoRAPatch}  # the key that marks a layer's kind


@dataclass
class LoRA:
    """A LoRA file read: for each layer it changes, its patch."""

    path: Path
    layers: dict[str, Patch]
    unmatched: list[str] = field(default_factory=list)  # layer names that no layer of the model has


def family_fault(patches: dict[str, "Patch"], models: StableDiffusionModels) -> str | None:
    """Why the layers of a LoRA file are for another model family, said as 'for <family> (why)'; or None. The
    text context its cross-attention reads tells the family; so do layers of a text encoder the model lacks."""
    context = models.unet.config.context_dim
    width = next((p.shape[1] for name, p in patches.items() if CROSS_ATTENTION.search(name)
                  and p.shape[1] != context), None)
    if width is not None:
        return (f"for {CONTEXT_FAMILIES.get(width, 'another model')} (its cross-attention reads a text context "
                f"{width} wide, this model's {context})")
    for net, (kohya, peft) in PREFIXES.items():
        name = next((n for n in patches if n.startswith(kohya + peft)), None)
        if getattr(models, net) is None and name is not None:
            return (f"for {TOWER_FAMILIES.get(net, 'another model')} (its layer {name} is of a text encoder this one "
                    f"lacks)")
    return None


def read_lora(path: str | Path, models: StableDiffusionModels) -> LoRA:
    """A kohya or diffusers/PEFT LoRA file, its layers matched to the model's; refused in one line if it is
    for another architecture or its shapes do not fit."""
    path = as_path(path, "LoRA")
    state = read_state_dict(path, what="LoRA")
    kinds = {key[: -len(suffix)]: kind for key in state for suffix, kind in PATCHES.items() if key.endswith(suffix)}
    if not kinds:
        raise InputError(f"{path} holds no LoRA layers (no keys ending in {' or '.join(PATCHES)}); give "
                         f"a LoRA file")
    patches = {name: kinds[name].read(state, name, path) for name in sorted(kinds)}
    title = models.family.title
    fault = family_fault(patches, models)
    if fault is not None:
        raise InputError(f"{path} is a LoRA {fault}; this is an {title} model: use a LoRA made for {title}")
    targets = lora_targets(models)
    layers, unmatched, named = {}, [], {}  # named: the layer name each module was found under
    for name, patch in patches.items():
        target = targets.get(name)
        if target is None:
            unmatched.append(name)
            continue
        if target in named:
            raise CheckpointError(f"{path} changes one layer twice, as {named[target]} and as {name}; the LoRA "
                                  f"is damaged: get a trusted copy")
        named[target] = name
        if not patch.fits(target.weight.shape):
            raise InputError(f"{path}: {name} makes a change of shape {tuple(patch.shape)} for a layer of shape "
                             f"{tuple(target.weight.shape)}; the LoRA is for another model than this "
                             f"{title} one: use a LoRA made for {title}")
        layers[name] = patch
    if not layers:
        raise InputError(f"{path}: none of its {len(kinds)} layers is a layer of this model (e.g. {unmatched[0]}); "
                         f"the LoRA is for another model")
    return LoRA(path, layers, unmatched)


def patched(weight: torch.Tensor, patch: Patch, strength: float) -> torch.Tensor:
    """weight + strength * the patch's change, summed in float32 and rounded once to the weight's dtype."""
    with torch.no_grad():
        return (weight.float() + patch.to(weight.device).delta(weight.shape, strength)).to(weight.dtype)


def add_patch(weight: torch.Tensor, patch: Patch, strength: float) -> None:
    """weight += strength * the patch's change (`patched`)."""
    with torch.no_grad():
        weight.copy_(patched(weight, patch, strength))


class LoRAMerger:
    """Merges LoRAs into a model's weights and takes them out again, keeping the original values of the
    layers touched (and only those)."""

    def __init__(self, models: StableDiffusionModels):
        self.models = models
        self.originals: dict[nn.Module, torch.Tensor] = {}
        self.loaded: list[tuple[LoRA, float]] = []

    def merge(self, lora: LoRA, weight: float) -> None:
        """Add `lora` at `weight`; refused, with no weight changed, if a merged weight would not be finite."""
        targets = lora_targets(self.models)
        for name, patch in lora.layers.items():  # the whole sum once, before the first weight changes
            dtype = targets[name].weight.dtype
            if not torch.isfinite(patched(targets[name].weight, patch, weight)).all():
                raise InputError(f"LoRA {lora.path} at weight {weight:g} makes the weights of {name} overflow "
                                 f"{str(dtype).removeprefix('torch.')}: use a lower weight, or load the model in "
                                 f"float32")
        for name, patch in lora.layers.items():
            module = targets[name]
            if module not in self.originals:
                self.originals[module] = module.weight.detach().clone()
            add_patch(module.weight, patch, weight)
        self.loaded.append((lora, weight))

    def unmerge(self) -> None:
        with torch.no_grad():
            for module, original in self.originals.items():
                module.weight.copy_(original)
        self.originals.clear()
        self.loaded.clear()


LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")  # AUTOMATIC1111's <lora:name:weight>
TAG_UNSAFE = ":<>"  # what the name in such a tag cannot hold


def lora_tags(prompt: str) -> tuple[str, list[tuple[str, str]]]:
    """AUTOMATIC1111's `<lora:name:weight>` tags taken out of a prompt: (the prompt without them,
    [(name, weight text)]); the weight text is '' where none is given."""
    tags = [(m[1], m[2] or "") for m in LORA_TAG.finditer(prompt)]
    return LORA_TAG.sub("", prompt), tags


def with_lora(prompt: str, name: str, weight: str | None) -> str:
    """The prompt with its tags of LoRA `name` (in any case) given `weight`, or, where it has none, one tag
    `<lora:name:weight>` (weight 1 by default) added at the end."""
    def same(match: re.Match) -> bool:
        return match[1].lower() == name.lower()

    if not any(same(m) for m in LORA_TAG.finditer(prompt)):
        return f"{prompt} <lora:{name}:{weight or 1}>"
    if weight is None:
        return prompt
    return LORA_TAG.sub(lambda m: f"<lora:{name}:{weight}>" if same(m) else m[0], prompt)
