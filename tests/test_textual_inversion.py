"""Textual-inversion training (`sd.textual_inversion`) on tiny models: one AdamW step against diffusers' example
(`examples/textual_inversion`: new tokens added to transformers' tokenizer, CLIP's token-embedding matrix
resized, trained whole and every other row restored), which changes the vectors alone; the vectors' start;
bad settings, each one line; the written `.pt` and `.safetensors` through diffusers' `load_textual_inversion`
and our loader; atomic writes; SDXL's two sets; a DistributedDataParallel wrapper."""

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd.embeddings import read_embedding
from sd.errors import InputError, SettingError
from sd.objectives import DiffusionObjective, mse
from sd.pipeline import StableDiffusion
from sd.safe_pickle import load_pickle_checkpoint
from sd.textual_inversion import TrainableEmbedding, write_embedding
from tests.compvis import save_checkpoint, training_buffers
from tests.pipelines import reference_pipeline, reference_tokenizer
from tests.reference import oracle, small_vae, to_compvis
from tests.test_lora import tiny_references
from tests.tiny import TINY_CLIP, TINY_UNET, VAE_PREFIX, tiny_compvis_state, write_tiny_checkpoint

TOKEN = "<cat-toy>"
CAPTIONS = [f"a photo of {TOKEN}", f"{TOKEN}, on a wooden table by the sea"]


def relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """diffusers' UNet and transformers' CLIP at the tiny sizes, and our pipeline of a checkpoint of them (the
    tiny VAE beside), every network frozen as a training loop freezes what it does not train."""
    unet, clip = tiny_references()
    state = {**to_compvis("unet", unet, TINY_UNET), **to_compvis("clip", clip, TINY_CLIP), **training_buffers(),
             **{k: v for k, v in tiny_compvis_state().items() if k.startswith(VAE_PREFIX)}}
    pipe = StableDiffusion.from_checkpoint(save_checkpoint(state, tmp_path_factory.mktemp("ti") / "tiny.safetensors"))
    for net in (pipe.models.unet, pipe.models.clip, pipe.models.vae):
        net.requires_grad_(False)
    return SimpleNamespace(unet=unet, clip=clip, pipe=pipe)


def training_batch(seed: int = 0):
    """Clean latents, noise and timesteps of a batch of two, and the objective's network input and target."""
    gen = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([150, 820])
    noisy, wanted, _ = DiffusionObjective(train_text_encoder=False).training_pair(x0, noise, t)
    return noisy, wanted, t


def diffusers_example_step(tiny, start: torch.Tensor, noisy, wanted, t):
    """One step of diffusers' textual-inversion example: placeholder tokens <tok>, <tok>_1, ... added to the
    tokenizer, their rows of a copy of CLIP's resized token embeddings set to `start`, the whole matrix trained
    by AdamW, the other rows restored. Returns the context, the new rows' gradient and their values after."""
    tokenizer = reference_tokenizer()
    placeholders = [TOKEN] + [f"{TOKEN}_{i}" for i in range(1, len(start))]
    tokenizer.add_tokens(placeholders)
    ids = tokenizer.convert_tokens_to_ids(placeholders)
    clip = copy.deepcopy(tiny.clip)
    clip.resize_token_embeddings(len(tokenizer))
    weight = clip.get_input_embeddings().weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight[ids] = start
        original[ids] = start
    weight.requires_grad_(True)
    texts = [c.replace(TOKEN, " ".join(placeholders)) for c in CAPTIONS]
    input_ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    context = clip(input_ids).last_hidden_state  # (2, 77, C)
    mse(tiny.pipe.models.unet(noisy, t, context), wanted).backward()
    gradient = weight.grad[ids].clone()
    torch.optim.AdamW([weight], lr=1e-2).step()
    others = torch.ones(len(weight), dtype=torch.bool)
    others[ids] = False
    with torch.no_grad():
        weight[others] = original[others]
    return context.detach(), gradient, weight.detach()[ids]


