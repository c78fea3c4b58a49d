"""Prompts as Stable Diffusion users write them: emphasis, long prompts, BREAK and textual inversion.

The syntax and its meaning are those of AUTOMATIC1111's web UI, where most SD v1 prompts are written:
- Emphasis: `(text)` multiplies the weight of its tokens by 1.1, `[text]` divides it by 1.1,
  `(text:1.3)` multiplies it by 1.3; nesting multiplies; `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the
  characters themselves; a bracket left open closes at the end. The weights scale CLIP's output
  vectors, after which each chunk's output is rescaled to its original mean.
- Long prompts: CLIP reads 77 positions, so the tokens are cut into chunks of 75, each encoded on its
  own as [BOS] + 75 + [EOS] (padded with EOS) and concatenated: a context (B, 77·k, 768), which the
  UNet's cross-attention reads at any length. A chunk that fills up hands the words after its last
  comma (if within the last 20 tokens) to the next one; `BREAK` ends a chunk.
- Textual inversion (Gal et al., 2022): an embedding's name in the prompt is replaced by its learned
  vectors (`sd.embeddings`), which are never split between chunks; with several text encoders (SDXL) each
  takes its own set at those positions.
- Several text encoders (SDXL): the prompt is parsed and chunked once; every encoder of the family's stack
  reads the chunks (padded with its own pad id, at its own layer), emphasis is applied to each output, and
  the outputs are concatenated along the channels; the pooled vector is that of the first chunk.
Each run of text of one weight is tokenized on its own, so weights fall on whole runs; so is the text
between embedding names, which therefore count whatever punctuation touches them (as diffusers'
added tokens do; AUTOMATIC1111 looks for the name's tokens, which `<name>,` would miss).
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sd.clip import CLIPTextModel
from sd.embeddings import Embedding, Vectors, encoder_vector, vector_rows
from sd.errors import SettingError
from sd.text_encoders import TextEncoderSpec
from sd.tokenizer import BOS_ID, CONTEXT_LENGTH, EOS_ID, MAX_PROMPT_TOKENS, CLIPTokenizer

ROUND_FACTOR = 1.1  # (text)
SQUARE_FACTOR = 1 / 1.1  # [text]
COMMA_BACKTRACK = 20  # a full chunk hands on the words after a comma this close to its end
MAX_WEIGHT = 100  # of a run, nesting multiplied: beyond it CLIP's outputs overflow rather than steer
MAX_CLIP_SKIP = 48  # before the text encoder is known: more layers than any has
MAX_CHUNKS = 16  # 1200 tokens: longer prompts are refused rather than encoded without bound
BREAK = None  # the run that stands for BREAK in a parsed prompt

_SYNTAX = re.compile(r"""
      \\(?P<escaped>[()\[\]\\]?)            # an escaped bracket or backslash (a lone backslash is dropped)
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)      # (text:weight); "(time: dusk)" is text, as in AUTOMATIC1111
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
""", re.VERBOSE)
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")  # a weight as AUTOMATIC1111 writes one
_BREAK = re.compile(r"\s*\bBREAK\b\s*")

Run = tuple[str, float] | None  # (text, weight), or BREAK


def parse_emphasis(prompt: str, what: str = "prompt") -> list[Run]:
    """The prompt as runs of text with their weights, neighbours of equal weight merged; BREAK (None)
    where the prompt says BREAK. `parse_emphasis("a (red:1.3) ball")` is
    `[("a ", 1.0), ("red", 1.3), (" ball", 1.0)]`."""
    runs: list[list] = []  # [text, weight]; a BREAK is [None, None]
    opened = {"(": [], "[": []}  # the index of the first run inside each open bracket

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            if run[0] is not None:
                run[1] *= factor

    for m in _SYNTAX.finditer(prompt):
        if m["weight"] is not None and opened["("]:
            if not NUMBER.fullmatch(m["weight"]):  # "1.2.3": digits and dots that AUTOMATIC1111 cannot read either
                raise SettingError(lambda n, w=m["weight"]: f"{n(what)} has (...:{w}), whose weight {w!r} is not "
                                   f"a number; write (text:1.2), or \\( \\) for brackets in the text")
            scale_from(opened["("].pop(), float(m["weight"]))
        elif m["open"]:
            opened[m["open"]].append(len(runs))
        elif m["close"] and opened["(" if m["close"] == ")" else "["]:
            scale_from(opened["(" if m["close"] == ")" else "["].pop(), ROUND_FACTOR if m["close"] == ")" else SQUARE_FACTOR)
        else:  # text, an escape, or a bracket that closes nothing (kept as text)
            text = m["escaped"] if m["escaped"] is not None else m.group(0)
            for i, part in enumerate(_BREAK.split(text)):
                runs += [[None, None]] * (i > 0) + [[part, 1.0]]
    for bracket, factor in (("(", ROUND_FACTOR), ("[", SQUARE_FACTOR)):  # close what is still open
        for start in opened[bracket]:
            scale_from(start, factor)
    check_weights(runs, what)
    merged: list[list] = []
    for run in runs or [["", 1.0]]:
        if merged and run[0] is not None and merged[-1][0] is not None and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [BREAK if text is None else (text, weight) for text, weight in merged]


def check_weights(runs: list[list], what: str) -> None:
    """Every run's weight, nesting multiplied, within MAX_WEIGHT either way."""
    for text, weight in runs:
        if text is not None and not abs(weight) <= MAX_WEIGHT:
            raise SettingError(lambda n: f"{n(what)} gives {text!r:.40} the weight {weight:.4g}, beyond +-{MAX_WEIGHT}; "
                               f"write a smaller (text:weight) or fewer nested brackets")


