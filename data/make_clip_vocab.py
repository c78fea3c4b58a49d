"""Regenerate data/vocab.json and data/merges.txt, the CLIP BPE tokenizer files of Stable Diffusion v1.

The source is OpenAI's CLIP merges file `bpe_simple_vocab_16e6.txt.gz`, which ships inside the
open-clip-torch wheel as `open_clip/bpe_simple_vocab_16e6.txt.gz`. Get the wheel with

    pip download --no-deps open-clip-torch

and run

    python data/make_clip_vocab.py open_clip_torch-*.whl      # or a path to the .gz itself

The output is byte-identical to the vocab.json and merges.txt of Hugging Face's
openai/clip-vit-large-patch14 (the tokenizer of SD v1): vocab.json is one line of JSON with sorted
keys, merges.txt is `#version: 0.2` and the merges, with no final newline.

Vocabulary layout (49408 ids): the 256 byte symbols, the same 256 with `</w>` appended, one token per
merge for the first 48894 merges, then `<|startoftext|>` (49406) and `<|endoftext|>` (49407).
Standard library only.
"""

import argparse
import gzip
import json
import zipfile
from pathlib import Path

GZ_IN_WHEEL = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49408 - 256 - 256 - 2  # 48894: what fits in CLIP's 49408-token embedding table
SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in GPT-2's order: printable bytes first."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def read_merges_file(path: Path) -> str:
    """The decompressed text of bpe_simple_vocab_16e6.txt.gz, given the .gz or an open-clip-torch wheel."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            return gzip.decompress(wheel.read(GZ_IN_WHEEL)).decode("utf-8")
    return gzip.decompress(path.read_bytes()).decode("utf-8")


def build(text: str) -> tuple[str, str]:
    """(vocab.json text, merges.txt text) from the CLIP merges file text."""
    merges = text.split("\n")[1 : N_MERGES + 1]  # line 0 is a version header
    byte_symbols = bytes_to_unicode()
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges] + SPECIALS
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != 49408:
        raise SystemExit(f"error: {len(vocab)} distinct tokens instead of 49408: not the CLIP merges file")
    return json.dumps(vocab, ensure_ascii=False, sort_keys=True), "\n".join(["#version: 0.2", *merges])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="open_clip_torch-*.whl or bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args()
    vocab_json, merges_txt = build(read_merges_file(args.source))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab.json").write_text(vocab_json, encoding="utf-8", newline="")
    (args.out / "merges.txt").write_text(merges_txt, encoding="utf-8", newline="")
    print(f"wrote {args.out / 'vocab.json'} and {args.out / 'merges.txt'}")


if __name__ == "__main__":
    main()