def test_one_step_trains_the_vectors_alone_as_diffusers_example_does(tiny):
    emb = TrainableEmbedding(tiny.pipe, TOKEN, "toy", vectors=2)
    start = emb.vectors.detach().clone()
    before = {net: {k: v.clone() for k, v in getattr(tiny.pipe.models, net).state_dict().items()}
              for net in ("clip", "unet")}
    noisy, wanted, t = training_batch()
    context = emb.context(CAPTIONS)  # (2, 77, C)
    mse(tiny.pipe.models.unet(noisy, t, context), wanted).backward()
    gradient = emb.vectors.grad.clone()
    torch.optim.AdamW(emb.parameters(), lr=1e-2).step()

    theirs, their_gradient, their_after = diffusers_example_step(tiny, start, noisy, wanted, t)
    assert relative(context.detach(), theirs) < 1e-5
    assert relative(gradient, their_gradient) < 1e-4 and gradient.abs().amin(1).gt(0).all()
    assert (emb.vectors.detach() - start).abs().amin(1).gt(0).all()  # every vector moved
    assert relative(emb.vectors.detach() - start, their_after - start) < 1e-4
    for net, state in before.items():  # the token-embedding matrix and every other weight: bit for bit
        after = getattr(tiny.pipe.models, net).state_dict()
        assert all(torch.equal(after[k], v) for k, v in state.items()), net
        assert all(p.grad is None for p in getattr(tiny.pipe.models, net).parameters()), net
    assert [name for name, _ in emb.named_parameters()] == ["vectors"]


def test_the_vectors_start_as_the_init_word_row(tiny):
    [[toy]] = reference_tokenizer()(["toy"], add_special_tokens=False).input_ids
    emb = TrainableEmbedding(tiny.pipe, TOKEN, "toy", vectors=3)
    row = tiny.clip.get_input_embeddings().weight[toy]
    assert emb.vectors.shape == (3, TINY_CLIP.width) and all(torch.equal(v, row) for v in emb.vectors.detach())