@dataclass
class Chunk:
    """Positions for CLIP: the token ids, the weight of each, and the vectors of embeddings by position, each
    (C,) or, for several text encoders, one per encoder (`sd.embeddings.vector_rows`). 77 positions once closed,
    the end-of-text token at `eos` and EOS padding after it; while being filled, only the prompt's tokens."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    vectors: dict[int, Vectors] = field(default_factory=dict)
    eos: int = -1

    def padded_with(self, pad_id: int | None) -> list[int]:
        """The ids with the positions after the end-of-text token set to `pad_id` (None: left EOS)."""
        return self.ids if pad_id is None else self.ids[: self.eos + 1] + [pad_id] * (len(self.ids) - self.eos - 1)

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for w in self.weights)


@dataclass
class ParsedPrompt:
    chunks: list[Chunk]
    tokens: int  # the prompt's tokens, embeddings counted by their vectors
    embeddings: list[Embedding]  # the embeddings it uses, in order of first use


def words(text: str) -> list[str]:
    """The lower-cased words of a text, each once, in order: what a model's vocabulary is checked against."""
    return list(dict.fromkeys(re.findall(r"[a-z]+", text.lower())))


def name_pattern(name: str) -> str:
    """A regular expression (used with re.IGNORECASE) for an embedding's name in a prompt: in any case,
    whatever punctuation touches it, but not inside a longer word ("<x>" counts in "a<x>", "xy" does
    not in "axy")."""
    return (r"(?<!\w)" * bool(re.match(r"\w", name)) + re.escape(name)
            + r"(?!\w)" * bool(re.match(r"\w", name[-1])))


def names_in(text: str, names) -> list[str]:
    """Those of `names` that `text` uses."""
    return [name for name in names if re.search(name_pattern(name), text, flags=re.IGNORECASE)]


