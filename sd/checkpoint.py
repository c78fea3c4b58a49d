"""Load an original single-file Stable Diffusion checkpoint (CompVis layout) into the models of `sd`.

The file's family (`sd.families`: SD v1, 2.x and SDXL, each also inpainting, and the SDXL refiner) is
detected from its keys and shapes, and its record says how to read it. Our modules are named like the
checkpoint's keys, so the mapping is a few rules:
- one prefix per network (the family's `prefixes`; `PREFIXES` are SD v1's), and rename rules for
  layouts whose names differ from ours (the family's `renames`, `sd.layouts`: the OpenCLIP towers);
- full checkpoints carry EMA copies of the UNet as `model_ema.<UNet key without dots>`, which
  replace the UNet weights unless `use_ema=False`;
- the training buffers in `IGNORED_KEYS` (and any `...position_ids`) are not weights and are dropped;
- `scale_factor`, the latent scale LDM's `scale_by_std` measured, is read when present (else the family's);
- what the UNet predicts (epsilon or v) is decided by the rules of `sd.prediction`;
- a `ztsnr` key (ComfyUI's marker, beside `v_pred` in SDXL fine-tunes) says the model was trained for zero
  terminal SNR: its samplers take the rescaled schedule (`sd.samplers.schedule`).
Sizes are read off the tensors, so the same code loads the full model and tiny test models; files
written by `save_checkpoint` (the models this project trains) also carry their exact configurations,
image size, prediction type and caption vocabulary as JSON in the safetensors metadata (`METADATA_KEY`). The
models are built on the meta device and take the file's tensors as they are (`assign=True`), so
the weights are never held twice in memory. Each network's tensors are checked first (`sd.tensor_checks`:
floating point, not empty, finite, no larger than float16 holds), every tensor of the file for being one.

The public steps of `load_checkpoint`, for tools that work on the tensors (`weights_converter`):
`read_state_dict`, `read_metadata`, `detect_family` (`read_family`: from a file's header alone), `has_ema`
and `apply_ema`, `split_checkpoint`, `build_network`.
"""

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sd.clip import CLIPConfig, CLIPTextModel
from sd.errors import CheckpointError, InputError, UnsupportedModelError, checkpoint_not_found
from sd.families import (FAMILIES, SD1, SD2, SD_V1_SCALE, SD_V1_SIZE, UNET_CONTEXT_KEY, UNET_PREFIX, Family,
                         missing_networks)
from sd.files import write_atomically, write_safetensors
from sd.micro_conditioning import vector_width
from sd.prediction import V_PRED_KEY, decide, prediction_name
from sd.samplers.schedule import NoiseSchedule
from sd.unet import UNet, UNetConfig
from sd.vae import AutoencoderKL, VAEConfig
from sd.safe_pickle import LEGACY_MAGIC, ZIP_MAGIC, load_pickle_checkpoint
from sd.tensor_checks import check_tensors, structure_fault

PREFIXES = SD1.prefixes
EMA_PREFIX = "model_ema."
SCALE_KEY = "scale_factor"  # LDM's buffer for the measured latent scale
METADATA_KEY = "sd"  # safetensors metadata: {"configs": {net: config}, "image_size": int, "prediction_type": str,
#                      "zero_terminal_snr": bool, "vocabulary": [...]}
ZERO_SNR_KEY = "ztsnr"
ZERO_SNR_SCHEDULE = NoiseSchedule(zero_terminal_snr=True, trailing=True)
IGNORED_KEYS = re.compile(
    r"^(betas|alphas_cumprod(_prev)?|sqrt_(recip(m1)?_)?alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|posterior_(variance|log_variance_clipped|mean_coef[12])|logvar"
    r"|lvlb_weights|model_ema\..*|v_pred|ztsnr|denoiser\.sigmas)$|position_ids$")  # v_pred: read by `sd.prediction`;
#   denoiser.sigmas: sgm's sampling buffer, in SDXL files saved from a whole DiffusionEngine (AUTOMATIC1111's merges)


