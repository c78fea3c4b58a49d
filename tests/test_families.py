"""Model families (`sd.families`): every family is recognised from its keys and shapes and loads as its
family; the UNet's SD 2.x / SDXL configuration axes, read off the weights' shapes,
give diffusers' `UNet2DConditionModel` outputs at toy widths (diffusers' own `convert_ldm_unet_checkpoint`
says which CompVis key each of its weights has); the UNet's conditioning bundle and speed-ups."""

import json

import pytest
import torch

from sd.checkpoint import METADATA_KEY, detect_family, is_safetensors, load_checkpoint, read_metadata
from sd.conditioning import Conditioning
from sd.errors import CheckpointError, UnsupportedModelError
from sd.families import (FAMILIES, SD1, SD1_INPAINTING, SD2, SD2_INPAINTING, SDXL, SDXL_INPAINTING, SDXL_REFINER,
                         UNET_PREFIX)
from sd.unet import UNet, UNetConfig, Speedups
from tests.compvis import save_checkpoint
from tests.reference import oracle, randomize_
from tests.tiny import TINY, TINY_UNET, tiny_compvis_state

CASES = {"sd1": (lambda: tiny_compvis_state(), SD1),
         "sd1-inpainting": (lambda: tiny_compvis_state(in_channels=9), SD1_INPAINTING),
         "sd2": (lambda: tiny_compvis_state(family="sd2"), SD2),
         "sd2-inpainting": (lambda: tiny_compvis_state(family="sd2", in_channels=9), SD2_INPAINTING),
         "sdxl": (lambda: tiny_compvis_state(family="sdxl"), SDXL),
         "sdxl-inpainting": (lambda: tiny_compvis_state(family="sdxl-inpainting", in_channels=9), SDXL_INPAINTING),
         "sdxl-refiner": (lambda: tiny_compvis_state(family="sdxl-refiner"), SDXL_REFINER)}


def test_every_family_has_a_detection_case():
    assert CASES.keys() == FAMILIES.keys()


@pytest.mark.parametrize("name", list(CASES))
def test_each_family_is_recognised(tmp_path, name):
    make, family = CASES[name]
    path = save_checkpoint(make(), tmp_path / f"{name}.safetensors")
    assert detect_family(path, make()) is family
    models = load_checkpoint(path)
    assert models.family is family and models.kind == family.kind
    unet, towers = TINY[family.name.removesuffix("-inpainting")]
    assert models.unet.config == UNetConfig(**{**unet.__dict__, "in_channels": 9 if "inpainting" in name else 4})
    assert {spec.name: tower.config for spec, tower in zip(family.text_encoders, models.text_towers)} == towers


def test_sd2_in_sgm_layout_is_sd2(tmp_path):
    """The SD 2.x networks with the tower under sgm's prefix (no label_emb, so not the refiner) load as SD 2.x,
    to the same weights."""
    ldm = tiny_compvis_state(family="sd2")
    sgm = {k.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): v for k, v in ldm.items()}
    models = [load_checkpoint(save_checkpoint(state, tmp_path / f"{name}.safetensors"))
              for name, state in (("ldm", ldm), ("sgm", sgm))]
    assert [m.family for m in models] == [SD2, SD2]
    a, b = (m.clip.state_dict() for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_family_is_a_checkpoint_error(tmp_path):
    state = {"fc.weight": torch.zeros(10, 4)}
    with pytest.raises(CheckpointError) as info:
        detect_family(tmp_path / "resnet.safetensors", state)
    assert not isinstance(info.value, UnsupportedModelError)
    assert "as SD v1 it has no weights for the unet, vae, clip" in str(info.value)


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))
def test_records_are_consistent(family):
    assert family.prefixes["unet"] == (UNET_PREFIX,)
    assert {spec.name for spec in family.text_encoders} <= family.prefixes.keys()
    assert family.renames.keys() <= family.prefixes.keys() and family.prediction_type == "epsilon"


def test_other_families_keep_their_own_defaults():
    assert (SD1.scale_factor, SD1.image_size) == (0.18215, 512)
    assert (SDXL.scale_factor, SDXL.image_size) == (SDXL_REFINER.scale_factor, SDXL_REFINER.image_size) == (0.13025, 1024)
    assert [spec.name for spec in SDXL.text_encoders] == ["clip", "clip_g"] and SDXL.text_encoders[1].pooled
    assert SD2.text_encoders[0].pad_id == 0 and SD2.text_encoders[0].hidden_layer == -2


# ---------------------------------------------------------------------------------------------------
# The UNet's configuration axes against diffusers

TOY = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 128),
           cross_attention_dim=32, attention_head_dim=(1, 2, 2), use_linear_projection=True)
