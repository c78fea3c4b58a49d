"""File layouts whose names are not our module names, as rename rules that run both ways.

SD 2.x keeps its text tower in OpenCLIP's layout (Ilharco et al., 2021; `open_clip.model.TextTransformer`):
`transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}`, a bare `positional_embedding`
parameter, `ln_final`, and `text_projection` stored as the matrix P of `x @ P`. Its attention holds the
query, key and value projections stacked in one `in_proj_weight` (3C, C), rows q then k then v, where our
CLIP layer (the transformers naming of SD v1's file) has three Linear layers. A `Layout` is a table of
`Rule`s, each a pair of key templates (the file's and ours) with what happens to the tensor, so the same
table reads a file (`read`) and writes one (`write`).
"""

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from sd.errors import CheckpointError

PARTS = ("q", "k", "v")  # the order of the stacked projections in a fused in_proj tensor


@functools.cache  # a few templates, matched against every key of a tower
def template_pattern(template: str) -> re.Pattern:
    """'transformer.resblocks.{n}.ln_1.{p}' -> a pattern whose named groups are n and p (no dots inside)."""
    return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^.]+)", re.escape(template)))


@dataclass(frozen=True)
class Rule:
    file: str  # the file's key template, fields in braces
    ours: str  # our module's key template, with the same fields (and {part} for a fused tensor)
    kind: str = "same"  # "same"; "transposed" (the file holds W.T); "fused" (q, k, v stacked along dim 0)


@dataclass(frozen=True)
class Layout:
    name: str  # how messages name it: "OpenCLIP"
    rules: tuple[Rule, ...]
    dropped: re.Pattern  # file keys that are not weights of the network (read and left out)

    def read(self, weights: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        """The file's keys (prefix removed) renamed to ours; a key no rule knows stays as it is, for the loader
        to report. `where`: the file and prefix, for messages."""
        out = {}
        for key, tensor in weights.items():
            if self.dropped.fullmatch(key):
                continue
            rule, fields = self.match(key, "file")
            if rule is None:
                out[key] = tensor
            elif rule.kind == "fused":
                stacked = tensor.shape[0] == len(PARTS) * tensor.shape[1] if tensor.dim() == 2 else (
                    tensor.dim() == 1 and tensor.shape[0] % len(PARTS) == 0)  # (3C, C) or (3C,)
                if not stacked:
                    raise CheckpointError(f"{where}{key} has shape {tuple(tensor.shape)}, not q, k and v stacked "
                                          f"along its first dimension; the file is damaged or not {self.name}.")
                for part, piece in zip(PARTS, tensor.chunk(len(PARTS))):  # each (C, C) or (C,)
                    out[rule.ours.format(part=part, **fields)] = piece
            elif rule.kind == "transposed":
                if tensor.dim() != 2:
                    raise CheckpointError(f"{where}{key} has shape {tuple(tensor.shape)}, expected a matrix; the "
                                          f"file is damaged or not {self.name}.")
                out[rule.ours.format(**fields)] = tensor.t().contiguous()
            else:
                out[rule.ours.format(**fields)] = tensor
        return out

    def write(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our keys renamed to the file's: the inverse of `read` (fused tensors stacked again)."""
        out = {}
        for key, tensor in weights.items():
            rule, fields = self.match(key, "ours")
            if rule is None:
                out[key] = tensor
            elif rule.kind == "fused":
                if fields.pop("part") == PARTS[0]:
                    out[rule.file.format(**fields)] = torch.cat(
                        [weights[rule.ours.format(part=part, **fields)] for part in PARTS])  # (3C, C) or (3C,)
            else:
                out[rule.file.format(**fields)] = tensor.t().contiguous() if rule.kind == "transposed" else tensor
        return out

    def file_key(self, key: str) -> str:
        """The file's name of our key `key` (of the fused tensor, for one of its parts)."""
        rule, fields = self.match(key, "ours")
        if rule is None:
            return key
        fields.pop("part", None)
        return rule.file.format(**fields)

    def match(self, key: str, side: str) -> tuple[Rule | None, dict[str, str]]:
        for rule in self.rules:
            if m := template_pattern(getattr(rule, side)).fullmatch(key):
                return rule, m.groupdict()
        return None, {}


BLOCK, LAYER = "transformer.resblocks.{n}.", "encoder.layers.{n}."
OPEN_CLIP = Layout("an OpenCLIP text tower", (
    Rule("token_embedding.weight", "embeddings.token_embedding.weight"),
    Rule("positional_embedding", "embeddings.position_embedding.weight"),
    Rule("ln_final.{p}", "final_layer_norm.{p}"),
    Rule("text_projection", "text_projection.weight", "transposed"),
    Rule(BLOCK + "ln_1.{p}", LAYER + "layer_norm1.{p}"),
    Rule(BLOCK + "ln_2.{p}", LAYER + "layer_norm2.{p}"),
    Rule(BLOCK + "attn.out_proj.{p}", LAYER + "self_attn.out_proj.{p}"),  # before the fused rule, whose {part} "out" would match
    Rule(BLOCK + "attn.in_proj_{p}", LAYER + "self_attn.{part}_proj.{p}", "fused"),
    Rule(BLOCK + "mlp.c_fc.{p}", LAYER + "mlp.fc1.{p}"),
    Rule(BLOCK + "mlp.c_proj.{p}", LAYER + "mlp.fc2.{p}"),
), dropped=re.compile(r"logit_scale|attn_mask"))
