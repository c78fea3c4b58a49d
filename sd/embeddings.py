"""Textual-inversion embeddings (Gal et al., 2022): new words for a frozen text encoder.

Textual inversion learns one or a few token vectors (n, 768 for SD v1) that stand for a concept; a
prompt names them like a word, and the vectors take the place of that word's token embeddings
(`sd.prompt`). SDXL's embeddings hold a set for each of its text encoders, at the same positions:
{"clip_l": (n, 768), "clip_g": (n, 1280)}; each encoder takes its own (`TextEncoderSpec.embedding_key`).
The file layouts in use, all read here:
- AUTOMATIC1111's `.pt`: {"string_to_param": {"*": (n, C)}, "name": ..., ...}, where older files
  (the original implementation's) pickle the inner dict as a torch ParameterDict;
- kohya's `.safetensors` / `.pt`: {"emb_params": (n, C)}, and SDXL's {"clip_l": ..., "clip_g": ...};
- diffusers' `learned_embeds.bin` / `.safetensors`: {"<token>": (C,) or (n, C)}.
Pickles go through `sd.safe_pickle`, never a plain `torch.load`, and the vectors through `sd.tensor_checks`
(floating point, finite, no larger than float16 holds). The name used in prompts is the one
given, else the token a diffusers file names, else the file's name (as AUTOMATIC1111 does).
A model takes an embedding whose sets are those of its text encoders (`check_width`): SD v1 and 2.x one set
as wide as their encoder, SDXL a set per encoder (the refiner, bigG alone, the "clip_g" one). A single set on
SDXL is refused, even one as wide as one of its encoders: the other would lack its vectors.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sd.checkpoint import as_path, is_safetensors, unreadable_safetensors
from sd.errors import InputError
from sd.families import SDXL
from sd.hashing import SHORT_HASH_DIGITS, file_sha256
from sd.paths import readable_file
from sd.safe_pickle import load_pickle_checkpoint
from sd.tensor_checks import check_tensors
from sd.tokenizer import MAX_PROMPT_TOKENS, CLIPTokenizer

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
NAME_SYNTAX = set("()[]:\\")  # characters of the prompt syntax, which a name cannot contain
ENCODER_KEYS = tuple(spec.embedding_key for spec in SDXL.text_encoders)  # ("clip_l", "clip_g"): SDXL's file keys
FAMILY_WIDTHS = {768: "SD v1", 1024: "SD 2.x", 1280: "SDXL"}  # whose text encoder a set of vectors this wide is for
Vectors = torch.Tensor | dict[str, torch.Tensor]  # (n, C); or one (n, C) per text encoder, by its key


@dataclass(frozen=True)
class Embedding:
    name: str  # the word that stands for the vectors in prompts
    vectors: Vectors  # (n, C) float32; SDXL's: {"clip_l": (n, 768), "clip_g": (n, 1280)}
    path: Path
    sha256: str  # of the file, hex

    @property
    def short_hash(self) -> str:
        """The first 12 hex digits of the file's SHA-256, as AUTOMATIC1111 writes "TI hashes"."""
        return self.sha256[:SHORT_HASH_DIGITS]


def vector_rows(vectors: Vectors) -> list[Vectors]:
    """The vectors position by position: n of (C,), or of {key: (C,)} with every text encoder's at that position."""
    if isinstance(vectors, Mapping):
        return [dict(zip(vectors, row)) for row in zip(*vectors.values())]
    return list(vectors)


def encoder_vector(vector: Vectors, key: str | None) -> torch.Tensor:
    """The vector (C,) at one position for the text encoder whose `embedding_key` is `key` (None: the one set)."""
    return vector if key is None else vector[key]


def a1111_parameters(params) -> dict:
    """The {string: tensor} of AUTOMATIC1111's `string_to_param`: a dict, or a pickled ParameterDict (kept as a
    placeholder whose state holds `_parameters`); {} for anything else."""
    state = getattr(params, "state", None)
    params = state if isinstance(state, dict) else params
    params = params.get("_parameters", params) if isinstance(params, dict) else {}
    return params if isinstance(params, dict) else {}


def found_vectors(contents) -> tuple[str, object, str | None]:
    """(the key, the value, the token its layout names) of the vectors of a loaded file, by its layout; SDXL's
    value is the {key: vectors} of its text encoders."""
    contents = contents if isinstance(contents, dict) else {}
    if "string_to_param" in contents:  # AUTOMATIC1111
        return "string_to_param['*']", a1111_parameters(contents["string_to_param"]).get("*"), None
    if "emb_params" in contents:  # kohya
        return "emb_params", contents["emb_params"], None
    if any(key in contents for key in ENCODER_KEYS):  # SDXL's: a set per text encoder
        return ", ".join(ENCODER_KEYS), {key: contents[key] for key in ENCODER_KEYS if key in contents}, None
    if len(contents) == 1:  # diffusers
        [(token, found)] = contents.items()
        return repr(token), found, token
    return "", None, None


def vectors_of(path: Path, contents) -> tuple[Vectors, str | None]:
    """The vectors (n, C) in a loaded file (SDXL's: a set per text encoder) and the token its layout names
    (diffusers'), or None."""
    key, found, token = found_vectors(contents)
    sets = found if isinstance(found, Mapping) else {key: found}
    if not all(isinstance(t, torch.Tensor) for t in sets.values()) or not isinstance(token, (str, type(None))):
        keys = ", ".join(map(repr, list(contents)[:5])) if isinstance(contents, dict) and contents else "none"
        raise InputError(f"{path} is not a textual-inversion embedding: it holds no 'string_to_param', 'emb_params', "
                         f"{', '.join(map(repr, ENCODER_KEYS))} or single token's vectors (its keys: {keys}); give "
                         f"an embedding file")
    check_vectors(path, key, found)
    shaped = {k: t.detach().reshape(-1, t.shape[-1]).float().contiguous() for k, t in sets.items()}
    return (shaped if isinstance(found, Mapping) else shaped[key]), token


