"""Prompts as AUTOMATIC1111 reads them (`sd.prompt`, `sd.embeddings`): the emphasis parser against the
examples of its `parse_prompt_attention` and our own table; chunking by its rules; weighted long
prompts and CLIP skip against transformers' CLIPTextModel chunk by chunk; textual-inversion files
against diffusers' `load_textual_inversion`; and both end to end against diffusers' pipeline."""

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sd.embeddings import Embedding, read_embedding
from sd.errors import InputError, SettingError, UnsafeCheckpointError
from sd.pipeline import StableDiffusion
from sd.prompt import BREAK, MAX_CHUNKS, PromptParser, parse_emphasis
from sd.tokenizer import BOS_ID, EOS_ID, CLIPTokenizer
from tests.bad_files import attacks
from tests.conftest import rel_err
from tests.pipelines import assert_same, reference_context, reference_pipeline, run_ours, run_reference
from tests.reference import oracle

TOL = 1e-4  # as the model tests: fp32 sums in another order

# ---- the emphasis syntax ------------------------------------------------------------------------

A1111_EXAMPLES = {  # the docstring of AUTOMATIC1111's modules/prompt_parser.py parse_prompt_attention
    "normal text": [("normal text", 1.0)],
    "an (important) word": [("an ", 1.0), ("important", 1.1), (" word", 1.0)],
    "(unbalanced": [("unbalanced", 1.1)],
    r"\(literal\]": [("(literal]", 1.0)],
    "(unnecessary)(parens)": [("unnecessaryparens", 1.1)],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
}
OUR_CASES = {
    "": [("", 1.0)],
    "((a))": [("a", 1.1 * 1.1)],
    "[[a]]": [("a", 1 / 1.1 / 1.1)],
    "[a": [("a", 1 / 1.1)],
    "(x:.5) y": [("x", 0.5), (" y", 1.0)],
    "(x:+2) (y:-1)": [("x", 2.0), (" ", 1.0), ("y", -1.0)],
    "(x : 1.5 )": [("x ", 1.5)],
    "((x:2)y)": [("x", 2.2), ("y", 1.1)],
    "(a:b:1.2)": [("a:b", 1.2)],
    "happy :) face": [("happy :) face", 1.0)],  # a bracket that closes nothing is text
    "a ] b": [("a ] b", 1.0)],
    r"\\ \( \) \[ \]": [("\\ ( ) [ ]", 1.0)],
    r"a\b": [("ab", 1.0)],  # a lone backslash is dropped
    "a BREAK b": [("a", 1.0), BREAK, ("b", 1.0)],
    "BREAK": [("", 1.0), BREAK, ("", 1.0)],
    "(a BREAK b)": [("a", 1.1), BREAK, ("b", 1.1)],
    "BREAKFAST": [("BREAKFAST", 1.0)],
    "(a)(b)[c]": [("ab", 1.1), ("c", 1 / 1.1)],
    "(x:100) (y:-100)": [("x", 100.0), (" ", 1.0), ("y", -100.0)],
}
# AUTOMATIC1111's documented rule, not computed by it: a weight is only `:` then digits and dots before the
# `)`; any other `:` is text, and the bracket is (text), weight 1.1.
TEXT_COLONS = {
    "(time: dusk)": [("time: dusk", 1.1)],
    "(style: watercolor), a fox": [("style: watercolor", 1.1), (", a fox", 1.0)],
    "(x:abc)": [("x:abc", 1.1)],
    "(x:)": [("x:", 1.1)],
    "(best:1,2)": [("best:1,2", 1.1)],
    "(x:1e5)": [("x:1e5", 1.1)],
    "(x: 1 2)": [("x: 1 2", 1.1)],
    "((a:b):1.5)": [("a:b", 1.1 * 1.5)],
    "[x:2]": [("x:2", 1 / 1.1)],
    "a:b": [("a:b", 1.0)],
}


@pytest.mark.parametrize("prompt", list(A1111_EXAMPLES) + list(OUR_CASES) + list(TEXT_COLONS))
def test_emphasis_parser(prompt):
    assert parse_emphasis(prompt) == {**A1111_EXAMPLES, **OUR_CASES, **TEXT_COLONS}[prompt]


@pytest.mark.parametrize("prompt", ["(x:1.2.3)", "((x:.))", "(x:..)", "(x:1..2)", "(x:+.)", "(x: -.  )"])
def test_weights_automatic1111_cannot_read_are_refused(prompt):
    with pytest.raises(SettingError, match="is not a number"):
        parse_emphasis(prompt)


@pytest.mark.parametrize("prompt", ["(x:100.01)", "(x:-101)", "(x:99999999999999999999999999999999999999999)",
                                    "(((x:90)))", "[[(x:-200)]]", "(" * 49 + "x"])
