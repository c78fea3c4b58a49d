"""Textual-inversion training (Gal et al., 2022): a new word learned for a frozen model, and its files.

A new token stands for n vectors (n, C) that take the place of its token embeddings in the text encoder
(`sd.prompt`); only those vectors train, a parameter of their own: CLIP's token-embedding matrix and every
other weight stay as they are (AdamW is elementwise, so this equals diffusers' example, which trains the
whole matrix and restores every other row after each step). The vectors start as the token embedding of a
one-token initializer word, every vector the same row, as diffusers' example does; AUTOMATIC1111 spreads
the tokens of a longer initializer text over the vectors (vector i takes token i·k // n of its k), which for
one token is the same rule, so a word of several tokens is refused rather than read one way or the other.
SDXL learns a set for each text encoder ({"clip_l": (n, 768), "clip_g": (n, 1280)}), each started from its
own encoder's row. Captions reach the text encoders through the pipeline's own parser and encoder
(`sd.prompt.encode`), so training reads the token as sampling with the written file loaded does.
Files: AUTOMATIC1111's `.pt` ({"string_to_token": {"*": 265}, "string_to_param": {"*": (n, C)}, "name",
"step", "sd_checkpoint", "sd_checkpoint_name"}) and diffusers' `.safetensors` ({token: (n, C)}); SDXL's,
in both, {"clip_l": ..., "clip_g": ...} alone (the layout AUTOMATIC1111 and kohya read, where any other key
would be taken for a set of vectors).
"""

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sd.embeddings import Embedding, name_refusal
from sd.errors import InputError, SettingError
from sd.files import write_atomically, write_safetensors
from sd.pipeline import StableDiffusion
from sd.prompt import PromptParser, check_clip_skip, encode, names_in
from sd.tokenizer import MAX_PROMPT_TOKENS

A1111_TOKEN = 265  # the id AUTOMATIC1111 writes in `string_to_token` for its placeholder "*"
UNSAVED = "0" * 64  # the SHA-256 of an embedding that is no file yet


def a1111_pt(e: Embedding, step: int, checkpoint_name: str, checkpoint_hash: str | None) -> dict:
    """What AUTOMATIC1111 writes in an embedding's `.pt` (`Embedding.save`); SDXL's: its two sets alone."""
    if isinstance(e.vectors, dict):
        return dict(e.vectors)
    return {"string_to_token": {"*": A1111_TOKEN}, "string_to_param": {"*": e.vectors}, "name": e.name,
            "step": step, "sd_checkpoint": checkpoint_hash, "sd_checkpoint_name": checkpoint_name}


def diffusers_tensors(e: Embedding) -> dict[str, torch.Tensor]:
    """diffusers' {token: (n, C)}; SDXL's {"clip_l": ..., "clip_g": ...}."""
    return dict(e.vectors) if isinstance(e.vectors, dict) else {e.name: e.vectors}


FORMATS: dict[str, tuple[str, Callable[..., None]]] = {  # format -> (suffix, write(tmp path, embedding, **saved))
    "pt": (".pt", lambda tmp, e, **saved: torch.save(a1111_pt(e, **saved), tmp)),
    "safetensors": (".safetensors", lambda tmp, e, **saved: write_safetensors(tmp, diffusers_tensors(e))),
}