def check_vectors(path: Path, key: str, found: Vectors) -> None:
    """Vectors that can stand for a word: sound tensors (`sd.tensor_checks`) of 1 to 75 vectors (n, width), as
    many in each set of a per-encoder embedding. `key`: the one set's name in messages."""
    sets = found if isinstance(found, Mapping) else {key: found}
    check_tensors(path, sets, "embedding", error=InputError)
    for name, vectors in sets.items():
        if vectors.dim() > 2 or not 1 <= vectors[None].shape[-2] <= MAX_PROMPT_TOKENS:
            raise InputError(f"{path} holds vectors of shape {tuple(vectors.shape)} ({name}); an embedding is 1 to "
                             f"{MAX_PROMPT_TOKENS} vectors (n, width)")
    counts = {name: vectors[None].shape[-2] for name, vectors in sets.items()}
    if len(set(counts.values())) != 1:
        said = " and ".join(f"{n} {name!r}" for name, n in counts.items()) or "none"
        raise InputError(f"{path} holds {said} vectors; an embedding has as many for each text encoder, at least "
                         f"one: the file is damaged, get a trusted copy")


def read_embedding(path: str | Path, name: str | None = None) -> Embedding:
    """An embedding file of any of the three layouts, named `name` (default: see the module's text)."""
    path = readable_file(as_path(path, "embedding"), "embedding file")
    if not isinstance(name, (str, type(None))):
        raise InputError(f"the name of embedding {path} must be a str (or None: the file's), got "
                         f"{type(name).__name__} {name!r:.60}")
    try:
        sha256 = file_sha256(path)
        if is_safetensors(path):
            from safetensors import SafetensorError
            from safetensors.torch import load_file
            try:
                contents = load_file(path)
            except (SafetensorError, OSError) as e:
                raise unreadable_safetensors(path, e) from None
        else:
            contents = load_pickle_checkpoint(path, "embedding")
    except OSError as e:
        raise InputError(f"cannot read embedding file {path}: {e.strerror or e}") from None
    vectors, token = vectors_of(path, contents)
    return Embedding(name or token or path.stem, vectors, path, sha256)


def sets_shown(widths: Mapping[str | None, int]) -> str:
    """The sets of vectors of these widths as messages show them: '(n, 768)', "{'clip_l': (n, 768), ...}"."""
    if None in widths:
        return f"(n, {widths[None]})"
    return "{" + ", ".join(f"{key!r}: (n, {width})" for key, width in widths.items()) + "}"


def check_width(e: Embedding, widths: Mapping[str | None, int]) -> None:
    """Refuse an embedding whose sets of vectors are not those of the model's text encoders: `widths` by each
    encoder's `embedding_key` (None: that of a one-encoder family, which takes the one set)."""
    sets = e.vectors if isinstance(e.vectors, Mapping) else {None: e.vectors}
    wanted = f"use an embedding made for it, {sets_shown(widths)}"
    if (None in sets) != (None in widths):
        kinds = ("an SDXL embedding", "an embedding of one set of vectors")
        takes = "one set of vectors" if None in widths else "SDXL's, a set per text encoder"
        raise InputError(f"{e.path} is {kinds[None in sets]}, {sets_shown({k: v.shape[1] for k, v in sets.items()})}; "
                         f"this model takes {takes}: {wanted}")
    for key, width in widths.items():
        if key not in sets:
            raise InputError(f"{e.path} has no vectors for this model's {key!r} text encoder (it holds "
                             f"{', '.join(map(repr, sets))}): {wanted}")
        if sets[key].shape[1] != width:
            said = (f"an embedding of width {sets[key].shape[1]} (for "
                    f"{FAMILY_WIDTHS.get(sets[key].shape[1], 'another model')})" if key is None
                    else f"an embedding whose {key!r} vectors are {sets[key].shape[1]} wide")
            raise InputError(f"{e.path} is {said}; this model's {'' if key is None else repr(key) + ' '}text encoder "
                             f"is {width} wide: {wanted}")


def name_refusal(name: str, tokenizer: CLIPTokenizer, loaded: dict[str, Embedding],
                 path: Path | None = None) -> str | None:
    """Why prompts could not tell `name` apart from words or from the `loaded` embeddings (None: they can), said
    as the end of a sentence that begins with the name; `path`: the file the name is for (an embedding loaded
    from the same file is no clash)."""
    if not name or any(c.isspace() or c in NAME_SYNTAX for c in name) or re.search(r"\bBREAK\b", name):
        return "has spaces, prompt brackets or BREAK; take a name of one word"
    [ids, *others] = tokenizer.tokenize([name, *loaded])
    if len(ids) == 1:
        return f"is a word of CLIP's vocabulary, which prompts could no longer use; take another name, e.g. <{name}>"
    for other, other_ids in zip(loaded.values(), others):
        if other_ids == ids and other.path != path:
            return f"reads as {other.name!r} of {other.path}, already loaded; take another name"
    return None


def check_name(e: Embedding, tokenizer: CLIPTokenizer, loaded: dict[str, Embedding]) -> None:
    """Refuse a name that prompts could not tell apart from words or from the `loaded` embeddings."""
    refusal = name_refusal(e.name, tokenizer, loaded, e.path)
    if refusal is not None:
        raise InputError(f"the embedding name {e.name!r} of {e.path} {refusal}")