def test_weights_beyond_the_bound_are_refused(prompt):
    with pytest.raises(SettingError, match="beyond"):
        parse_emphasis(prompt)


# ---- chunks ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


def words(n: int, word: str = "cat") -> str:
    return " ".join([word] * n)


def lengths(parser: PromptParser, prompt: str) -> list[int]:
    """How many prompt tokens (embedding vectors included) each chunk holds."""
    return [sum(i != EOS_ID for i in c.ids[1:]) + len(c.vectors) for c in parser.parse(prompt).chunks]


@pytest.mark.parametrize("prompt, expected", [
    ("", [0]),
    (words(75), [75]),
    (words(76), [75, 1]),
    (words(150), [75, 75]),
    # A full chunk hands the words after a comma within its last 20 tokens to the next chunk:
    (words(60) + " , " + words(20, "dog"), [61, 20]),
    (words(55) + " , " + words(20, "dog"), [56, 20]),
    # ... but not after one further back:
    (words(50) + " , " + words(30, "dog"), [75, 6]),
    # A comma that is the 76th token starts the next chunk:
    (words(75) + " , dog", [75, 2]),
    ("cat BREAK dog", [1, 1]),
    ("BREAK dog", [0, 1]),
    ("cat BREAK", [1]),
    (words(75) + " BREAK dog", [75, 1]),
])
def test_chunk_lengths(tokenizer, prompt, expected):
    assert lengths(PromptParser(tokenizer), prompt) == expected


def test_chunks_hold_bos_tokens_eos_padding_and_weights(tokenizer):
    [chunk] = PromptParser(tokenizer).parse("a (red:1.5) cat").chunks
    ids = tokenizer.tokenize(["a", "red", "cat"])
    assert chunk.ids == [BOS_ID, *ids[0], *ids[1], *ids[2]] + [EOS_ID] * 73
    assert chunk.weights == [1.0, 1.0, 1.5, 1.0] + [1.0] * 73


def embedding(name: str, n: int, width: int = 768, seed: int = 0) -> Embedding:
    vectors = torch.randn(n, width, generator=torch.Generator().manual_seed(seed))
    return Embedding(name, vectors, Path(f"{name}.pt"), "0" * 64)


def test_embeddings_take_their_place_and_are_never_split(tokenizer):
    style = embedding("<my-style>", 3)
    parser = PromptParser(tokenizer, {style.name: style})
    parsed = parser.parse(words(73) + " <MY-style>, dog")  # 73 + 3 > 75: the embedding opens chunk 2
    first, second = parsed.chunks
    assert not first.vectors and sum(i != EOS_ID for i in first.ids) == 74
    assert list(second.vectors) == [1, 2, 3] and all(torch.equal(second.vectors[1 + k], style.vectors[k])
                                                     for k in range(3))
    assert second.ids[4:6] == tokenizer.tokenize([", dog"])[0]  # the comma touching the name is its own token
    assert parsed.embeddings == [style] and parsed.tokens == 73 + 3 + 2
    assert len(parser.parse("x<my-style>y").chunks[0].vectors) == 3  # brackets end the name wherever it stands
    word = embedding("shapestyle", 1)
    parser = PromptParser(tokenizer, {word.name: word})
    assert not parser.parse("shapestyles xshapestyle").chunks[0].vectors  # but a word is not found inside a word
    assert len(parser.parse("(shapestyle:1.1), x").chunks[0].vectors) == 1


def test_embedding_moved_with_the_words_after_a_comma(tokenizer):
    style = embedding("<my-style>", 2)
    parsed = PromptParser(tokenizer, {style.name: style}).parse(words(65) + " , <my-style> " + words(10, "dog"))
    first, second = parsed.chunks
    assert sum(i != EOS_ID for i in first.ids) == 1 + 66 and not first.vectors
    assert list(second.vectors) == [1, 2] and torch.equal(second.vectors[2], style.vectors[1])


def test_absurdly_long_prompts_are_refused_with_their_length(tokenizer):
    with pytest.raises(SettingError, match=r"negative_prompt is 3000 tokens long in 40 chunks"):
        PromptParser(tokenizer).parse(words(3000), "negative_prompt")
    with pytest.raises(SettingError, match=f"{MAX_CHUNKS + 1} chunks"):
        PromptParser(tokenizer).parse(" BREAK ".join(["cat"] * (MAX_CHUNKS + 1)))


# ---- encoding against transformers' CLIP ----------------------------------------------------------

LONG_TEXT = "a photograph of (an astronaut:1.3) (riding a horse) on the moon" + " in the style of an old master" * 25 \
            + " [grainy film]"