REFERENCES = {
    # SD 2.x-like: heads of 64 channels, Linear projections, a different transformer depth per level
    "sd2": (SD2, dict(TOY, transformer_layers_per_block=(1, 2, 3),
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
            UNetConfig(model_channels=64, channel_mult=(1, 2, 2), attention_levels=(0, 1), context_dim=32,
                       head_channels=64, linear_proj=True, transformer_depth=(1, 2, 0), transformer_depth_middle=3)),
    # SDXL-like: no attention at the top level, deeper below, a vector through label_emb
    "sdxl": (SDXL, dict(TOY, transformer_layers_per_block=(1, 1, 2), class_embed_type="projection",
                        projection_class_embeddings_input_dim=24,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
             UNetConfig(model_channels=64, channel_mult=(1, 2, 2), attention_levels=(1, 2), context_dim=32,
                        head_channels=64, linear_proj=True, transformer_depth=(0, 1, 2), adm_in_channels=24)),
}


def compvis_weights(ref: torch.nn.Module, cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """`ref`'s weights under our (CompVis) keys, found by passing index-tagged tensors through diffusers' converter."""
    oracle("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    with torch.device("meta"):
        ours = UNet(cfg).state_dict()
    keys = list(ours)
    tags = {UNET_PREFIX + k: torch.tensor(float(i)).expand(ours[k].shape) for i, k in enumerate(keys)}
    converted = convert_ldm_unet_checkpoint(tags, dict(ref.config))
    ref_state = ref.state_dict()
    assert converted.keys() == ref_state.keys()
    inverse = {dk: keys[int(t.reshape(-1)[0])] for dk, t in converted.items()}
    assert sorted(inverse.values()) == sorted(keys)
    return {ck: ref_state[dk].reshape(ours[ck].shape) for dk, ck in inverse.items()}


@pytest.mark.parametrize("name", list(REFERENCES))
@torch.no_grad()
def test_inferred_configurations_match_diffusers(name):
    family, options, expected = REFERENCES[name]
    ref = randomize_(oracle("diffusers").UNet2DConditionModel(**options), seed=3)
    weights = compvis_weights(ref, expected)
    cfg = family.configs["unet"](weights)
    assert cfg == expected
    unet = UNet(cfg).eval()
    unet.load_state_dict(weights)
    gen = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 32, generator=gen)
    t = torch.tensor([10, 700])
    vector = torch.randn(2, 24, generator=gen) if cfg.adm_in_channels else None
    expected_out = ref(latents, t, encoder_hidden_states=context, class_labels=vector).sample
    out = unet(latents, t, Conditioning(context, vector=vector))
    assert ((out - expected_out).norm() / expected_out.norm()).item() < 1e-5


@torch.no_grad()
def test_concat_and_bare_context_and_no_speedups_are_the_plain_call():
    gen = torch.Generator().manual_seed(0)
    unet = UNet(UNetConfig(**{**TINY_UNET.__dict__, "in_channels": 9})).eval()
    for p in unet.parameters():
        p.normal_(generator=gen).mul_(0.05)
    x, extra, context = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 8, 8), torch.randn(1, 7, 64)
    plain = unet(torch.cat([x, extra], dim=1), 500, context)
    assert torch.equal(unet(x, 500, Conditioning(context, concat=extra), speedups=Speedups()), plain)
    with pytest.raises(ValueError, match="takes no conditioning vector"):
        unet(torch.cat([x, extra], dim=1), 500, Conditioning(context, vector=torch.zeros(1, 8)))


@pytest.mark.parametrize("first_byte", [0x80, 0x00, 0x50, 0xF8])
def test_safetensors_is_told_by_its_header_whatever_its_length(tmp_path, first_byte):
    """A safetensors file starts with its header's length: one in 32 lengths starts with the byte a pickle
    starts with (0x80), which once made the file's metadata (size, vocabulary) be ignored."""
    from safetensors.torch import save_file
    path = tmp_path / "weights.bin"  # a name that does not tell
    for pad in range(256):
        save_file({"w": torch.zeros(1)}, path, metadata={METADATA_KEY: json.dumps({"image_size": 256}), "pad": "x" * pad})
        if path.read_bytes()[0] == first_byte:
            break
    assert path.read_bytes()[0] == first_byte and is_safetensors(path)
    assert read_metadata(path) == {"image_size": 256}


@pytest.mark.parametrize("variant", ["fp16.safetensors", "ema.ckpt", "fp16-ema.safetensors"])
def test_sd2_files_in_fp16_and_with_ema_load_the_same_weights(tmp_path, variant):
    """An SD 2.x file stored in fp16, or full with EMA copies (the UNet keys holding decoys), loads the weights of
    the plain fp32 file (the tiny weights are fp16-representable)."""
    state = tiny_compvis_state(family="sd2", ema="ema" in variant)
    if "fp16" in variant:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    plain = load_checkpoint(save_checkpoint(tiny_compvis_state(family="sd2"), tmp_path / "plain.safetensors"))
    models = load_checkpoint(save_checkpoint(state, tmp_path / variant))
    assert models.family is SD2
    for net in ("unet", "vae", "clip"):
        a, b = getattr(plain, net).state_dict(), getattr(models, net).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), net


@pytest.mark.parametrize("markers", [(), ("v_pred",), ("v_pred", "ztsnr")])
def test_sdxl_fine_tune_markers(tmp_path, markers):
    """ComfyUI's `v_pred` and `ztsnr` keys: v-prediction, and the zero-terminal-SNR schedule every sampler of a run
    then takes; our own files keep both through save and load."""
    from sd.checkpoint import ZERO_SNR_SCHEDULE, save_checkpoint as save_ours
    from sd.pipeline import StableDiffusion
    from sd.samplers import NoiseSchedule
    state = {**tiny_compvis_state(family="sdxl"), **{key: torch.tensor([]) for key in markers}}
    models = load_checkpoint(save_checkpoint(state, tmp_path / "fine-tune.safetensors"))
    expected = ("v_prediction" if "v_pred" in markers else "epsilon",
                ZERO_SNR_SCHEDULE if "ztsnr" in markers else NoiseSchedule())
    assert (models.prediction_type, models.schedule) == expected
    save_ours(models, tmp_path / "ours.safetensors")
    again = load_checkpoint(tmp_path / "ours.safetensors")
    assert (again.prediction_type, again.schedule) == expected
    used = []
    StableDiffusion(again).text_to_image("a cat", width=64, height=64, steps=2, progress=False, output_type="latent",
                                         sampler="ddim", callback=lambda i, t, x, x0: used.append(int(t)))
    assert used == expected[1].integer_timesteps(2).tolist()  # the model's schedule's (proven against diffusers'
    # trailing and leading timesteps in tests/test_samplers.py) reaches the sampler the run names