class PromptParser:
    """Prompts to chunks of token ids and weights, with the loaded embeddings in place."""

    def __init__(self, tokenizer: CLIPTokenizer, embeddings: dict[str, Embedding] | None = None):
        self.tokenizer = tokenizer
        self.embeddings = embeddings if embeddings is not None else {}
        [[self.comma_id]] = tokenizer.tokenize([","])

    def split_names(self, text: str) -> list[str]:
        """`text` cut around the names of embeddings: [text, name, text, name, ..., text] (see `name_pattern`)."""
        if not self.embeddings:
            return [text]
        names = sorted(self.embeddings, key=len, reverse=True)  # the longest name wins
        return re.split(f"({'|'.join(map(name_pattern, names))})", text, flags=re.IGNORECASE)

    def parse(self, prompt: str, what: str = "prompt") -> ParsedPrompt:
        runs = parse_emphasis(prompt, what)
        by_name = {name.lower(): e for name, e in self.embeddings.items()}
        pieces = [(self.split_names(run[0]), run[1]) for run in runs if run is not BREAK]
        tokenized = iter(self.tokenizer.tokenize([text for split, _ in pieces for text in split[::2]]))
        pieces = iter(pieces)
        builder = _ChunkBuilder(self.comma_id)
        used: dict[str, Embedding] = {}
        for run in runs:
            if run is BREAK:
                builder.close()
                continue
            split, weight = next(pieces)
            for k, piece in enumerate(split):
                if k % 2:  # a name: the embedding's vectors
                    embedding = by_name[piece.lower()]
                    builder.add(EOS_ID, weight, embedding.vectors)
                    used.setdefault(embedding.name, embedding)
                else:
                    for token in next(tokenized):
                        builder.add(token, weight)
        chunks = builder.finish()
        if len(chunks) > MAX_CHUNKS:
            raise SettingError(lambda n: f"{n(what)} is {builder.tokens} tokens long in {len(chunks)} chunks of "
                                         f"{MAX_PROMPT_TOKENS}; at most {MAX_CHUNKS} chunks are encoded: shorten it")
        return ParsedPrompt(chunks, builder.tokens, list(used.values()))


class _ChunkBuilder:
    """Fills chunks of MAX_PROMPT_TOKENS tokens as AUTOMATIC1111 does (`sd_hijack_clip.tokenize_line`)."""

    def __init__(self, comma_id: int):
        self.comma_id = comma_id
        self.chunks: list[Chunk] = []
        self.current = Chunk()
        self.last_comma = -1
        self.tokens = 0

    def make_room(self, token: int, n: int = 1) -> None:
        """Before `token` (the first of n positions): note a comma; a full chunk closes, handing on the
        words after a comma near its end; n positions that do not fit close the chunk too."""
        if token == self.comma_id:
            self.last_comma = len(self.current.ids)
        elif (len(self.current.ids) == MAX_PROMPT_TOKENS and self.last_comma >= 0
              and MAX_PROMPT_TOKENS - self.last_comma <= COMMA_BACKTRACK):
            cut, kept = self.last_comma + 1, self.current
            self.current = Chunk(kept.ids[:cut], kept.weights[:cut], {i: v for i, v in kept.vectors.items() if i < cut})
            self.close()
            self.current = Chunk(kept.ids[cut:], kept.weights[cut:],
                                 {i - cut: v for i, v in kept.vectors.items() if i >= cut})
        if len(self.current.ids) + n > MAX_PROMPT_TOKENS:
            self.close()

    def add(self, token: int, weight: float, vectors: Vectors | None = None) -> None:
        """One token, or the n vectors (n, C) of an embedding (a set per text encoder: SDXL's), which are never
        split between chunks."""
        rows = [None] if vectors is None else vector_rows(vectors)
        self.make_room(token, len(rows))
        for row in rows:
            if row is not None:
                self.current.vectors[len(self.current.ids)] = row
            self.current.ids.append(token)  # under a vector, a stand-in: the vector replaces its embedding
            self.current.weights.append(weight)
        self.tokens += len(rows)

    def close(self) -> None:
        pad = CONTEXT_LENGTH - 1 - len(self.current.ids)
        self.chunks.append(Chunk([BOS_ID, *self.current.ids] + [EOS_ID] * pad,
                                 [1.0, *self.current.weights] + [1.0] * pad,
                                 {1 + i: v for i, v in self.current.vectors.items()},  # 1 +: after BOS
                                 eos=1 + len(self.current.ids)))
        self.current = Chunk()
        self.last_comma = -1

    def finish(self) -> list[Chunk]:
        if self.current.ids or not self.chunks:
            self.close()
        return self.chunks