LONG_RUNS = [("a photograph of ", 1.0), ("an astronaut", 1.3), (" ", 1.0), ("riding a horse", 1.1),
             (" on the moon" + " in the style of an old master" * 25 + " ", 1.0), ("grainy film", 1 / 1.1)]
NEGATIVE_TEXT, NEGATIVE_RUNS = "(blurry:1.4) low quality", [("blurry", 1.4), (" low quality", 1.0)]


@pytest.fixture(scope="module")
def sd(loaded):
    return StableDiffusion(loaded("safetensors"))


def test_a_prompt_without_brackets_gives_today_s_context(sd):
    prompts = ["a red bicycle leaning on a stone wall, golden hour", ""]
    with torch.no_grad():
        assert torch.equal(sd.encode_prompts(prompts, None, 1), sd.models.clip(sd.tokenizer(prompts)))


@pytest.mark.parametrize("clip_skip", [1, 2, 12])
def test_weighted_long_prompts_and_clip_skip_against_transformers(sd, refs, clip_skip):
    with torch.no_grad():
        ours = sd.encode_prompts([LONG_TEXT], [NEGATIVE_TEXT], 1, clip_skip)  # (2, 77·k, 768)
        ref_prompt = reference_context(refs.clip, LONG_RUNS, clip_skip=clip_skip)
        ref_negative = reference_context(refs.clip, NEGATIVE_RUNS, chunks=ref_prompt.shape[1] // 77,
                                         clip_skip=clip_skip)
    assert ref_prompt.shape == (1, 77 * 3, 768) and ours.shape == (2, 77 * 3, 768)  # 188 tokens
    assert rel_err(ours[1:], ref_prompt) < TOL
    assert rel_err(ours[:1], ref_negative) < TOL  # the negative prompt padded with the empty prompt's chunks


def test_each_prompt_of_a_batch_is_encoded_on_its_own(sd):
    with torch.no_grad():
        both = sd.encode_prompts([LONG_TEXT, NEGATIVE_TEXT], None, 1)
        alone = [sd.encode_prompts([text], None, 1) for text in (LONG_TEXT, NEGATIVE_TEXT)]
    assert rel_err(both[:1], alone[0]) < TOL
    assert rel_err(both[1:, :77], alone[1]) < TOL
    empty = sd.encode_prompts([""], None, 1)
    assert rel_err(both[1:, 77:], empty.repeat(1, 2, 1)) < TOL


# ---- textual inversion against diffusers ------------------------------------------------------

def write_embeddings(folder) -> dict[str, tuple]:
    """One file per layout: {token: (path, vectors, token to pass or None)}."""
    def vectors(n, seed):
        return torch.randn(n, 768, generator=torch.Generator().manual_seed(seed)) * 0.5

    files = {}
    a1111, kohya, bin_, st = vectors(2, 1), vectors(3, 2), vectors(1, 3)[0], vectors(1, 4)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": a1111.requires_grad_()}, "name": "old-name",
                "step": 500, "sd_checkpoint": "abcdef01", "sd_checkpoint_name": "v1-5"}, folder / "a1111-style.pt")
    files["<a1111-style>"] = (folder / "a1111-style.pt", a1111.detach(), "<a1111-style>")
    save_file({"emb_params": kohya}, folder / "kohya.safetensors")
    files["<kohya-style>"] = (folder / "kohya.safetensors", kohya, "<kohya-style>")
    torch.save({"<fox-style>": bin_}, folder / "learned_embeds.bin")
    files["<fox-style>"] = (folder / "learned_embeds.bin", bin_[None], None)
    save_file({"<owl-style>": st}, folder / "learned_embeds.safetensors")
    files["<owl-style>"] = (folder / "learned_embeds.safetensors", st, None)
    return files


TI_PROMPT = "a <a1111-style> fox, by <kohya-style>, (<fox-style>:1.2) and <owl-style>"
TI_NEGATIVE = "<fox-style>, blurry"


@pytest.fixture(scope="module")
def ti_files(tmp_path_factory):
    return write_embeddings(tmp_path_factory.mktemp("embeddings"))


def test_every_layout_reads_to_its_vectors_and_name(ti_files, tmp_path):
    for token, (path, vectors, given) in ti_files.items():
        e = read_embedding(path, given)
        assert e.name == token and torch.equal(e.vectors, vectors)
    assert read_embedding(ti_files["<a1111-style>"][0]).name == "a1111-style"  # the file's name
    # The original implementation's files pickle a ParameterDict; it is read without being built.
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(ti_files["<kohya-style>"][1])})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params}, tmp_path / "old.pt")
    assert torch.equal(read_embedding(tmp_path / "old.pt").vectors, ti_files["<kohya-style>"][1])


