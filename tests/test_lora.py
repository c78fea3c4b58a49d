"""LoRA files (`sd.lora`) against diffusers' `load_lora_weights` + `fuse_lora` on the full-size random
model: kohya's layout (with and without alpha, LoCon 3x3 convolutions, resamplers, the text encoder)
and diffusers/PEFT's; the merged weights, two LoRAs with their weights, the end-to-end latents, and
unloading bit for bit. Files that do not fit are refused with the model unchanged. The trainable layers
(`sd.lora_layers`) against peft's: their start, forward, gradients and merge; trained, they save as a
file that `read_lora` merges back to the same outputs."""

import contextlib
import copy
import hashlib
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import run_demo

from sd.errors import CheckpointError, InputError, UnsafeCheckpointError
from sd.lora import diffusers_unet_path, lora_targets
from sd.lora_layers import LoRAConv, LoRALinear, lora_state_dict, unwrap_lora, wrap_lora
from sd.pipeline import StableDiffusion
from tests.bad_files import attacks
from tests.compvis import CLIP_PREFIX, UNET_PREFIX
from tests.conftest import rel_err
from tests.pipelines import assert_same, reference_pipeline, run_ours, run_reference
from tests.reference import oracle
from tests.tiny import write_tiny_checkpoint

# Every kind of layer a LoRA changes, in a few blocks: attention, feed-forward and proj_in/out of the
# transformers, res blocks (3x3 LoCon convs, time embedding, shortcut), both resamplers, the text encoder.
KINDS = re.compile(r"(down_blocks_1|mid_block|up_blocks_0|up_blocks_1_attentions_2|text_model_encoder_layers_(0|11))_")


SPELLINGS = {False: ("lora_unet_", "lora_te_text_model_"), True: ("unet.", "text_encoder.text_model.")}  # by peft


def random_lora(models, seed: int, rank: int = 4, alpha: float | None = 2.0, peft: bool = False) -> dict:
    """A LoRA for the layers KINDS picks, random, in kohya's layout (or diffusers/PEFT's)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in lora_targets(models).items():
        if not name.startswith(SPELLINGS[peft]) or \
                not KINDS.search(name.replace(".", "_")):
            continue
        w = module.weight
        kernel = w.shape[2:] if w.dim() == 4 else ()
        down = torch.randn(rank, w.shape[1], *kernel, generator=gen) * 0.05  # (r, in[, k, k])
        up = torch.randn(w.shape[0], rank, *(1,) * len(kernel), generator=gen) * 0.05  # (out, r[, 1, 1])
        if peft:
            state.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
        else:
            state.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
            if alpha is not None:
                state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def test_diffusers_names_of_our_unet_layers():
    from sd.unet import UNetConfig
    cfg = UNetConfig()
    assert {path: diffusers_unet_path(path, cfg) for path in [
        "time_embed.0", "time_embed.2", "input_blocks.0.0", "out.2", "input_blocks.4.1.proj_in",
        "input_blocks.5.0.in_layers.2", "input_blocks.4.0.skip_connection", "input_blocks.6.0.op",
        "middle_block.0.emb_layers.1", "middle_block.1.transformer_blocks.0.attn2.to_out.0",
        "middle_block.2.out_layers.3", "output_blocks.2.1.conv", "output_blocks.5.2.conv",
        "output_blocks.7.1.transformer_blocks.0.ff.net.0.proj", "output_blocks.11.0.skip_connection"]} == {
        "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.2": "conv_out",
        "input_blocks.4.1.proj_in": "down_blocks.1.attentions.0.proj_in",
        "input_blocks.5.0.in_layers.2": "down_blocks.1.resnets.1.conv1",
        "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "input_blocks.6.0.op": "down_blocks.1.downsamplers.0.conv",
        "middle_block.0.emb_layers.1": "mid_block.resnets.0.time_emb_proj",
        "middle_block.1.transformer_blocks.0.attn2.to_out.0": "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
        "middle_block.2.out_layers.3": "mid_block.resnets.1.conv2",
        "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv", "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
        "output_blocks.7.1.transformer_blocks.0.ff.net.0.proj": "up_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj",
        "output_blocks.11.0.skip_connection": "up_blocks.3.resnets.2.conv_shortcut"}


def test_every_diffusers_name_is_a_layer_of_diffusers_unet(refs, loaded):
    """The names our rules give are exactly the diffusers UNet's Linear and Conv2d layers."""
    ours = {k[len("unet."):] for k in lora_targets(loaded("safetensors")) if k.startswith("unet.")}
    theirs = {n for n, m in refs.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert ours == theirs


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, loaded):
    models = loaded("safetensors")
    folder = tmp_path_factory.mktemp("loras")
    files = {"kohya": random_lora(models, 1), "kohya_no_alpha": random_lora(models, 2, alpha=None),
             "peft": random_lora(models, 3, peft=True)}
    for name, state in files.items():
        save_file(state, folder / f"{name}.safetensors")
    return {name: folder / f"{name}.safetensors" for name in files}


