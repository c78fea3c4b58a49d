"""The CLIP text tokenizer that turns a prompt into the token ids read by SD v1's text encoder.

In CLIP (Radford et al., 2021) the text transformer reads a lower-cased byte pair encoding (BPE) of the
text, bracketed by a start-of-text and an end-of-text token, in a fixed context of 77 positions. SD v1
uses it unchanged: the 49408-token vocabulary of CLIP ViT-L/14, and the end-of-text token as padding.

The pipeline is the one of transformers' CLIPTokenizer, built on the `tokenizers` package:
NFC, whitespace runs collapsed to one space, lower case; CLIP's regex split into words, numbers and
punctuation runs; GPT-2's byte-to-symbol mapping; BPE with `</w>` marking the end of each word.
"""

import warnings
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from sd.errors import SDError
from sd.files import DATA_DIR

CONTEXT_LENGTH = 77  # positions the text encoder reads
BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>, also the padding id
MAX_PROMPT_TOKENS = CONTEXT_LENGTH - 2  # room left between BOS and EOS

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class CLIPTokenizer:
    """Prompts to CLIP token ids: `CLIPTokenizer()(["a cat", "a dog"])` is a (2, 77) LongTensor."""

    def __init__(self, vocab_path: str | Path | None = None, merges_path: str | Path | None = None):
        vocab_path = Path(vocab_path or DATA_DIR / "vocab.json")
        merges_path = Path(merges_path or DATA_DIR / "merges.txt")
        for path in (vocab_path, merges_path):
            if not path.is_file():
                raise SDError(
                    f"CLIP tokenizer file not found: {path}; "
                    "run python data/make_clip_vocab.py open_clip_torch-*.whl to create it"
                )
        bpe = BPE.from_file(str(vocab_path), str(merges_path), end_of_word_suffix="</w>", unk_token=_EOS)
        tokenizer = Tokenizer(bpe)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([_BOS, _EOS])  # typed literally in a prompt, they stay whole
        if (tokenizer.token_to_id(_BOS), tokenizer.token_to_id(_EOS)) != (BOS_ID, EOS_ID):
            raise SDError(f"not the CLIP vocabulary: {vocab_path}; run python data/make_clip_vocab.py to recreate it")
        self._tokenizer = tokenizer

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """The token ids of each text, all of them, without BOS and EOS."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """Token ids of shape (B, 77): BOS, the prompt's tokens (at most 75), EOS, then EOS as padding.
        (The pipeline reads longer prompts in chunks: `sd.prompt`.)"""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = torch.full((len(prompts), CONTEXT_LENGTH), EOS_ID, dtype=torch.long)  # (B, 77)
        ids[:, 0] = BOS_ID
        for i, tokens in enumerate(self.tokenize(prompts)):
            kept, dropped = tokens[:MAX_PROMPT_TOKENS], tokens[MAX_PROMPT_TOKENS:]
            ids[i, 1 : 1 + len(kept)] = torch.tensor(kept, dtype=torch.long)  # (len(kept),)
            if dropped:
                warnings.warn(
                    f"the prompt {prompts[i][:30] + '...'!r} is longer than CLIP's {MAX_PROMPT_TOKENS} tokens; "
                    f"dropped the last {len(dropped)}: {self.decode(dropped)!r}",
                    stacklevel=2,
                )
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids, special tokens left out, on one line."""
        text = self._tokenizer.decode(ids, skip_special_tokens=True).replace("</w>", " ")
        return " ".join(text.split())
