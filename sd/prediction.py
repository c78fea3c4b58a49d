"""Which parameterization a checkpoint's UNet was trained for (`sd.parameterization`): epsilon or v.

SD 2.x's 512-base (epsilon) and 768-v (v-prediction) files have the same keys and shapes, so the file
alone may not tell. The first of these rules that speaks decides, and the decision says which one did:
1. the caller's choice (`prediction="v"`, `--prediction v`);
2. a `v_pred` key in the file (ComfyUI's marker of v-prediction models);
3. our own metadata (`sd.checkpoint.save_checkpoint` stores the decision);
4. a `<checkpoint>.yaml` beside the file, as AUTOMATIC1111 reads one: `parameterization: "v"` is v, a
   config without the key is epsilon;
5. for families whose files leave it open (SD 2.x): the UNet's answer to a fixed input, the check
   AUTOMATIC1111 and stable-diffusion.cpp run: x = 0.5 everywhere (1, 4, 8, 8), t = 999, a context of 0.5
   (1, 2, C); at t = 999 an epsilon model returns about the noise, so about x, a v model about -x0; v if
   mean(output - x) < -1;
6. the family's prediction type.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sd.conditioning import Conditioning
from sd.errors import CheckpointError, InputError
from sd.parameterization import PREDICTION_TYPES

NAMES = {"v": "v_prediction", "v_prediction": "v_prediction", "epsilon": "epsilon", "eps": "epsilon"}
CHOICES = ("v", "epsilon")  # how users name them
SHORT = {"v_prediction": "v", "epsilon": "epsilon"}
V_PRED_KEY = "v_pred"
YAML_LIMIT = 1 << 20  # bytes of a config file read; model configs are a few kB
PROBE_SIZE, PROBE_VALUE, PROBE_T, PROBE_THRESHOLD = 8, 0.5, 999, -1.0


@dataclass(frozen=True)
class Decision:
    prediction_type: str  # a value of sd.parameterization.PREDICTION_TYPES
    rule: str  # which rule decided, in words


def prediction_name(value, what: str = "prediction") -> str:
    """The prediction type a user's name stands for ("v" or "epsilon"); anything else is refused."""
    if not isinstance(value, str) or value not in NAMES:
        raise InputError(f"{what} must be one of {', '.join(CHOICES)}, got {value!r}")
    return NAMES[value]


# A line of the YAML that model configs are written in: blank, a comment, a list item, `key: value` or `key:`
# (spaces only: YAML indents without tabs).
_YAML_LINE = re.compile(r""" *(\#.*|-( .*)?|("[^"]*"|'[^']*'|[^\s:#'"][^:#]*?) *:( .*)?)? *""")
_PARAMETERIZATION = re.compile(r" *parameterization *: *['\"]?([^'\"#\s]*)['\"]? *(#.*)?")


def yaml_parameterization(path: Path) -> str | None:
    """What `path` (an AUTOMATIC1111-style model config) says the parameterization is: "v_prediction" or
    "epsilon" (a config without the key); None where there is no such file."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(YAML_LIMIT + 1)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read the model config {path} ({e}); fix it, or remove it to let the "
                              f"checkpoint decide") from None
    if len(data) > YAML_LIMIT:
        raise CheckpointError(f"the model config {path} is over {YAML_LIMIT >> 20} MB, not a model config; "
                              f"remove it, or use --prediction")
    for number, line in enumerate(text.splitlines(), 1):
        if not _YAML_LINE.fullmatch(line):
            raise CheckpointError(f"the model config {path} is not YAML (line {number}: {line.strip()[:40]!r}); "
                                  f"fix it, or remove it to let the checkpoint decide")
    values = [m[1] for line in text.splitlines() if (m := _PARAMETERIZATION.fullmatch(line))]
    if not values:
        return "epsilon"
    if values[-1] not in NAMES:
        raise CheckpointError(f"the model config {path} names parameterization {values[-1]!r}; this project runs "
                              f"{' and '.join(CHOICES)} models: fix the config, or use --prediction")
    return NAMES[values[-1]]


@torch.inference_mode()
def probe(unet) -> str:
    """The prediction type the UNet's answer to the fixed input implies (rule 5)."""
    weight = next(unet.parameters())
    cfg = unet.config
    x = torch.full((1, cfg.in_channels, PROBE_SIZE, PROBE_SIZE), PROBE_VALUE, dtype=weight.dtype, device=weight.device)
    context = torch.full((1, 2, cfg.context_dim), PROBE_VALUE, dtype=weight.dtype, device=weight.device)
    out = unet(x, torch.tensor([float(PROBE_T)], device=weight.device), Conditioning(context))  # (1, 4, 8, 8)
    return "v_prediction" if float((out.float() - x[:, : cfg.out_channels].float()).mean()) < PROBE_THRESHOLD \
        else "epsilon"


def decide(path: Path, family, unet: Callable, *, requested: str | None, marked: bool,
           stored: str | None) -> Decision:
    """The prediction type of the checkpoint at `path` (rules 1-6): `requested` by the caller, `marked` by a
    v_pred key, `stored` in our metadata; `unet()` gives the UNet to probe, only where rule 5 needs it."""
    if requested is not None:
        return Decision(prediction_name(requested), "as asked")
    if marked:
        return Decision("v_prediction", f"the file's {V_PRED_KEY!r} key")
    if stored is not None:
        if stored not in PREDICTION_TYPES:
            raise CheckpointError(f"{path}: its metadata names prediction type {stored!r}; the file is damaged: "
                                  f"write it again, or use --prediction")
        return Decision(stored, "the file's metadata")
    config = path.with_suffix(".yaml")
    if (from_yaml := yaml_parameterization(config)) is not None:
        return Decision(from_yaml, f"{config.name} beside the checkpoint")
    if family.prediction_open:
        return Decision(probe(unet()), "the UNet's answer to AUTOMATIC1111's test input")
    return Decision(family.prediction_type, family_rule(family))


def family_rule(family) -> str:
    """The words of rule 6, which decides for files that say nothing of a family that leaves nothing open."""
    return f"every {family.title} model"