def reference_layers(ours_models, refs) -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    """(our layer, diffusers' / transformers' layer) by the LoRA name (kohya's spelling) of every layer the
    test LoRAs touch, found through the diffusers spelling of each of our layers."""
    targets = lora_targets(ours_models)
    spelled = {}  # our module -> its diffusers path
    for name, module in targets.items():
        for prefix, ref in (("unet.", refs.unet), ("text_encoder.text_model.", refs.clip)):
            if name.startswith(prefix):
                spelled[module] = ref.get_submodule(name[len(prefix):])
    return {name: (module, spelled[module]) for name, module in targets.items()
            if name.startswith(SPELLINGS[False]) and KINDS.search(name)}


@contextlib.contextmanager
def diffusers_fused(refs, loras: list[tuple[str, float]], layers, pipe=None):
    """diffusers' pipeline of the reference models (`pipe`, by default StableDiffusionPipeline's) with the LoRAs
    loaded, weighted, fused and their adapter layers removed: plain models with merged weights. The reference
    weights of `layers` are put back after (copying only those, not the 4 GB models)."""
    originals = [(ref, ref.weight.detach().clone()) for _, ref in layers.values()]
    pipe = pipe or reference_pipeline(oracle("diffusers").StableDiffusionPipeline, refs, refs.unet, "dpmpp_2m_karras")
    names = [f"lora{i}" for i in range(len(loras))]
    try:
        for name, (path, _) in zip(names, loras):
            pipe.load_lora_weights(str(path), adapter_name=name)
        pipe.set_adapters(names, [weight for _, weight in loras])
        pipe.fuse_lora(adapter_names=names)
        pipe.unload_lora_weights()
        yield pipe
    finally:
        pipe.unload_lora_weights()
        with torch.no_grad():
            for ref, original in originals:
                ref.weight.copy_(original)


def assert_merged_like_diffusers(ours: StableDiffusion, layers, compvis_state):
    """Every layer a LoRA touches has diffusers' merged weight; every other weight is the file's."""
    for name, (mine, ref) in layers.items():
        assert rel_err(mine.weight, ref.weight.reshape(mine.weight.shape)) < 1e-6, name
    touched = {id(mine.weight) for mine, _ in layers.values()}
    for net, prefix in (("unet", UNET_PREFIX), ("clip", CLIP_PREFIX)):
        for key, value in getattr(ours.models, net).state_dict(keep_vars=True).items():
            if id(value) not in touched:
                assert torch.equal(value, compvis_state[prefix + key]), key


@pytest.mark.parametrize("loras", [[("kohya", 0.8)], [("kohya_no_alpha", 1.0)], [("peft", 1.0)],
                                   [("kohya", 0.7), ("peft", -0.3)]])
def test_merged_weights_against_diffusers(refs, loaded, compvis_state, lora_files, loras):
    ours = StableDiffusion(loaded("safetensors"))
    layers = reference_layers(ours.models, refs)
    try:
        for name, weight in loras:
            lora = ours.load_lora(lora_files[name], weight)
            assert not lora.unmatched and len(lora.layers) == len(layers) == 87
        with diffusers_fused(refs, [(lora_files[n], w) for n, w in loras], layers):
            assert_merged_like_diffusers(ours, layers, compvis_state)
    finally:
        ours.unload_lora()
    for net, prefix in (("unet", UNET_PREFIX), ("clip", CLIP_PREFIX)):  # unloading restores every weight exactly
        for key, value in getattr(ours.models, net).state_dict().items():
            assert torch.equal(value, compvis_state[prefix + key]), key


