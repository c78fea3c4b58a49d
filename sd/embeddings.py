"""Textual-inversion embeddings (Gal et al., 2022): new words for a frozen text encoder.

Textual inversion learns one or a few token vectors (n, 768 for SD v1) that stand for a concept; a
prompt names them like a word, and the vectors take the place of that word's token embeddings
(`sd.prompt`). Three file layouts are in use, all read here:
- AUTOMATIC1111's `.pt`: {"string_to_param": {"*": (n, C)}, "name": ..., ...}, where older files
  (the original implementation's) pickle the inner dict as a torch ParameterDict;
- kohya's `.safetensors` / `.pt`: {"emb_params": (n, C)};
- diffusers' `learned_embeds.bin` / `.safetensors`: {"<token>": (C,) or (n, C)}.
Pickles go through `sd.safe_pickle`, never a plain `torch.load`, and the vectors through `sd.tensor_checks`
(floating point, finite, no larger than float16 holds). The name used in prompts is the one
given, else the token a diffusers file names, else the file's name (as AUTOMATIC1111 does).
"""

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sd.checkpoint import as_path, is_safetensors, unreadable_safetensors
from sd.errors import InputError
from sd.hashing import SHORT_HASH_DIGITS, file_sha256
from sd.paths import readable_file
from sd.safe_pickle import load_pickle_checkpoint
from sd.tensor_checks import check_tensors
from sd.tokenizer import MAX_PROMPT_TOKENS, CLIPTokenizer

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
NAME_SYNTAX = set("()[]:\\")  # characters of the prompt syntax, which a name cannot contain


@dataclass(frozen=True)
class Embedding:
    name: str  # the word that stands for the vectors in prompts
    vectors: torch.Tensor  # (n, C) float32
    path: Path
    sha256: str  # of the file, hex

    @property
    def short_hash(self) -> str:
        """The first 12 hex digits of the file's SHA-256, as AUTOMATIC1111 writes "TI hashes"."""
        return self.sha256[:SHORT_HASH_DIGITS]


def a1111_parameters(params) -> dict:
    """The {string: tensor} of AUTOMATIC1111's `string_to_param`: a dict, or a pickled ParameterDict (kept as a
    placeholder whose state holds `_parameters`); {} for anything else."""
    state = getattr(params, "state", None)
    params = state if isinstance(state, dict) else params
    params = params.get("_parameters", params) if isinstance(params, dict) else {}
    return params if isinstance(params, dict) else {}


def found_vectors(contents) -> tuple[str, object, str | None]:
    """(the key, the value, the token its layout names) of the vectors of a loaded file, by its layout."""
    contents = contents if isinstance(contents, dict) else {}
    if "string_to_param" in contents:  # AUTOMATIC1111
        return "string_to_param['*']", a1111_parameters(contents["string_to_param"]).get("*"), None
    if "emb_params" in contents:  # kohya
        return "emb_params", contents["emb_params"], None
    if len(contents) == 1:  # diffusers
        [(token, found)] = contents.items()
        return repr(token), found, token
    return "", None, None


def vectors_of(path: Path, contents) -> tuple[torch.Tensor, str | None]:
    """The (n, C) vectors in a loaded file and the token its layout names (diffusers'), or None."""
    key, found, token = found_vectors(contents)
    if not isinstance(found, torch.Tensor) or not isinstance(token, (str, type(None))):
        keys = ", ".join(map(repr, list(contents)[:5])) if isinstance(contents, dict) and contents else "none"
        raise InputError(f"{path} is not a textual-inversion embedding: it holds no 'string_to_param', 'emb_params' "
                         f"or single token's vectors (its keys: {keys}); give an embedding file")
    check_vectors(path, key, found)
    return found.detach().reshape(-1, found.shape[-1]).float().contiguous(), token


def check_vectors(path: Path, key: str, found: torch.Tensor) -> None:
    """Vectors that can stand for a word: a sound tensor (`sd.tensor_checks`) of 1 to 75 vectors (n, width)."""
    check_tensors(path, {key: found}, "embedding", error=InputError)
    if found.dim() > 2 or not 1 <= found[None].shape[-2] <= MAX_PROMPT_TOKENS:
        raise InputError(f"{path} holds vectors of shape {tuple(found.shape)}; an embedding is 1 to "
                         f"{MAX_PROMPT_TOKENS} vectors (n, width)")


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


def check_width(e: Embedding, width: int) -> None:
    """Refuse an embedding made for a text encoder of another width."""
    if e.vectors.shape[1] != width:
        family = {768: "SD v1", 1024: "SD 2.x", 1280: "SDXL"}.get(e.vectors.shape[1], "another model")
        raise InputError(f"{e.path} is an embedding of width {e.vectors.shape[1]} (for {family}); this model's text "
                         f"encoder is {width} wide: use an embedding made for it")


def check_name(e: Embedding, tokenizer: CLIPTokenizer, loaded: dict[str, Embedding]) -> None:
    """Refuse a name that prompts could not tell apart from words or from the `loaded` embeddings."""
    if not e.name or any(c.isspace() or c in NAME_SYNTAX for c in e.name) or re.search(r"\bBREAK\b", e.name):
        raise InputError(f"the embedding name {e.name!r} of {e.path} has spaces, prompt brackets or BREAK; load it "
                         f"under a name of one word")
    [ids, *others] = tokenizer.tokenize([e.name, *loaded])
    if len(ids) == 1:
        raise InputError(f"the embedding name {e.name!r} of {e.path} is a word of CLIP's vocabulary, which prompts "
                         f"could no longer use; load it under another name, e.g. <{e.name}>")
    for other, other_ids in zip(loaded.values(), others):
        if other_ids == ids and other.path != e.path:
            raise InputError(f"the embedding name {e.name!r} of {e.path} reads as {other.name!r} of {other.path}, "
                             f"already loaded; load it under another name")