def test_a_malicious_embedding_is_refused(tmp_path):
    marker = tmp_path / "ran"
    for name, payload in attacks(marker).items():
        torch.save({"string_to_param": {"*": payload}}, tmp_path / "evil.pt")
        with pytest.raises(UnsafeCheckpointError):
            read_embedding(tmp_path / "evil.pt")
        assert not marker.exists(), name


def diffusers_with_embeddings(refs, ti_files):
    """diffusers' pipeline of the reference models (its own copy of CLIP, which loading resizes), with
    every embedding file loaded by load_textual_inversion."""
    pipe = reference_pipeline(oracle("diffusers").StableDiffusionPipeline, refs, refs.unet, "dpmpp_2m_karras",
                              text_encoder=copy.deepcopy(refs.clip))
    for token, (path, _, given) in ti_files.items():
        pipe.load_textual_inversion(str(path), token=token)
    return pipe


def ours_with_embeddings(sd_models, ti_files) -> StableDiffusion:
    ours = StableDiffusion(sd_models)
    for path, _, given in ti_files.values():
        ours.load_embedding(path, given)
    return ours


def test_textual_inversion_context_against_diffusers(refs, loaded, ti_files):
    pipe = diffusers_with_embeddings(refs, ti_files)
    ours = ours_with_embeddings(loaded("safetensors"), ti_files)
    plain = TI_PROMPT.replace("(<fox-style>:1.2)", "<fox-style>")  # diffusers has no emphasis
    with torch.no_grad():
        theirs, theirs_negative = pipe.encode_prompt(plain, "cpu", 1, True, TI_NEGATIVE)
        context = ours.encode_prompts([plain], [TI_NEGATIVE], 1)
    assert rel_err(context[1:], theirs) < TOL and rel_err(context[:1], theirs_negative) < TOL
    assert {e.name for e in ours.prompt_parser.parse(TI_PROMPT).embeddings} == set(ti_files)


def test_textual_inversion_end_to_end_against_diffusers(refs, loaded, ti_files):
    plain = TI_PROMPT.replace("(<fox-style>:1.2)", "<fox-style>")
    settings = dict(width=96, height=64, guidance_scale=7.5)
    ours = run_ours(ours_with_embeddings(loaded("safetensors"), ti_files), "text_to_image", 7, prompt=plain,
                    negative_prompt=TI_NEGATIVE, steps=6, sampler="dpmpp_2m_karras", **settings)
    theirs = run_reference(diffusers_with_embeddings(refs, ti_files), 7, prompt=plain, negative_prompt=TI_NEGATIVE,
                           num_inference_steps=6, **settings)
    assert_same(ours, theirs)


def test_weighted_long_prompt_end_to_end_against_diffusers(refs, sd):
    """Our pipeline given the text; diffusers' given the reference encoding of the same text."""
    with torch.no_grad():
        prompt_embeds = reference_context(refs.clip, LONG_RUNS, clip_skip=2)
        negative_embeds = reference_context(refs.clip, NEGATIVE_RUNS, chunks=3, clip_skip=2)
    settings = dict(width=96, height=64, guidance_scale=7.5)
    ours = run_ours(sd, "text_to_image", 3, prompt=LONG_TEXT, negative_prompt=NEGATIVE_TEXT, steps=6,
                    sampler="euler_a", clip_skip=2, **settings)
    pipe = reference_pipeline(oracle("diffusers").StableDiffusionPipeline, refs, refs.unet, "euler_a")
    theirs = run_reference(pipe, 3, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                           num_inference_steps=6, **settings)
    assert_same(ours, theirs)


@pytest.mark.parametrize("name, message", [
    ("cat", "is a word of CLIP's vocabulary"), ("my style", "has spaces"), ("(x)-style", "prompt brackets"),
    ("<BREAK-x>", "BREAK"), ("<My-Style>", "reads as '<my-style>'")])
def test_names_prompts_could_not_tell_apart_are_refused(tokenizer, name, message):
    from sd.embeddings import check_name
    loaded = {"<my-style>": embedding("<my-style>", 1)}
    with pytest.raises(InputError, match=message):
        check_name(embedding(name, 1), tokenizer, loaded)


def test_an_embedding_of_another_width_leaves_the_model_unchanged(loaded):
    ours = StableDiffusion(loaded("safetensors"))
    with pytest.raises(InputError, match="width 1024 .for SD 2.x.; this model's text encoder is 768 wide"):
        ours.add_embedding(embedding("<wide-style>", 1, width=1024))
    assert ours.embeddings == {}