def test_lora_end_to_end_against_diffusers(refs, loaded, lora_files):
    settings = dict(prompt="a red bicycle, golden hour", negative_prompt="blurry", width=96, height=64,
                    guidance_scale=7.5)
    ours = StableDiffusion(loaded("safetensors"))
    layers = reference_layers(ours.models, refs)
    ours.load_lora(lora_files["kohya"], 0.8)
    try:
        mine = run_ours(ours, "text_to_image", 5, steps=4, sampler="dpmpp_2m_karras", **settings)
    finally:
        ours.unload_lora()
    with diffusers_fused(refs, [(lora_files["kohya"], 0.8)], layers) as pipe:
        theirs = run_reference(pipe, 5, num_inference_steps=4, **settings)
    assert_same(mine, theirs)


# ---- files that do not fit (on a tiny model) --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return StableDiffusion.from_checkpoint(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.safetensors"))


def bad_lora_files(folder, models) -> dict[str, tuple]:
    good = random_lora(models, 4)
    key = next(k for k in good if k.startswith("lora_unet") and k.endswith("lora_down.weight"))
    files = {
        "sdxl": ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
                  "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2)}, "for SDXL"),
        "shapes": ({**good, key: torch.zeros(4, 7, *good[key].shape[2:])}, "for another model"),
        "nothing_matches": ({"lora_unet_foo.lora_down.weight": torch.zeros(2, 3),
                             "lora_unet_foo.lora_up.weight": torch.zeros(3, 2)}, "none of its 1 layers"),
        "no_lora_keys": ({"weight": torch.zeros(2)}, "holds no LoRA layers"),
        "no_up": ({key: good[key]}, "no up matrix"),
    }
    for name, (state, _) in files.items():
        save_file(state, folder / f"{name}.safetensors")
    (folder / "empty.safetensors").write_bytes(b"")
    return {**{name: (folder / f"{name}.safetensors", message) for name, (_, message) in files.items()},
            "empty": (folder / "empty.safetensors", "not a readable .safetensors"),
            "missing": (folder / "missing.safetensors", "LoRA file not found")}


def test_bad_lora_files_are_refused_and_the_model_is_unchanged(tiny, tmp_path):
    before = {k: v.clone() for k, v in tiny.models.unet.state_dict().items()}
    for name, (path, message) in bad_lora_files(tmp_path, tiny.models).items():
        with pytest.raises((InputError, CheckpointError), match=re.escape(message)):
            tiny.load_lora(path)
        assert all(torch.equal(before[k], v) for k, v in tiny.models.unet.state_dict().items()), name
    with pytest.raises(InputError, match="weight must be between -100 and 100"):
        tiny.load_lora(tmp_path / "shapes.safetensors", float("nan"))


def test_a_malicious_lora_is_refused(tiny, tmp_path):
    marker = tmp_path / "ran"
    for name, payload in attacks(marker).items():
        torch.save({"lora_unet_x.lora_down.weight": payload}, tmp_path / "evil.pt")
        with pytest.raises(UnsafeCheckpointError):
            tiny.load_lora(tmp_path / "evil.pt")
        assert not marker.exists(), name


def test_unmatched_layers_are_reported(tiny, tmp_path):
    state = {**random_lora(tiny.models, 5), "lora_unet_foo_bar.lora_down.weight": torch.zeros(2, 3),
             "lora_unet_foo_bar.lora_up.weight": torch.zeros(3, 2)}
    save_file(state, tmp_path / "extra.safetensors")
    with pytest.warns(UserWarning, match=r"1 of the \d+ layers of LoRA .* left out: lora_unet_foo_bar"):
        lora = tiny.load_lora(tmp_path / "extra.safetensors")
    tiny.unload_lora()
    assert lora.unmatched == ["lora_unet_foo_bar"]