@dataclass
class StableDiffusionModels:
    """The networks of one checkpoint, and what kind of model the file holds. `clip` is CLIP ViT-L (SD v1, SDXL)
    or OpenCLIP ViT-H (SD 2.x), None in the SDXL refiner; `clip_g` is SDXL's OpenCLIP bigG."""

    clip: CLIPTextModel | None
    vae: AutoencoderKL
    unet: UNet
    clip_g: CLIPTextModel | None = None
    kind: str = "text-to-image"  # "inpainting" (9-channel UNet) or "refiner" (SDXL's)
    scale_factor: float = SD_V1_SCALE  # latents = scale_factor * VAE latents: about unit variance
    image_size: int = SD_V1_SIZE  # the size the model was trained at: the default width and height
    vocabulary: tuple[str, ...] | None = None  # the words of its training captions, when known
    family: Family = SD1  # the model family (`sd.families`): its text encoders, file layout
    prediction_type: str = "epsilon"  # what the UNet predicts (`sd.parameterization.PREDICTION_TYPES`)
    prediction_rule: str = "every SD v1 model"  # which rule of `sd.prediction` decided it
    schedule: NoiseSchedule = NoiseSchedule()  # the noise schedule it was trained with (zero terminal SNR or not)

    @property
    def is_inpainting(self) -> bool:
        return self.kind == "inpainting"

    @property
    def text_towers(self) -> list[CLIPTextModel]:
        """The text encoders of the family's stack, in its order."""
        return [getattr(self, spec.name) for spec in self.family.text_encoders]


def is_safetensors(path: Path) -> bool:
    """Tell the format by the first bytes (a zip or pickle .ckpt, or safetensors' 8-byte length and
    JSON header), not by the name, so a renamed file still gets a true error message."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(ZIP_MAGIC):
        return False
    if head[8:9] == b"{":  # before the pickle test: a header length can start with the pickle's first byte
        return True
    return not head.startswith(LEGACY_MAGIC[:1]) and path.suffix.lower() == ".safetensors"


SAFETENSORS_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def load_safetensors(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The file's tensors, memory-mapped (no copy) when their dtype is already `dtype`; otherwise read
    and converted one by one, so the file's copy is never held whole beside the converted one."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework="pt", backend="pread") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        if dtype is None or all(SAFETENSORS_FLOATS.get(d, dtype) == dtype for d in dtypes.values()):
            return load_file(path)
        return {k: f.get_tensor(k).to(dtype if d in SAFETENSORS_FLOATS else None) for k, d in dtypes.items()}


def unreadable_safetensors(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable .safetensors file ({e}); it may be truncated or corrupt: "
                           f"download it again.")


def as_path(value, what: str) -> Path:
    """The path argument `value` of a reader of `what` files, refused in one line when it is no path."""
    if not isinstance(value, (str, os.PathLike)):
        raise InputError(f"the {what} file must be given as a path (str or Path), got {type(value).__name__} "
                         f"{value!r:.60}")
    return Path(value)


def read_state_dict(path: str | Path, dtype: torch.dtype | None = None, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The flat {key: tensor} dict of a .ckpt or .safetensors file, without executing pickled code;
    `dtype`: the floating-point type the caller will convert to, which lets .safetensors files of
    another type be converted while reading; `what` the file is, in messages ("checkpoint", "LoRA")."""
    path = as_path(path, what)
    if not path.is_file():
        raise checkpoint_not_found(path) if what == "checkpoint" else CheckpointError(
            f"{what} file not found: {path}; check the path")
    try:
        safetensors = is_safetensors(path)
    except OSError as e:  # a folder, no permission, an I/O error: the input's fault, said as such
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror or e}.") from None
    if safetensors:
        from safetensors import SafetensorError
        try:
            state = load_safetensors(path, dtype)
        except (SafetensorError, OSError) as e:
            raise unreadable_safetensors(path, e) from None
    else:
        state = load_pickle_checkpoint(path, what)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    weights = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} \
        if isinstance(state, dict) else {}
    if not weights:
        raise CheckpointError(f"{path} holds no model weights: it is not a Stable Diffusion {what}.")
    check_tensors(path, weights, what, structure_fault)
    return weights


