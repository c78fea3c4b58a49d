"""Token merging (`sd.token_merging`, `token_merging=` of the pipeline, `--tome`) against the `tomesd`
package: its bipartite matching on the same tokens merges the same tokens into the same places, and
tomesd's patch of diffusers' pipeline gives the same latents after every step as ours, same ratio,
seed and settings (random destinations off, as ours). On a tiny model: the highest-resolution
self-attention really runs on fewer tokens, ratio 0 is the full computation, bad values are one line."""

import pytest
import torch
from PIL import Image

tomesd = pytest.importorskip("tomesd")
pytest.importorskip("diffusers")
from diffusers import StableDiffusionPipeline  # noqa: E402
from tomesd.merge import bipartite_soft_matching_random2d  # noqa: E402

from sd.attention import plain_attention
from sd.errors import SettingError
from sd.pipeline import StableDiffusion
from sd.token_merging import TokenMerging, bipartite_soft_matching
from tests.pipelines import assert_flag_round_trip, assert_same, reference_pipeline, run_ours, run_reference
from tests.tiny import write_tiny_checkpoint


@pytest.mark.parametrize("h, w, r", [(8, 8, 32), (13, 9, 40), (7, 5, 100), (6, 6, 1)])
def test_the_matching_is_tomesds(h, w, r):
    """The same tokens merge into the same destinations: anything done to each merged token comes back
    to the same positions. (The order of the merged sequence differs: tomesd orders its destinations and
    sources by an unstable sort; we keep raster order. Self-attention does not depend on that order.)"""
    torch.manual_seed(h * w + r)
    metric, x = torch.randn(2, h * w, 16), torch.randn(2, h * w, 16)
    merge, unmerge = bipartite_soft_matching_random2d(metric, w, h, 2, 2, r, no_rand=True)
    ours = bipartite_soft_matching(metric, h, w, (2, 2), r)
    merged, theirs_merged = ours.merge(x), merge(x)
    assert merged.shape == theirs_merged.shape == (2, h * w - min(r, h * w - (h // 2) * (w // 2)), 16)
    assert torch.equal(ours.unmerge(merged * 3 - 1), unmerge(theirs_merged * 3 - 1))
    attention = ours.unmerge(plain_attention(merged, merged, merged))  # (2, h*w, 16)
    assert torch.allclose(attention, unmerge(plain_attention(theirs_merged, theirs_merged, theirs_merged)), atol=1e-6)
    assert not torch.equal(attention, plain_attention(x, x, x))


def test_a_merged_token_is_the_mean_of_what_went_into_it():
    x = torch.tensor([[1.0, 1.1, 5.0, 5.2]])[..., None]  # one row of four tokens, (1, 4, 1)
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])  # 1 is like 0, 3 like 2
    merge = bipartite_soft_matching(metric, 1, 4, (1, 2), 2)  # destinations 0 and 2
    assert merge.dst.tolist() == [0, 2]
    assert sorted(merge.merge(x).flatten().tolist()) == pytest.approx([1.05, 5.1])
    assert merge.unmerge(merge.merge(x)).flatten().tolist() == pytest.approx([1.05, 1.05, 5.1, 5.1])


SETTINGS = dict(prompt="a red bicycle leaning on a stone wall, golden hour", negative_prompt="blurry",
                guidance_scale=7.5)
STEPS = 3  # the fewest that run every branch of DPM++ 2M: first order, second order, the lower order final step


@pytest.mark.parametrize("ratio, max_downsample, width, height", [(0.5, 1, 96, 64), (0.3, 2, 104, 72)])
def test_token_merging_against_tomesd(refs, loaded, ratio, max_downsample, width, height):
    ours_sd = StableDiffusion(loaded("safetensors"))
    pipe = reference_pipeline(StableDiffusionPipeline, refs, refs.unet, "dpmpp_2m_karras")
    tomesd.apply_patch(pipe, ratio=ratio, max_downsample=max_downsample, use_rand=False)
    try:
        ours = run_ours(ours_sd, "text_to_image", 4, steps=STEPS, sampler="dpmpp_2m_karras", width=width, height=height,
                        token_merging=TokenMerging(ratio, max_downsample), **SETTINGS)
        theirs = run_reference(pipe, 4, num_inference_steps=STEPS, width=width, height=height, **SETTINGS)
    finally:
        tomesd.remove_patch(pipe)
    assert_same(ours, theirs)
    full, _ = run_ours(ours_sd, "text_to_image", 4, steps=STEPS, sampler="dpmpp_2m_karras", width=width, height=height,
                       **SETTINGS)
    assert not torch.allclose(full[-1], ours[0][-1], atol=1e-3)  # merging changed the image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return StableDiffusion.from_checkpoint(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.safetensors"))


def test_only_the_highest_resolution_self_attention_merges(tiny):
    unet, tokens = tiny.models.unet, {}

    def count(name):
        return lambda module, args: tokens.setdefault(name, []).append(args[0].shape[1])

    watched = {"top self": unet.input_blocks[1][1].transformer_blocks[0].attn1,
               "top cross": unet.input_blocks[1][1].transformer_blocks[0].attn2,
               "middle self": unet.middle_block[1].transformer_blocks[0].attn1,
               "middle cross": unet.middle_block[1].transformer_blocks[0].attn2}
    handles = [layer.register_forward_pre_hook(count(name)) for name, layer in watched.items()]
    try:
        tiny.text_to_image("a cat", steps=1, seed=2, width=64, height=48, token_merging=0.5, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    n = 8 * 6  # latent tokens at the top level
    assert tokens["top self"] == [n - n // 2] and tokens["top cross"] == [n]
    assert tokens["middle self"] == tokens["middle cross"] and len(tokens["middle self"]) == 1


def test_ratio_zero_is_the_full_computation_and_bad_ratios_are_refused(tiny):
    options = dict(steps=3, seed=2, width=64, height=48, output_type="latent", progress=False)
    full = tiny.text_to_image("a cat", **options)
    assert torch.equal(tiny.text_to_image("a cat", token_merging=0.0, **options), full)
    assert not torch.equal(tiny.text_to_image("a cat", token_merging=0.5, **options), full)
    for value in (-0.1, 0.8, 1.5, float("nan"), "half", True):
        with pytest.raises(SettingError, match="token_merging must be a share of the tokens between 0 and 0.75"):
            tiny.text_to_image("a cat", steps=2, token_merging=value, progress=False)


def test_the_command_line_stores_the_ratio_and_remakes_the_image(tmp_path, capsys):
    message = "--tome must be a share of the tokens between 0 and 0.75"
    assert_flag_round_trip(tmp_path, capsys, ["--tome", "0.5"], {"token_merging": 0.5},
                           [(["--tome", value], message) for value in ("1.5", "-1", "0.9")])


SIDES = range(1, 9)  # latent sides of images 8 to 64 pixels


@pytest.mark.parametrize("h", SIDES)
@pytest.mark.parametrize("w", SIDES)
def test_any_grid_merges_what_it_can_and_gives_every_token_back(h, w):
    """A grid with a side below the stride has no destination: nothing merges; others merge up to their sources."""
    torch.manual_seed(h * 10 + w)
    x = torch.randn(2, h * w, 4)
    merge = TokenMerging(0.75).matching(x, h, w)
    merged = merge.merge(x)
    assert merged.shape[1] == h * w - (min(int(h * w * 0.75), h * w - (h // 2) * (w // 2)) if h > 1 and w > 1 else 0)
    assert merge.unmerge(merged).shape == x.shape
    if merged.shape[1] == h * w:
        assert torch.equal(merge.unmerge(merged), x)


@pytest.mark.parametrize("width, height", [(8, 8), (8, 64), (64, 8), (8, 4096), (24, 8), (16, 16)])
def test_token_merging_at_tiny_sizes_makes_the_image(tiny, width, height):
    latents = tiny.text_to_image("a cat", steps=1, seed=2, width=width, height=height, token_merging=0.5,
                                 output_type="latent", progress=False)
    assert latents.shape == (1, 4, height // 8, width // 8) and torch.isfinite(latents).all()


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl-refiner"])
def test_the_finest_transformers_merge_in_every_family(tmp_path, monkeypatch, family):
    """max_downsample 1 means the UNet's highest-resolution transformers: SD 1.x's at the latents' size, SDXL's
    at half of it (it has no attention at its first level; counted from the latents, nothing would merge)."""
    from sd.unet import SpatialTransformer
    sd = StableDiffusion.from_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.safetensors", family=family))
    unet = sd.models.unet
    finest = min(unet.config.attention_levels)
    merged = []
    forward = SpatialTransformer.forward

    def noting(self, x, context, token_merging=None):
        if token_merging is not None and self.downsample <= token_merging.max_downsample:
            merged.append(x.shape[-1])
        return forward(self, x, context, token_merging)

    monkeypatch.setattr(SpatialTransformer, "forward", noting)
    start = dict(image=Image.new("RGB", (64, 64)), strength=1.0) if family == "sdxl-refiner" else {}
    sd.generate("a cat", width=64, height=64, steps=1, progress=False, output_type="latent", token_merging=0.5,
                **start)
    transformers_at_finest = sum(isinstance(layer, SpatialTransformer) and layer.downsample == 1
                                 for block in [*unet.input_blocks, *unet.output_blocks] for layer in block)
    assert merged == [8 // 2 ** finest] * transformers_at_finest and transformers_at_finest > 0