def several_tokens(word: str) -> int:
    """How many tokens transformers' CLIP tokenizer makes of `word`."""
    return len(reference_tokenizer()(word, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("init_word", ["new york", "", "hyperventilating", "cat-toy", "  "])
def test_an_init_word_of_other_than_one_token_is_refused(tiny, init_word):
    count = several_tokens(init_word)
    assert count != 1
    with pytest.raises(SettingError) as refused:
        TrainableEmbedding(tiny.pipe, TOKEN, init_word)
    message = str(refused.value.for_flags())
    assert message.startswith("--init-word") and f"is {count} tokens" in message and "one-token word" in message
    assert "\n" not in message


@pytest.mark.parametrize("options, flag, says", [
    ({"vectors": 0}, "--vectors", "from 1 to 75"), ({"vectors": 76}, "--vectors", "from 1 to 75"),
    ({"vectors": 2.0}, "--vectors", "whole number"), ({"vectors": True}, "--vectors", "whole number"),
    ({"token": "cat"}, "--token", "a word of CLIP's vocabulary"), ({"token": "my toy"}, "--token", "spaces"),
    ({"token": ""}, "--token", "one word"), ({"token": "(x)"}, "--token", "prompt brackets"),
    ({"token": "<LOADED>"}, "--token", "reads as '<loaded>'"), ({"token": 3}, "--token", "a text"),
    ({"init_word": None}, "--init-word", "is 0 tokens"), ({"clip_skip": 0}, "--clip-skip", "between 1 and 2"),
])
def test_bad_settings_are_one_line(tiny, tmp_path, options, flag, says):
    pipe = StableDiffusion(tiny.pipe.models, tiny.pipe.tokenizer)
    save_file({"<loaded>": torch.zeros(1, TINY_CLIP.width)}, tmp_path / "<loaded>.safetensors")
    pipe.load_embedding(tmp_path / "<loaded>.safetensors")
    with pytest.raises(SettingError) as refused:
        TrainableEmbedding(pipe, **{"token": TOKEN, "init_word": "toy", **options})
    message = str(refused.value.for_flags())
    assert message.startswith(flag) and says in message and "\n" not in message, message


@pytest.mark.parametrize("captions, says", [
    (["a photo of a toy"], "does not use the token '<cat-toy>'"),
    ([f"a photo of {TOKEN}", "<cat-toys> on a table"], "'<cat-toys> on a table' does not use"),  # a longer word
    ([], "a non-empty list"), (TOKEN, "a non-empty list"),
])
def test_a_caption_without_the_token_is_refused(tiny, captions, says):
    emb = TrainableEmbedding(tiny.pipe, TOKEN, "toy")
    with pytest.raises(InputError) as refused:
        emb(captions)
    assert says in str(refused.value) and "\n" not in str(refused.value)
    emb([f"a photo of {TOKEN.upper()}"])  # the token in any case, as prompts read it


@pytest.fixture(scope="module")
def written(tiny, tmp_path_factory):
    """A trained-looking embedding of 3 vectors written in both formats, named after the token."""
    emb = TrainableEmbedding(tiny.pipe, TOKEN, "toy", vectors=3)
    with torch.no_grad():
        emb.vectors.add_(torch.randn(emb.vectors.shape, generator=torch.Generator().manual_seed(5)))
    paths = write_embedding(tmp_path_factory.mktemp("written") / TOKEN, emb, step=500, checkpoint_name="tiny",
                            checkpoint_hash="0123456789")
    return emb, paths


def test_the_files_hold_automatic1111s_and_diffusers_layouts(written):
    emb, (pt, safetensors) = written
    assert (pt.name, safetensors.name) == (f"{TOKEN}.pt", f"{TOKEN}.safetensors")
    contents = load_pickle_checkpoint(pt, "embedding")
    assert set(contents) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint",
                             "sd_checkpoint_name"}
    assert contents["string_to_token"] == {"*": 265} and set(contents["string_to_param"]) == {"*"}
    assert (contents["name"], contents["step"], contents["sd_checkpoint"], contents["sd_checkpoint_name"]) == (
        TOKEN, 500, "0123456789", "tiny")
    assert set(load_file(safetensors)) == {TOKEN}
    for path in (pt, safetensors):  # read back bit for bit, under the token
        e = read_embedding(path)
        assert e.name == TOKEN and torch.equal(e.vectors, emb.vectors.detach())


@pytest.mark.parametrize("form", [0, 1], ids=["pt", "safetensors"])
def test_written_files_give_diffusers_context_and_ours(tiny, written, form):
    """diffusers' load_textual_inversion (the token from the file: the `.pt`'s `name`, the safetensors' key) and
    our `load_embedding` of the same file encode a prompt alike; and as the training forward does."""
    emb, paths = written
    pipe = reference_pipeline(oracle("diffusers").StableDiffusionPipeline, SimpleNamespace(vae=small_vae(), clip=None),
                              tiny.unet, "euler_a", text_encoder=copy.deepcopy(tiny.clip))
    pipe.load_textual_inversion(str(paths[form]))
    ours = StableDiffusion(tiny.pipe.models, tiny.pipe.tokenizer)
    ours.load_embedding(paths[form])
    prompt = f"a photo of {TOKEN} on the beach"
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        context = ours.encode_prompts([prompt], None, 1)
        trained = emb.context([prompt])
    assert relative(context, theirs) < 1e-5
    assert torch.equal(trained, context)  # training reads the token as sampling does


class Refused(Exception):
    pass


@pytest.mark.parametrize("writer", ["torch.save", "write_safetensors"])
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), Refused("interrupted")])
def test_a_failed_write_leaves_no_file(tiny, tmp_path, monkeypatch, writer, error):
    def half_then_fail(*args):  # torch.save(obj, path), write_safetensors(path, tensors)
        next(a for a in args if isinstance(a, Path)).write_bytes(b"half a file")
        raise error

    if writer == "torch.save":
        monkeypatch.setattr(torch, "save", half_then_fail)
    else:
        monkeypatch.setattr("sd.textual_inversion.write_safetensors", half_then_fail)
    form = "pt" if writer == "torch.save" else "safetensors"
    emb = TrainableEmbedding(tiny.pipe, TOKEN, "toy")
    with pytest.raises(InputError if isinstance(error, OSError) else Refused) as refused:
        write_embedding(tmp_path / "toy", emb, step=1, checkpoint_name="tiny", checkpoint_hash=None, formats=(form,))
    assert list(tmp_path.iterdir()) == []
    if isinstance(error, OSError):
        assert "No space left on device" in str(refused.value) and "\n" not in str(refused.value)