class TrainableEmbedding(nn.Module):
    """The vectors of a new token `token` for the text encoders of `pipe`: `vectors`, a parameter (n, C), or for
    SDXL an nn.ParameterDict {"clip_l": (n, 768), "clip_g": (n, 1280)}: the module's only parameters. Its forward
    is the text encoders' output for captions that use the token (`sd.prompt.encode`), differentiable with
    respect to the vectors and the same as the pipeline's with them loaded.

    The text encoders are read, not held as submodules: the module's state is the vectors alone (its
    `state_dict`, what DistributedDataParallel broadcasts and averages), and `.to(device)` moves only them (the
    pipeline's models stay where they are; put the vectors on the same device). Freeze the text encoders
    (`requires_grad_(False)`) so that no gradient is kept for their weights. Under DistributedDataParallel call
    the wrapper itself, `ddp(captions)`, not `.context`: DDP averages the gradients of a forward it ran."""

    def __init__(self, pipe: StableDiffusion, token: str, init_word: str, vectors: int = 1, clip_skip: int = 1):
        super().__init__()
        if not isinstance(vectors, int) or isinstance(vectors, bool) or not 1 <= vectors <= MAX_PROMPT_TOKENS:
            raise SettingError(lambda n: f"{n('vectors')} must be a whole number from 1 to {MAX_PROMPT_TOKENS} (the "
                                         f"vectors the new token stands for), got {vectors!r:.40}")
        if not isinstance(token, str):
            raise SettingError(lambda n: f"{n('token')} must be a text, the new word, got {type(token).__name__}")
        refusal = name_refusal(token, pipe.tokenizer, pipe.embeddings)
        if refusal is not None:
            raise SettingError(lambda n: f"{n('token')} {token!r} {refusal}")
        ids = pipe.tokenizer.tokenize([init_word])[0] if isinstance(init_word, str) else []
        if len(ids) != 1:
            raise SettingError(lambda n: f"{n('init_word')} {init_word!r:.60} is {len(ids)} tokens of CLIP's "
                                         f"vocabulary; pick a one-token word (such as 'dog' or 'style') for the "
                                         f"vectors to start from")
        check_clip_skip(clip_skip, pipe.clip_skip_limit)
        rows = {e.spec.embedding_key: e.network.embeddings.token_embedding.weight[ids[0]].detach().float()
                for e in pipe.text_encoders}  # the init word's row (C,) of each encoder, by its file key
        start = {key: nn.Parameter(row.repeat(vectors, 1)) for key, row in rows.items()}  # (n, C) each
        self.vectors = start[None] if None in start else nn.ParameterDict(start)
        self.name, self.init_word, self.clip_skip = token, init_word, clip_skip
        self.tokenizer, self.text_encoders = pipe.tokenizer, list(pipe.text_encoders)
        self.others = dict(pipe.embeddings)  # the embeddings loaded beside it, which captions may use too

    def embedding(self, detach: bool = True) -> Embedding:
        """The vectors as an `sd.embeddings.Embedding` under the token: a float32 copy on the CPU (for
        `StableDiffusion.add_embedding`, or to save); with `detach=False`, the parameters themselves."""
        keys = [e.spec.embedding_key for e in self.text_encoders]
        sets = {None: self.vectors} if None in keys else {key: self.vectors[key] for key in keys}  # the stack's order
        if detach:
            sets = {key: v.detach().float().cpu().clone() for key, v in sets.items()}
        return Embedding(self.name, sets[None] if None in sets else sets, Path(f"the trained {self.name}"), UNSAVED)

    def check_captions(self, captions: list[str], what: str = "caption") -> None:
        """Refuse a caption that does not use the token (its vectors would learn nothing from it); `what` names
        where the captions come from in the message (a flag, a file)."""
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise InputError(f"the {what}s must be a non-empty list of texts, got {type(captions).__name__}")
        for caption in captions:
            if not names_in(caption, [self.name]):
                raise InputError(f"the {what} {caption!r:.80} does not use the token {self.name!r} being trained; "
                                 f"write it in every {what}, e.g. 'a photo of {self.name}'")

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The context (B, 77·k, C) of the captions, as `StableDiffusion.encode_text` computes it with these
        vectors loaded (prompt syntax, long captions in chunks, clip skip), and the pooled vectors (B, P) where
        the stack yields them (SDXL), else None."""
        self.check_captions(captions)
        parser = PromptParser(self.tokenizer, {**self.others, self.name: self.embedding(detach=False)})
        return encode(self.text_encoders, [parser.parse(c, "caption") for c in captions], self.clip_skip)

    def context(self, captions: list[str]) -> torch.Tensor:
        """The context (B, 77·k, C) alone: what a diffusion objective passes to the UNet."""
        return self(captions)[0]


def write_embedding(path: str | Path, emb: TrainableEmbedding, *, step: int, checkpoint_name: str,
                    checkpoint_hash: str | None, formats: tuple[str, ...] = ("pt", "safetensors")) -> list[Path]:
    """Write the trained vectors as one file per format (`FORMATS`), at `path` with the format's suffix (a suffix
    of a format that `path` already has is dropped first), each atomically: whole or not at all. `step`, the
    checkpoint's name and short hash go into the `.pt`, as AUTOMATIC1111 writes them. Returns the paths."""
    formats = tuple(formats) if isinstance(formats, (tuple, list)) else (formats,)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InputError(f"unknown embedding format(s) {unknown!r:.60}: give some of {', '.join(FORMATS)}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise InputError(f"the step written in an embedding must be a whole number, at least 0, got {step!r:.40}")
    path = Path(path)
    base = path.with_suffix("") if path.suffix in {suffix for suffix, _ in FORMATS.values()} else path
    e = emb.embedding()
    written = []
    for name in formats:
        suffix, write = FORMATS[name]
        target = base.with_name(base.name + suffix)
        try:
            write_atomically(target, lambda tmp: write(tmp, e, step=step, checkpoint_name=checkpoint_name,
                                                       checkpoint_hash=checkpoint_hash))
        except OSError as error:
            raise InputError(f"cannot write embedding {target}: {error.strerror or error}; check the folder "
                             f"exists and has room") from None
        written.append(target)
    return written