def ema_key(unet_key: str) -> str:
    """'model.diffusion_model.input_blocks.0.0.weight' -> 'model_ema.diffusion_modelinput_blocks00weight'."""
    return EMA_PREFIX + "".join(unet_key.split(".")[1:])


def has_ema(state: dict[str, torch.Tensor]) -> bool:
    """Whether the file carries EMA copies (`model_ema.*`) of every UNet weight (a full, not "emaonly", file)."""
    return all(ema_key(k) in state for k in state if k.startswith(UNET_PREFIX))


def apply_ema(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace the UNet weights by their EMA copies when the file carries them; without them, `state` itself."""
    if not has_ema(state):
        return state
    return {**state, **{k: state[ema_key(k)] for k in state if k.startswith(UNET_PREFIX)}}


def detect_family(path: Path, state: dict[str, torch.Tensor]) -> Family:
    """The family of a checkpoint's state dict (`sd.families.FAMILIES`, first match); a family this project
    does not run yet, or a file of no Stable Diffusion at all, is refused with the reason."""
    family = next((f for f in FAMILIES.values() if f.detect(state)), None)
    if family is None:  # name what is missing for the family its UNet's text width suggests
        context = state.get(UNET_CONTEXT_KEY)
        closest = SD2 if context is not None and context.dim() == 2 and context.shape[1] == 1024 else SD1
        missing = missing_networks(state, closest.prefixes)
        raise CheckpointError(f"{path} is not a Stable Diffusion checkpoint this project reads: as {closest.title} "
                              f"it has no weights for the {', '.join(missing)} (keys starting with "
                              f"{', '.join(closest.prefixes[n][0] for n in missing)}).")
    return family


def read_family(path: Path) -> Family | None:
    """The family of a .safetensors checkpoint from its header alone, the keys and shapes of its tensors (none is
    read: milliseconds for a file of gigabytes), so that settings can be checked for it before it loads; refused
    as `load_checkpoint` would refuse it (unreadable, no Stable Diffusion). None for a pickle .ckpt, whose keys
    only its whole unpickling tells."""
    if not is_safetensors(path):
        return None
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise unreadable_safetensors(path, e) from None
    return detect_family(path, shapes)


def split_checkpoint(path: Path, state: dict[str, torch.Tensor], family: Family,
                     use_ema: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """The weights of each network of `family` ({'unet': {...}, 'vae': {...}, 'clip': {...}} for SD v1) under
    our module names: with the EMA UNet when the file has one and `use_ema`, without the training buffers,
    prefixes removed and the family's renames applied; keys of no network are an error."""
    state = apply_ema(state) if use_ema else state
    parts: dict[str, dict[str, torch.Tensor]] = {net: {} for net in family.prefixes}
    seen = {net: ps[0] for net, ps in family.prefixes.items()}  # the prefix each network's keys have
    unexpected = []
    for key, tensor in state.items():
        if IGNORED_KEYS.search(key) or key == SCALE_KEY:  # SCALE_KEY is read by `scale_of`
            continue
        net, prefix = next(((n, p) for n, ps in family.prefixes.items() for p in ps if key.startswith(p)),
                           (None, None))
        if net is None:
            unexpected.append(key)
        else:
            parts[net][key[len(prefix):]] = tensor
            seen[net] = prefix
    if unexpected:
        raise CheckpointError(f"{path} has {len(unexpected)} keys that are not part of {family.title}: "
                              f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    return {net: family.renames[net].read(weights, f"{path}: {seen[net]}") if net in family.renames else weights
            for net, weights in parts.items()}


CONFIGS = {"unet": UNetConfig, "vae": VAEConfig, "clip": CLIPConfig, "clip_g": CLIPConfig}
NETWORKS = {"unet": UNet, "vae": AutoencoderKL, "clip": CLIPTextModel, "clip_g": CLIPTextModel}


def config_from_json(net: str, values: dict) -> UNetConfig | VAEConfig | CLIPConfig:
    """A config dataclass from its JSON form (tuples come back as lists)."""
    return CONFIGS[net](**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def build_network(path: Path, family: Family, net: str, weights: dict[str, torch.Tensor], device, dtype,
                  stored: dict | None = None) -> nn.Module:
    """Network `net` of `split_checkpoint`: built on the meta device, configured as `stored` (a config's JSON
    form) says or as the family reads it off the weights' shapes, then given those weights (popped from
    `weights`) on `device` in `dtype` (None: as they are)."""
    cls = NETWORKS[net]
    layout = family.renames.get(net)

    def named(key: str) -> str:  # our key as the file names it, for messages
        return family.prefixes[net][0] + (layout.file_key(key) if layout is not None else key)

    check_tensors(path, weights, "checkpoint", named=named)  # before the configuration is read off their shapes
    try:
        cfg = config_from_json(net, stored) if stored else family.configs[net](weights)
        with torch.device("meta"):
            model = cls(cfg)  # a stored config that cannot build (e.g. channels not divisible by groups) fails here
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the {net} configuration in its metadata is not valid ({e}); the file "
                              f"is damaged: write it again.") from None
    except KeyError as e:
        raise CheckpointError(f"{path}: the {net} weights lack {named(e.args[0])}; the file is "
                              f"incomplete or not an {family.title} checkpoint.") from None
    expected = model.state_dict().keys()
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or unexpected:
        listing = "; ".join(f"{what}: {', '.join(list(dict.fromkeys(map(named, keys)))[:5])}"
                            f"{' ...' if len(keys) > 5 else ''} ({len(keys)} in all)"
                            for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
        raise CheckpointError(f"{path}: the {net} weights do not fit {family.title}: {listing}")
    for key, param in model.state_dict().items():
        if weights[key].shape != param.shape:
            raise CheckpointError(f"{path}: {named(key)} has shape {tuple(weights[key].shape)}, "
                                  f"expected {tuple(param.shape)}; the file is not an {family.title} checkpoint.")
    # Convert tensor by tensor, dropping each source as we go, so at most one extra tensor is held.
    model.load_state_dict({k: weights.pop(k).to(device=device, dtype=dtype) for k in list(weights)}, assign=True)
    return model.eval().requires_grad_(False)


def read_metadata(path: Path) -> dict:
    """What `save_checkpoint` stored in a .safetensors file's metadata under METADATA_KEY; {} for other files."""
    if not is_safetensors(path):
        return {}
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
        stored = json.loads(text) if text else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable_safetensors(path, e) from None
    if not isinstance(stored, dict) or not isinstance(stored.get("configs", {}), dict):
        raise CheckpointError(f"{path}: its {METADATA_KEY!r} metadata is not a JSON object of the expected form; "
                              f"the file is damaged: write it again.")
    return stored


def scale_of(path: Path, state: dict[str, torch.Tensor], family: Family) -> float:
    """The latent scale stored under SCALE_KEY, or the family's."""
    value = state.get(SCALE_KEY)
    if value is None:
        return family.scale_factor
    if value.numel() != 1 or not torch.isfinite(value).all() or float(value) <= 0:
        raise CheckpointError(f"{path}: {SCALE_KEY} must be one positive number, got {value.flatten()[:4].tolist()}; "
                              f"the file is damaged.")
    return float(value)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    use_ema: bool = True, prediction: str | None = None) -> StableDiffusionModels:
    """Load the text encoders, VAE and UNet of an SD 1.x, 2.x or SDXL checkpoint (.ckpt or .safetensors), as
    its family (`detect_family`) says; `prediction`: "v" or "epsilon" to override what `sd.prediction` decides."""
    path = as_path(path, "checkpoint")
    if prediction is not None:
        prediction_name(prediction)  # before any reading
    state = read_state_dict(path, dtype)
    stored = read_metadata(path)
    family = detect_family(path, state)
    scale_factor = scale_of(path, state, family)
    marked = V_PRED_KEY in state
    schedule = ZERO_SNR_SCHEDULE if ZERO_SNR_KEY in state or stored.get("zero_terminal_snr") else NoiseSchedule()
    parts = split_checkpoint(path, state, family, use_ema)
    del state
    configs = stored.get("configs", {})
    models = {net: build_network(path, family, net, parts.pop(net), device, dtype, configs.get(net))
              for net in list(parts)}
    in_channels = models["unet"].config.in_channels
    if in_channels not in (4, 9):
        raise UnsupportedModelError(f"{path}: its UNet takes {in_channels} input channels (8 is InstructPix2Pix); "
                                    f"only 4 (text-to-image) and 9 (inpainting) are supported.")
    widths = [models[spec.name].config.width for spec in family.text_encoders]
    if models["unet"].config.context_dim != sum(widths):
        raise CheckpointError(f"{path}: the UNet expects {models['unet'].config.context_dim}-wide text features "
                              f"but the text encoders give {' + '.join(map(str, widths))}; the file mixes models.")
    check_vector_width(path, family, models)
    decision = decide(path, family, lambda: models["unet"], requested=prediction, marked=marked,
                      stored=stored.get("prediction_type"))
    vocabulary = stored.get("vocabulary")
    return StableDiffusionModels(**{"clip": None, **models}, kind=family.kind, scale_factor=scale_factor,
                                 image_size=int(stored.get("image_size", family.default_size(decision.prediction_type))),
                                 vocabulary=tuple(vocabulary) if isinstance(vocabulary, list) else None, family=family,
                                 prediction_type=decision.prediction_type, prediction_rule=decision.rule,
                                 schedule=schedule)


def check_vector_width(path: Path, family: Family, models: dict[str, nn.Module]) -> None:
    """The width label_emb takes must be the pooled text's and the micro-conditions' (SDXL); no label_emb without."""
    pooled = [models[spec.name].config for spec in family.text_encoders if spec.pooled]
    expected = vector_width(pooled[0].projection_dim or pooled[0].width, family.micro_conditions) if pooled else None
    if models["unet"].config.adm_in_channels != expected:
        raise CheckpointError(f"{path}: the UNet's label_emb takes {models['unet'].config.adm_in_channels or 'no'} "
                              f"conditioning channels where {family.title} gives {expected or 'none'}; the file "
                              f"mixes models or is not an {family.title} checkpoint.")


def save_checkpoint(models: StableDiffusionModels, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write `models` as a CompVis-layout .safetensors file (atomically) that `load_checkpoint` reads back:
    the weights under their family's prefixes and in its layout, the latent scale under SCALE_KEY, the
    configurations, image size, prediction type and vocabulary in the metadata. `dtype`: store floating-point
    weights in this type (default: as they are)."""
    family = models.family
    state = {}
    for net, prefixes in family.prefixes.items():
        weights = getattr(models, net).state_dict()
        weights = family.renames[net].write(weights) if net in family.renames else weights
        state.update({prefixes[0] + k: v.detach().to("cpu", dtype if v.is_floating_point() else None).contiguous()
                      for k, v in weights.items()})
    state[SCALE_KEY] = torch.tensor(models.scale_factor, dtype=torch.float32)
    stored = {"configs": {net: dataclasses.asdict(getattr(models, net).config) for net in family.prefixes},
              "image_size": models.image_size, "prediction_type": models.prediction_type,
              "zero_terminal_snr": models.schedule.zero_terminal_snr}
    if models.vocabulary is not None:
        stored["vocabulary"] = list(models.vocabulary)
    write_atomically(Path(path), lambda tmp: write_safetensors(tmp, state, {"format": "pt",
                                                                            METADATA_KEY: json.dumps(stored)}))
