"""The text-encoder stack (`sd.clip`, `sd.text_encoders`, `sd.prompt`): every way a family reads CLIP
(layer, final norm, activation, pooled and projected vector, pad id) against transformers' CLIP text
models, and a stack of two encoders against the references' outputs concatenated as SDXL does."""

import pytest
import torch

from sd.clip import CLIPConfig, CLIPTextModel
from sd.prompt import PromptParser, TextEncoder, encode
from sd.text_encoders import TextEncoderSpec
from sd.tokenizer import BOS_ID, EOS_ID, CLIPTokenizer
from tests.conftest import rel_err
from tests.reference import oracle, randomize_

TOL = 1e-5
SIZES = dict(width=64, layers=3, heads=2)


def reference_pair(activation: str, projection_dim: int | None, seed: int):
    """A transformers CLIP text model with seeded random weights, and ours loaded from its weights."""
    transformers = oracle("transformers")
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=SIZES["width"], intermediate_size=4 * SIZES["width"],
                            num_hidden_layers=SIZES["layers"], num_attention_heads=SIZES["heads"],
                            max_position_embeddings=77, hidden_act=activation, bos_token_id=BOS_ID,
                            eos_token_id=EOS_ID, projection_dim=projection_dim or 64)
    ref = randomize_((transformers.CLIPTextModelWithProjection if projection_dim else transformers.CLIPTextModel)(config),
                     seed)
    ours = CLIPTextModel(CLIPConfig(**SIZES, activation=activation, projection_dim=projection_dim))
    state = {k.removeprefix("text_model."): v for k, v in ref.state_dict().items() if "position_ids" not in k}
    ours.load_state_dict(state)
    return ref, ours.eval()


def final_norm_of(ref) -> torch.nn.Module:
    """The reference's final LayerNorm (transformers nests it under `text_model` in some classes)."""
    return getattr(ref, "text_model", ref).final_layer_norm


def ids_of(texts: list[str], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, 77) as a family's tokenizer gives them: BOS, tokens, EOS, then `pad_id`; and the EOS positions."""
    tokens = CLIPTokenizer().tokenize(texts)
    ids = torch.full((len(texts), 77), pad_id)
    for row, t in enumerate(tokens):
        ids[row, : len(t) + 2] = torch.tensor([BOS_ID, *t, EOS_ID])
    return ids, torch.tensor([len(t) + 1 for t in tokens])


READINGS = [  # (activation, projection, pad id, hidden layer, final norm)
    ("quick_gelu", None, EOS_ID, -1, True),  # SD v1
    ("quick_gelu", None, EOS_ID, -2, True),  # SD v1 with clip skip 2
    ("gelu", None, 0, -2, True),  # SD 2.x: OpenCLIP's penultimate layer, then the final norm
    ("quick_gelu", None, EOS_ID, -2, False),  # SDXL's CLIP ViT-L
    ("gelu", 48, 0, -2, False),  # SDXL's bigG, with its projected pooled vector
    ("gelu", 48, EOS_ID, -3, True),
    ("quick_gelu", 32, 0, -1, False),
]


@pytest.mark.parametrize("activation, projection, pad_id, hidden_layer, final_norm", READINGS)
@torch.no_grad()
def test_encoder_reads_like_transformers(activation, projection, pad_id, hidden_layer, final_norm):
    ref, ours = reference_pair(activation, projection, seed=len(activation) + hidden_layer + 7 * bool(projection))
    ids, eos = ids_of(["a photograph of an astronaut", "a red cat!", ""], pad_id)
    out = ref(ids, output_hidden_states=True)
    expected = out.hidden_states[hidden_layer]
    expected = final_norm_of(ref)(expected) if final_norm else expected
    hidden, pooled = ours.encode(ids, hidden_layer=hidden_layer, final_norm=final_norm, eos=eos)
    assert rel_err(hidden, expected) < TOL
    ref_pooled = out.text_embeds if projection else out.pooler_output
    assert pooled.shape == ref_pooled.shape and rel_err(pooled, ref_pooled) < TOL
    assert ours.encode(ids, hidden_layer=hidden_layer, final_norm=final_norm)[1] is None


@pytest.mark.parametrize("text", ["a cat", "(a:1.2) long prompt, " * 20, "", "x BREAK y"])
@pytest.mark.parametrize("pad_id", [None, 0, 5])
def test_chunks_padded_with(text, pad_id):
    """Padding replaces exactly the positions after each chunk's end-of-text token."""
    for chunk in PromptParser(CLIPTokenizer()).parse(text).chunks:
        ids = chunk.padded_with(pad_id)
        assert len(ids) == 77 and ids[0] == BOS_ID and ids[chunk.eos] == EOS_ID
        assert ids[: chunk.eos + 1] == chunk.ids[: chunk.eos + 1]
        assert ids[chunk.eos + 1:] == [EOS_ID if pad_id is None else pad_id] * (76 - chunk.eos)


def weighted(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's "Original" emphasis on one encoder's output (N, 77, C) with weights (N, 77)."""
    mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights[..., None]
    return z * (mean / z.mean(dim=(1, 2), keepdim=True))


@torch.no_grad()
def test_two_encoder_stack_against_references():
    """SDXL's way: both encoders read the same chunks (each with its pad id and layer), emphasis on each
    output, concatenated along the channels chunk by chunk; the pooled vector from the first chunk."""
    (ref_l, ours_l), (ref_g, ours_g) = reference_pair("quick_gelu", None, 11), reference_pair("gelu", 48, 12)
    specs = (TextEncoderSpec(hidden_layer=-2, final_norm=False),
             TextEncoderSpec(name="clip_g", pad_id=0, hidden_layer=-2, final_norm=False, pooled=True))
    stack = [TextEncoder(specs[0], ours_l), TextEncoder(specs[1], ours_g)]
    parsed = PromptParser(CLIPTokenizer()).parse("a (red:1.4) fox in the snow, " * 12 + "BREAK [blurry]")
    context, pooled = encode(stack, [parsed])
    assert len(parsed.chunks) == 3 and context.shape == (1, 3 * 77, 2 * SIZES["width"])
    parts = []
    for chunk in parsed.chunks:
        weights = torch.tensor([chunk.weights])
        outs = [ref(torch.tensor([chunk.padded_with(spec.pad_id)]), output_hidden_states=True)
                for ref, spec in ((ref_l, specs[0]), (ref_g, specs[1]))]
        parts.append(torch.cat([weighted(o.hidden_states[-2], weights) for o in outs], dim=-1))
        if chunk is parsed.chunks[0]:
            assert rel_err(pooled, outs[1].text_embeds) < TOL
    assert rel_err(context, torch.cat(parts, dim=1)) < TOL


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_clip_skip_moves_every_encoder_back(clip_skip):
    """Clip skip N reads N - 1 layers before each encoder's own layer, and is bounded by the first layer."""
    spec = TextEncoderSpec(hidden_layer=-2)
    assert spec.with_clip_skip(clip_skip).hidden_layer == -1 - clip_skip
    ours = CLIPTextModel(CLIPConfig(**SIZES))
    assert TextEncoder(spec, ours).skippable_layers == SIZES["layers"] - 1
    assert TextEncoder(TextEncoderSpec(), ours).skippable_layers == SIZES["layers"]