# ---- the command line (in-process, tiny model) ------------------------------------------------------

def run_demo_main(*args) -> int:
    return run_demo.main(["--no-progress", "--steps", "2", "--width", "64", "--height", "48", "--seed", "3",
                          *map(str, args)])


def png(path):
    with Image.open(path) as image:
        return image.text["parameters"], np.asarray(image)


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    checkpoint = write_tiny_checkpoint(folder / "tiny.safetensors")
    models = StableDiffusion.from_checkpoint(checkpoint).models
    (folder / "lora").mkdir()
    save_file(random_lora(models, 6), folder / "lora" / "style.safetensors")
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2)}, folder / "xl.safetensors")
    return folder, checkpoint


def test_lora_flag_and_prompt_tag_make_the_same_image(cli_files, tmp_path, monkeypatch, capsys):
    folder, checkpoint = cli_files
    lora = folder / "lora" / "style.safetensors"
    common = ["--checkpoint", checkpoint, "--prompt", "a red circle"]
    assert run_demo_main(*common, "--output", tmp_path / "plain.png") == 0
    assert run_demo_main(*common, "--lora", f"{lora}:0.5", "--output", tmp_path / "flag.png") == 0
    monkeypatch.setattr(run_demo, "LORA_DIR", folder / "lora")
    assert run_demo_main("--checkpoint", checkpoint, "--prompt", "a red circle <lora:style:0.5>",
                         "--output", tmp_path / "tag.png") == 0
    (plain, plain_pixels), (flag, flag_pixels), (tag, tag_pixels) = (png(tmp_path / f"{n}.png")
                                                                     for n in ("plain", "flag", "tag"))
    short_hash = hashlib.sha256(lora.read_bytes()).hexdigest()[:12]
    assert flag.startswith("a red circle <lora:style:0.5>\n") and f'Lora hashes: "style: {short_hash}"' in flag
    assert flag == tag and np.array_equal(flag_pixels, tag_pixels)
    assert "Lora" not in plain and not np.array_equal(plain_pixels, flag_pixels)
    # --from-png finds the LoRA in the LoRA folder, or by --lora (whose weight, when given, wins)
    assert run_demo_main("--checkpoint", checkpoint, "--from-png", tmp_path / "flag.png", "--output",
                         tmp_path / "again.png") == 0
    assert np.array_equal(png(tmp_path / "again.png")[1], flag_pixels)
    assert run_demo_main("--checkpoint", checkpoint, "--from-png", tmp_path / "flag.png", "--lora", f"{lora}:0.9",
                         "--output", tmp_path / "heavier.png") == 0
    heavier, heavier_pixels = png(tmp_path / "heavier.png")
    assert heavier.startswith("a red circle <lora:style:0.9>\n") and not np.array_equal(heavier_pixels, flag_pixels)
    capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["--prompt", "a circle <lora:missing:1>"], "--prompt has <lora:missing>, but there is no missing.safetensors"),
    (["--prompt", "a circle <lora:style:abc>"], "whose weight 'abc' is not a number"),
    (["--prompt", "a circle", "--lora", "nowhere.safetensors"], "--lora nowhere.safetensors not found"),
    (["--prompt", "a circle", "--lora", "XL"], "is a LoRA for SDXL"),
])
def test_bad_lora_arguments_are_one_line(cli_files, tmp_path, monkeypatch, capsys, args, message):
    folder, checkpoint = cli_files
    monkeypatch.setattr(run_demo, "LORA_DIR", folder / "lora")
    args = [str(folder / "xl.safetensors") if a == "XL" else a for a in args]
    assert run_demo_main("--checkpoint", checkpoint, *args, "--output", tmp_path / "out.png") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out.png").exists()


# ---- trainable, unmerged layers (sd.lora_layers) against peft ----------------------------------------