@dataclass(frozen=True)
class TextEncoder:
    """One encoder of a family's stack: its network and how it is read (`sd.text_encoders.TextEncoderSpec`)."""

    spec: TextEncoderSpec
    network: CLIPTextModel

    @property
    def skippable_layers(self) -> int:
        """The largest clip skip whose layer this encoder has (MAX_CLIP_SKIP where clip skip leaves it alone)."""
        layers = self.network.config.layers
        return next(n for n in range(MAX_CLIP_SKIP, 0, -1) if self.spec.with_clip_skip(n).hidden_layer >= -layers)

    def __call__(self, chunks: list[Chunk], clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weighted hidden states (N, 77, C) of one chunk per prompt, and the pooled vectors (N, P) if the
        spec asks for them. Weights scale the output vectors, then each chunk is brought back to its mean
        before weighting (AUTOMATIC1111's "Original" emphasis)."""
        clip, spec = self.network, self.spec.with_clip_skip(clip_skip)
        device = clip.final_layer_norm.weight.device
        ids = torch.tensor([c.padded_with(spec.pad_id) for c in chunks], device=device)  # (N, 77)
        vectors = None
        if any(c.vectors for c in chunks):
            vectors = clip.embeddings.token_embedding(ids)  # (N, 77, C)
            for row, chunk in enumerate(chunks):
                for position, vector in chunk.vectors.items():
                    vectors[row, position] = encoder_vector(vector, spec.embedding_key).to(vectors)
        eos = torch.tensor([c.eos for c in chunks], device=device) if spec.pooled else None  # (N,)
        z, pooled = clip.encode(ids, vectors, hidden_layer=spec.hidden_layer, final_norm=spec.final_norm,
                                eos=eos)  # (N, 77, C), (N, P) or None
        if any(c.weighted for c in chunks):
            weights = torch.tensor([c.weights for c in chunks], device=device, dtype=z.dtype)  # (N, 77)
            mean = z.mean(dim=(1, 2), keepdim=True)  # (N, 1, 1)
            z = z * weights[..., None]
            z = z * (mean / z.mean(dim=(1, 2), keepdim=True))
        return z, pooled


def encode(stack: Sequence[TextEncoder], prompts: list[ParsedPrompt],
           clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The text encoders' output for each prompt: the context (N, 77·k, C), k its number of chunks, C the
    encoders' widths added up; shorter prompts are padded with the chunk of the empty prompt. And the pooled
    vector of the first chunk (N, P) from the encoder whose spec yields one (None if none does)."""
    count = max(len(p.chunks) for p in prompts)
    empty = _ChunkBuilder(-1).finish()[0]
    contexts, pooled = [], None
    for k in range(count):
        chunks = [p.chunks[k] if k < len(p.chunks) else empty for p in prompts]
        outputs = [encoder(chunks, clip_skip) for encoder in stack]
        contexts.append(torch.cat([z for z, _ in outputs], dim=-1))  # (N, 77, C)
        if k == 0:
            pooled = next((p for _, p in outputs if p is not None), None)
    return torch.cat(contexts, dim=1), pooled  # (N, 77·k, C), (N, P) or None


def check_clip_skip(clip_skip, layers: int | None = None) -> None:
    """clip_skip: a whole number from 1 (CLIP's last layer, the normal output) to the number of layers."""
    top = layers if layers is not None else MAX_CLIP_SKIP
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 1 <= clip_skip <= top:
        bound = (f"between 1 and {layers}, the text encoder's layers" if layers is not None
                 else f"of at least 1 (and at most {MAX_CLIP_SKIP})")
        raise SettingError(lambda n: f"{n('clip_skip')} must be a whole number {bound}, got {clip_skip!r}")
