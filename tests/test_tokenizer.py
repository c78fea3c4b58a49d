"""sd.tokenizer against transformers' CLIPTokenizer, and data/make_clip_vocab.py against the committed files."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sd.errors import SDError
from sd.tokenizer import BOS_ID, CONTEXT_LENGTH, DATA_DIR, EOS_ID, CLIPTokenizer
from tests.reference import oracle

REPO = Path(__file__).resolve().parent.parent
WHEELS = sorted(Path("/tmp/oc").glob("open_clip_torch-*.whl"))

LONG = ", ".join(["a highly detailed matte painting of a castle on a hill at sunset"] * 8)
PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A Photo Of An ASTRONAUT",
    "",
    " ",
    "   leading and trailing spaces   ",
    "multiple     spaces    between   words",
    "tabs\tand\nnewlines\r\nmixed \t \n in",
    "punctuation!!! does it work?! (yes), [maybe]; {no}: 'quoted' \"double\"",
    "it's, we're, they've, I'm, you'll, he'd, don't",
    "numbers 1234567890 and 3.14159 and 1,000,000 and 42nd",
    "café, naïve, résumé, Ångström, Zürich, São Paulo",
    "e\u0301cole vs \u00e9cole (decomposed vs composed accents)",
    "東京タワー の 夜景, 北京烤鸭, 서울 야경",
    "emoji 🐱🐶🚀✨ and flags 🇫🇷🇯🇵 and skin tones 👍🏽",
    "a cat😀on a mat",
    "mixed ÀÉÎÕÜ UPPER accents",
    "Ελληνικά κείμενα και русский текст",
    "math symbols ∑∫√∞ ≤ ≥ ≠ ± × ÷",
    "hashtag #art @artist trending on artstation, 8k, octane render",
    "url https://example.com/path?a=1&b=2",
    "underscores_and-hyphens_and--double—em-dash",
    "(((masterpiece))), [[best quality]], {{ultra detailed}}",
    "ellipsis... and more.... dots.",
    "apostrophe ’curly’ quotes “like this”",
    "zero\u200bwidth\u200bspace and non\u00a0breaking space",
    "<|endoftext|> literal special tokens <|startoftext|>",
    "<|ENDOFTEXT|> upper-case specials are not special",
    "control\x00chars\x07here",
    "ﬁ ligature and ＦＵＬＬＷＩＤＴＨ letters",
    "x" * 300,
    LONG,
    "word " * 74 + "end",  # 75 tokens: fits exactly
    "word " * 75 + "end",  # 76 tokens: one dropped
]


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def reference():
    ref = oracle("transformers").CLIPTokenizer(vocab=str(DATA_DIR / "vocab.json"), merges=str(DATA_DIR / "merges.txt"))
    assert ref.pad_token == "<|endoftext|>"
    return lambda prompts: torch.tensor(
        ref(prompts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True)["input_ids"]
    )


def test_reference_pads_the_sd_way(reference):
    assert reference(["a cat"]).tolist() == [[BOS_ID, 320, 2368, EOS_ID] + [EOS_ID] * 73]


def test_batch_matches_transformers(tok, reference):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tok(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), CONTEXT_LENGTH)
    assert torch.equal(ids, reference(PROMPTS))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_single_matches_transformers(tok, reference, prompt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tok(prompt)
    assert ids.shape == (1, CONTEXT_LENGTH)
    assert torch.equal(ids, reference([prompt]))


def test_layout(tok):
    ids = tok(["a cat", "", "a photo of a dog in the snow"])
    assert ids.shape == (3, CONTEXT_LENGTH)
    assert (ids[:, 0] == BOS_ID).all()
    assert ids[1].tolist() == [BOS_ID] + [EOS_ID] * (CONTEXT_LENGTH - 1)
    n = 8  # "a photo of a dog in the snow"
    assert EOS_ID not in ids[2, 1 : n + 1].tolist()
    assert (ids[2, n + 1 :] == EOS_ID).all()


def test_no_warning_at_exactly_75_tokens(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tok("word " * 74 + "end")
    assert ids[0, -2].item() != EOS_ID and ids[0, -1].item() == EOS_ID


def test_truncation_warns_with_dropped_words(tok):
    prompt = "word " * 73 + "alpha beta gamma delta"  # 77 tokens: gamma and delta do not fit
    with pytest.warns(UserWarning) as record:
        ids = tok(["a cat", prompt])
    assert len(record) == 1
    message = str(record[0].message)
    assert "\n" not in message
    assert "dropped the last 2" in message and "'gamma delta'" in message and "'word word word" in message
    assert ids.shape == (2, CONTEXT_LENGTH) and ids[1, -1].item() == EOS_ID
    assert tok.decode(ids[1, -3:-1].tolist()) == "alpha beta"


def test_literal_special_tokens_are_kept_whole(tok):
    assert tok("<|endoftext|>")[0, :3].tolist() == [BOS_ID, EOS_ID, EOS_ID]


def test_vocab_file():
    vocab = json.loads((DATA_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 == len(set(vocab.values()))
    assert vocab["<|startoftext|>"] == BOS_ID and vocab["<|endoftext|>"] == EOS_ID
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["a</w>"] == 320
    merges = (DATA_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894


def test_missing_vocab_raises(tmp_path):
    with pytest.raises(SDError, match="not found.*make_clip_vocab"):
        CLIPTokenizer(vocab_path=tmp_path / "vocab.json")


@pytest.mark.skipif(not WHEELS, reason="no open_clip_torch wheel in /tmp/oc: pip download --no-deps open-clip-torch")
def test_make_clip_vocab_is_byte_identical(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "data" / "make_clip_vocab.py"), str(WHEELS[-1]), "--out", str(tmp_path)],
        check=True, capture_output=True,
    )
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name
