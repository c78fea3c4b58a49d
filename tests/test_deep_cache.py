"""DeepCache (`sd.unet.DeepCache`, `deep_cache=` of the pipeline) against the `deepcache` package's
DeepCacheSDHelper on diffusers' pipeline, same interval, branch, seed and settings: the same latents
after every step. And on a tiny model: interval 1 is the full computation, a shallow call really skips
the deep blocks (so the cached runs differ from full ones), and bad values are one line."""

import pytest
import torch

pytest.importorskip("DeepCache")
pytest.importorskip("diffusers")
from DeepCache import DeepCacheSDHelper  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

from sd.errors import SettingError
from sd.pipeline import StableDiffusion
from sd.unet import DeepCache
from tests.pipelines import assert_flag_round_trip, assert_same, reference_pipeline, run_ours, run_reference
from tests.tiny import write_tiny_checkpoint

SETTINGS = dict(prompt="a red bicycle leaning on a stone wall, golden hour", negative_prompt="blurry", width=96,
                height=64, guidance_scale=7.5)


@pytest.mark.parametrize("interval, branch", [(3, 0), (2, 4)])
def test_deep_cache_against_the_deepcache_package(refs, loaded, interval, branch):
    ours_sd = StableDiffusion(loaded("safetensors"))
    pipe = reference_pipeline(StableDiffusionPipeline, refs, refs.unet, "dpmpp_2m_karras")
    deep = {"ours": [], "theirs": []}  # calls of the deepest blocks: full steps only
    hooks = [ours_sd.models.unet.middle_block.register_forward_hook(lambda *_: deep["ours"].append(1)),
             refs.unet.mid_block.resnets[0].register_forward_hook(lambda *_: deep["theirs"].append(1))]
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        ours = run_ours(ours_sd, "text_to_image", 4, steps=6, sampler="dpmpp_2m_karras", deep_cache=interval,
                        deep_cache_branch=branch, **SETTINGS)
        theirs = run_reference(pipe, 4, num_inference_steps=6, **SETTINGS)
    finally:
        helper.disable()
        for hook in hooks:
            hook.remove()
    assert deep["ours"] == deep["theirs"] == [1] * len(range(0, 6, interval))
    assert_same(ours, theirs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return StableDiffusion.from_checkpoint(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.safetensors"))


def test_interval_one_is_the_full_computation(tiny):
    options = dict(steps=5, seed=2, width=64, height=48, output_type="latent", progress=False)
    assert torch.equal(tiny.text_to_image("a cat", deep_cache=1, **options), tiny.text_to_image("a cat", **options))


def test_a_shallow_call_skips_the_deep_blocks(tiny):
    unet, calls = tiny.models.unet, []
    handle = unet.middle_block.register_forward_hook(lambda *_: calls.append(1))
    try:
        tiny.text_to_image("a cat", steps=6, seed=2, width=64, height=48, deep_cache=3, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 2  # steps 0 and 3 of 6
    cache = DeepCache(branch=len(unet.input_blocks))  # past the last skip: nothing would be shallow
    with pytest.raises(SettingError, match="deep_cache_branch must be below"):
        tiny.text_to_image("a cat", steps=2, deep_cache=2, deep_cache_branch=cache.branch, progress=False)
    for value in (0, -1, 1.5):
        with pytest.raises(SettingError, match="deep_cache must be a whole number of steps, at least 1"):
            tiny.text_to_image("a cat", steps=2, deep_cache=value, progress=False)


def test_the_command_line_stores_deep_cache_and_remakes_the_image(tmp_path, capsys):
    assert_flag_round_trip(tmp_path, capsys, ["--deep-cache", "2"], {"deep_cache": 2, "deep_cache_branch": 0}, [
        (["--deep-cache", "0"], "--deep-cache must be a whole number of steps, at least 1"),
        (["--deep-cache", "2", "--deep-cache-branch", "99"], "--deep-cache-branch must be below")])