def test_bad_formats_and_steps_are_refused(tiny, tmp_path):
    emb = TrainableEmbedding(tiny.pipe, TOKEN, "toy")
    for options, says in (({"formats": ("ckpt",)}, "unknown embedding format"), ({"formats": ()}, "give some"),
                          ({"step": -1}, "at least 0"), ({"step": 1.5}, "whole number")):
        with pytest.raises(InputError, match=says):
            write_embedding(tmp_path / "toy", emb, **{"step": 1, "checkpoint_name": "tiny", "checkpoint_hash": None,
                                                      **options})
    with pytest.raises(InputError, match="cannot write embedding .*: No such file or directory"):
        write_embedding(tmp_path / "missing" / "toy", emb, step=1, checkpoint_name="tiny", checkpoint_hash=None)
    assert list(tmp_path.iterdir()) == []


def test_sdxl_learns_a_set_per_text_encoder(tmp_path):
    xl = StableDiffusion.from_checkpoint(write_tiny_checkpoint(tmp_path / "xl.safetensors", family="sdxl"))
    for net in xl.models.text_towers:
        net.requires_grad_(False)
    emb = TrainableEmbedding(xl, TOKEN, "toy", vectors=2)
    [[toy]] = xl.tokenizer.tokenize(["toy"])
    assert set(emb.vectors) == {"clip_l", "clip_g"} and list(emb.embedding().vectors) == ["clip_l", "clip_g"]
    for key, net in (("clip_l", xl.models.clip), ("clip_g", xl.models.clip_g)):
        assert emb.vectors[key].shape == (2, net.config.width)
        assert all(torch.equal(v, net.embeddings.token_embedding.weight[toy]) for v in emb.vectors[key].detach())
    with torch.no_grad():
        for v in emb.vectors.values():
            v.add_(torch.randn(v.shape, generator=torch.Generator().manual_seed(3)))
    context, pooled = emb(CAPTIONS)
    (context.square().mean() + pooled.square().mean()).backward()
    assert all(v.grad.abs().amin(1).gt(0).all() for v in emb.vectors.values())
    pt, safetensors = write_embedding(tmp_path / "toy", emb, step=3, checkpoint_name="xl", checkpoint_hash=None)
    assert set(load_pickle_checkpoint(pt, "embedding")) == set(load_file(safetensors)) == {"clip_l", "clip_g"}
    for path in (pt, safetensors):
        e = xl.load_embedding(path, TOKEN)
        assert all(torch.equal(e.vectors[key], v.detach()) for key, v in emb.vectors.items())
        with torch.no_grad():
            loaded = xl.encode_text(CAPTIONS, None, 1)
        assert torch.equal(loaded[0], context.detach()) and torch.equal(loaded[1], pooled.detach())
        xl.embeddings.clear()


def test_it_trains_inside_distributed_data_parallel(tiny, tmp_path):
    """Wrapped (gloo, one process), the forward runs through DDP and its gradient is the unwrapped one's."""
    dist = torch.distributed
    emb = TrainableEmbedding(tiny.pipe, TOKEN, "toy", vectors=2)
    noisy, wanted, t = training_batch(1)
    mse(tiny.pipe.models.unet(noisy, t, emb.context(CAPTIONS)), wanted).backward()
    alone = emb.vectors.grad.clone()
    emb.zero_grad()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(emb)
        context, _ = ddp(CAPTIONS)
        mse(tiny.pipe.models.unet(noisy, t, context), wanted).backward()
    finally:
        dist.destroy_process_group()
    assert torch.equal(emb.vectors.grad, alone)