class Holder(torch.nn.Module):
    """A network of one layer, named `layer`, for peft's target_modules to find."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


# (the layer, its input's shape, rank, alpha, dropout): Linear, 1x1 and 3x3 convolutions (strided, padded)
LAYERS = {
    "linear r4": (lambda: torch.nn.Linear(12, 10), (3, 5, 12), 4, 8.0, 0.0),
    "linear r1 no bias": (lambda: torch.nn.Linear(7, 9, bias=False), (4, 7), 1, 1.0, 0.0),
    "linear r6 dropout": (lambda: torch.nn.Linear(16, 8), (2, 3, 16), 6, 3.0, 0.25),
    "conv1x1 r2": (lambda: torch.nn.Conv2d(6, 5, 1), (2, 6, 7, 5), 2, 3.0, 0.0),
    "conv3x3 r4": (lambda: torch.nn.Conv2d(6, 8, 3, padding=1), (2, 6, 9, 7), 4, 2.0, 0.0),
    "conv3x3 r8 stride 2": (lambda: torch.nn.Conv2d(4, 8, 3, stride=2, padding=1), (1, 4, 10, 8), 8, 16.0, 0.0),
}


def peft_and_ours(case: str, trained: bool = True, seed: int = 0):
    """The case's layer (seeded) wrapped by peft (get_peft_model) and by ours, each from the same random state;
    `trained`: the same random down and up then put into both (fresh ones have up = 0)."""
    peft = oracle("peft")
    make, _, rank, alpha, dropout = LAYERS[case]
    torch.manual_seed(seed)
    base = make()
    twin = Holder(make())
    twin.layer.load_state_dict(base.state_dict())
    torch.manual_seed(seed + 1)
    theirs = peft.get_peft_model(twin, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                                       target_modules=["layer"]))
    torch.manual_seed(seed + 1)
    ours = (LoRAConv if isinstance(base, torch.nn.Conv2d) else LoRALinear)(base, rank, alpha, dropout)
    if trained:
        gen = torch.Generator().manual_seed(seed + 2)
        lora = theirs.base_model.model.layer
        with torch.no_grad():
            for mine, their in ((ours.down, lora.lora_A["default"]), (ours.up, lora.lora_B["default"])):
                mine.weight.copy_(torch.randn(mine.weight.shape, generator=gen) * 0.3)
                their.weight.copy_(mine.weight)
    return theirs, ours


@pytest.mark.parametrize("case", LAYERS)
def test_fresh_lora_layers_start_like_peft(case):
    """From the same random state, down is peft's lora_A bit for bit (kaiming-uniform, a = sqrt 5), up zeros,
    so a fresh layer computes its base layer."""
    theirs, ours = peft_and_ours(case, trained=False)
    lora = theirs.base_model.model.layer
    assert torch.equal(ours.down.weight, lora.lora_A["default"].weight)
    assert torch.equal(ours.up.weight, lora.lora_B["default"].weight) and not ours.up.weight.any()
    x = torch.randn(LAYERS[case][1])
    assert torch.equal(ours.eval()(x), ours.base(x))


@pytest.mark.parametrize("case", LAYERS)
def test_lora_layers_forward_and_gradients_like_peft(case):
    theirs, ours = peft_and_ours(case)
    lora = theirs.base_model.model.layer
    shape = LAYERS[case][1]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(6)  # the same dropout mask in both
    mine = ours(x_ours)
    torch.manual_seed(6)
    their = theirs(x_theirs)
    assert rel_err(mine.detach(), their.detach()) < 1e-6
    grad_out = torch.randn(mine.shape, generator=torch.Generator().manual_seed(7))
    mine.backward(grad_out)
    their.backward(grad_out)
    for name, a, b in (("down", ours.down.weight.grad, lora.lora_A["default"].weight.grad),
                       ("up", ours.up.weight.grad, lora.lora_B["default"].weight.grad),
                       ("input", x_ours.grad, x_theirs.grad)):
        assert rel_err(a, b) < 1e-6, name
    assert all(p.grad is None and not p.requires_grad for p in ours.base.parameters())  # the base is frozen
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == ["down.weight", "up.weight"]


@pytest.mark.parametrize("case", LAYERS)
def test_merging_a_lora_layer_like_peft_merge_and_unload(case):
    theirs, ours = peft_and_ours(case)
    x = torch.randn(LAYERS[case][1], generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        unmerged = ours.eval()(x)
    merged_theirs = theirs.merge_and_unload().layer
    merged_ours = unwrap_lora(Holder(ours)).layer
    assert type(merged_ours) is type(merged_theirs)
    assert rel_err(merged_ours.weight, merged_theirs.weight) < 1e-6
    assert merged_ours.bias is None or torch.equal(merged_ours.bias, merged_theirs.bias)
    with torch.no_grad():
        assert rel_err(merged_ours(x), unmerged) < 1e-6


# What the round trip trains: attention and feed-forward, proj_in/out, 3x3 and 1x1 res-block convs and the
# time embedding of the UNet, the text encoder's attention and MLP.
TRAINED = {"unet": r"(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)|proj_(in|out)|in_layers\.2|out_layers\.3|"
                   r"skip_connection|emb_layers\.1)$",
           "clip": r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"}


def test_trained_lora_saves_as_a_file_read_lora_merges_back(tmp_path):
    """Wrap the tiny model's layers, 'train' them (random up), save in kohya's layout: read_lora and the merger
    give the outputs of the wrapped model, and the weights `unwrap_lora` merges, bit for bit."""
    sd = StableDiffusion.from_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.safetensors"))
    models = sd.models
    before = {net: {k: v.clone() for k, v in getattr(models, net).state_dict().items()} for net in TRAINED}
    torch.manual_seed(0)
    layers = {net: wrap_lora(getattr(models, net), pattern, rank, alpha)
              for (net, pattern), rank, alpha in zip(TRAINED.items(), (4, 2), (8.0, 1.0))}
    assert {net: {type(m).__name__ for m in found.values()} for net, found in layers.items()} == {
        "unet": {"LoRALinear", "LoRAConv"}, "clip": {"LoRALinear"}}
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for found in layers.values():
            for layer in found.values():
                layer.up.weight.copy_(torch.randn(layer.up.weight.shape, generator=gen) * 0.05)
    latents, ids = torch.randn(1, 4, 8, 8, generator=gen), torch.randint(0, 49408, (1, 77), generator=gen)

    def outputs():
        with torch.no_grad():
            context = models.clip(ids)  # (1, 77, C)
            return context, models.unet(latents, 500.0, context)  # (1, 4, 8, 8)

    wrapped = outputs()
    save_file(lora_state_dict(models), tmp_path / "trained.safetensors")
    merged_by_layers = {net: unwrap_lora(copy.deepcopy(getattr(models, net))).state_dict() for net in TRAINED}
    for net in TRAINED:  # the file is read into the model without its LoRA layers
        unwrap_lora(getattr(models, net), merge=False)
        assert all(torch.equal(before[net][k], v) for k, v in getattr(models, net).state_dict().items())
    lora = sd.load_lora(tmp_path / "trained.safetensors")
    assert not lora.unmatched and len(lora.layers) == sum(map(len, layers.values()))
    for mine, theirs in zip(outputs(), wrapped):
        assert rel_err(mine, theirs) < 1e-5
    for net in TRAINED:  # the file's merge and unwrap_lora's: the same sum, the same weights
        assert all(torch.equal(merged_by_layers[net][k], v) for k, v in getattr(models, net).state_dict().items())


def test_wrap_lora_refuses_a_pattern_that_matches_nothing():
    message = "no Linear or Conv2d layer of the Holder has a path matching 'nope'"
    with pytest.raises(InputError, match=re.escape(message)):
        wrap_lora(Holder(torch.nn.Linear(2, 3)), "nope", 2, 2.0)


# ---- the layouts diffusers and peft write today, against peft's merge (tiny reference models) ---------

def tiny_references():
    """diffusers' UNet and transformers' CLIP text model at the tiny sizes (`tests.tiny`), seeded."""
    from tests.reference import randomize_
    from tests.tiny import TINY_CLIP, TINY_UNET
    transformers = oracle("transformers")
    unet = oracle("diffusers").UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        cross_attention_dim=TINY_UNET.context_dim, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=TINY_CLIP.width, intermediate_size=4 * TINY_CLIP.width,
        num_hidden_layers=TINY_CLIP.layers, num_attention_heads=TINY_CLIP.heads, max_position_embeddings=77,
        hidden_act="quick_gelu"))
    return randomize_(unet, seed=41), randomize_(clip, seed=42)


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "time_emb_proj", "conv_shortcut", "conv"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(scope="module")
def peft_written(tmp_path_factory):
    """A LoRA (random, both halves non-zero) put on the tiny references by peft and written by diffusers as
    its own file and as kohya's (`convert_state_dict_to_kohya`: `lora_te1_`); the checkpoint of the references
    without it, and the CompVis weights of the references with peft's merge."""
    from tests.compvis import save_checkpoint, training_buffers
    from tests.reference import to_compvis
    from tests.tiny import TINY_CLIP, TINY_UNET, VAE_PREFIX, tiny_compvis_state
    peft, diffusers = oracle("peft"), oracle("diffusers")
    folder = tmp_path_factory.mktemp("peft")
    unet, clip = tiny_references()
    nets = {"unet": (unet, TINY_UNET), "clip": (clip, TINY_CLIP)}
    base = {k: v.clone() for net, (ref, cfg) in nets.items() for k, v in to_compvis(net, ref, cfg).items()}
    vae = {k: v for k, v in tiny_compvis_state().items() if k.startswith(VAE_PREFIX)}
    checkpoint = save_checkpoint({**base, **vae, **training_buffers()}, folder / "tiny.safetensors")
    torch.manual_seed(43)
    for ref, targets in ((unet, UNET_TARGETS), (clip, CLIP_TARGETS)):
        ref.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    layers = {f"{prefix}.{k}": v for prefix, ref in (("unet", unet), ("text_encoder", clip))
              for k, v in peft.utils.get_peft_model_state_dict(ref).items()}
    assert any(k.startswith("text_encoder.encoder.layers.") for k in layers)  # transformers 5's names
    diffusers.StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers={
        k[len("unet."):]: v for k, v in layers.items() if k.startswith("unet.")}, text_encoder_lora_layers={
        k[len("text_encoder."):]: v for k, v in layers.items() if k.startswith("text_encoder.")})
    kohya = diffusers.utils.convert_state_dict_to_kohya(layers)
    assert any(k.startswith("lora_te1_encoder_layers_") for k in kohya)
    save_file(kohya, folder / "kohya.safetensors")
    merged = {}
    with torch.no_grad():
        for net, (ref, cfg) in nets.items():
            for module in ref.modules():
                if isinstance(module, peft.tuners.lora.LoraLayer):
                    module.merge()
            merged.update(to_compvis(net, unwrapped(ref), cfg))
    assert sum(not torch.equal(merged[k], base[k]) for k in base) == len(kohya) // 3  # each layer changed
    return {"checkpoint": checkpoint, "diffusers": folder / "pytorch_lora_weights.safetensors",
            "kohya": folder / "kohya.safetensors", "merged": merged, "layers": len(kohya) // 3}


def unwrapped(ref):
    """A copy of a peft-adapted (and merged) model with its base layers back in place of the LoRA layers."""
    peft = oracle("peft")
    ref = copy.deepcopy(ref)
    for path, module in list(ref.named_modules()):
        if isinstance(module, peft.tuners.lora.LoraLayer):
            parent, _, name = path.rpartition(".")
            setattr(ref.get_submodule(parent), name, module.get_base_layer())
    return ref


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_the_layouts_diffusers_writes_merge_as_peft_does(peft_written, layout):
    """Files of transformers 5's text-encoder names (`text_encoder.encoder.layers...`) and of
    `convert_state_dict_to_kohya` (`lora_te1_`) are read whole and merge to peft's weights."""
    ours = StableDiffusion.from_checkpoint(peft_written["checkpoint"])
    lora = ours.load_lora(peft_written[layout])
    assert not lora.unmatched and len(lora.layers) == peft_written["layers"]
    assert any(n.startswith(("text_encoder.encoder.", "lora_te1_")) for n in lora.layers)
    for net, prefix in (("unet", UNET_PREFIX), ("clip", CLIP_PREFIX)):
        for key, value in getattr(ours.models, net).state_dict().items():
            assert rel_err(value, peft_written["merged"][prefix + key]) < 1e-6, key
