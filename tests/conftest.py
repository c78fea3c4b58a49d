"""Session-wide fixtures: the full-size reference models and their CompVis checkpoint files, built once;
and the test tiers (markers in pyproject.toml): a test that uses one of the full-size fixtures is marked
`full_size` here, so `python -m pytest -m "not full_size and not slow"` is the quick loop. Tests that
reach a test-only reference where it is not installed are skipped, saying so (`tests.reference.oracle`)."""

import functools
from types import SimpleNamespace

import pytest
import torch

from tests import compvis, reference
from sd.checkpoint import load_checkpoint, save_checkpoint

torch.set_num_threads(max(1, torch.get_num_threads()))


FULL_SIZE_FIXTURES = {"ref_unet", "ref_vae", "ref_clip", "refs", "ref_inpaint_unet", "compvis_state", "checkpoint", "loaded", "text_context"}


SLOW_FIXTURES = {"trained"}  # tests/test_train.py: a few hundred training steps of both stages


def pytest_collection_modifyitems(config, items):
    for item in items:
        if FULL_SIZE_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.full_size)
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def micro_init(tmp_path_factory):
    """A checkpoint of sd.train's "micro" preset (new networks, seeded): what the training tests fine-tune."""
    from sd import train
    path = tmp_path_factory.mktemp("micro") / "init.safetensors"
    args = train.parse_args(["all", "--preset", "micro", "--run-dir", "unused", "--output", "unused.safetensors"])
    save_checkpoint(train.initial_models(args, train.PRESETS["micro"]), path)
    return path


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max(1, max |ref|): random weights give outputs of very different scales."""
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1.0))


@pytest.fixture(scope="session")
def ref_unet():
    """diffusers' UNet at the SD v1.5 sizes with seeded random weights (one fixture per network, so a test
    builds only the references it reads)."""
    return reference.randomize_(reference.sd15_unet(), seed=1)


@pytest.fixture(scope="session")
def ref_vae():
    return reference.randomize_(reference.sd15_vae(), seed=2)


@pytest.fixture(scope="session")
def ref_clip():
    return reference.randomize_(reference.sd15_clip(), seed=3)


@pytest.fixture(scope="session")
def refs(ref_unet, ref_vae, ref_clip):
    """The three reference networks of an SD v1.5 checkpoint."""
    return SimpleNamespace(unet=ref_unet, vae=ref_vae, clip=ref_clip)


@pytest.fixture(scope="session")
def ref_inpaint_unet():
    return reference.randomize_(reference.sd15_unet(in_channels=9), seed=4)


@pytest.fixture(scope="session")
def compvis_state(refs):
    """The reference weights in the CompVis layout, with the training buffers real files carry."""
    state = compvis.training_buffers()
    for net in ("unet", "vae", "clip"):
        state.update(reference.to_compvis(net, getattr(refs, net)))
    return state


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, compvis_state, ref_inpaint_unet):
    """checkpoint(variant) -> path of a CompVis checkpoint file of the reference weights, written once.

    safetensors / ckpt: fp32, the .ckpt nested under "state_dict" beside a non-tensor entry;
    fp16: the same weights stored as fp16 (exact: the reference weights are fp16-representable);
    ema: a full checkpoint whose UNet weights are decoys and whose EMA copies hold the reference;
    inpainting: the 9-channel inpainting UNet in place of the ordinary one."""
    folder = tmp_path_factory.mktemp("checkpoints")

    @functools.cache
    def write(variant: str):
        state = dict(compvis_state)
        if variant == "fp16":
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        if variant == "ema":
            state = compvis.with_ema_decoys(state)
        if variant == "inpainting":
            state = {k: v for k, v in state.items() if not k.startswith(compvis.UNET_PREFIX)}
            state.update(reference.to_compvis("unet", ref_inpaint_unet))
        suffix = ".ckpt" if variant in ("ckpt", "ema") else ".safetensors"
        return compvis.save_checkpoint(state, folder / (variant + suffix))

    return write


@pytest.fixture(scope="session")
def loaded(checkpoint):
    """loaded(variant, **load_options) -> our models from that file. One variant is kept at a time:
    each full-size model takes 4 GB."""
    cache = {}

    def load(variant: str, **options):
        key = (variant, tuple(sorted(options.items())))
        if key not in cache:
            cache.clear()
            cache[key] = load_checkpoint(checkpoint(variant), **options)
        return cache[key]

    return load


@pytest.fixture(scope="session")
def prompts_ids():
    from sd.tokenizer import CLIPTokenizer
    return CLIPTokenizer()(["a photograph of an astronaut riding a horse, 4k", "watercolor fox in the snow"])


@pytest.fixture(scope="session")
def text_context(refs, prompts_ids):
    """A real text context for the UNet: the reference CLIP's hidden states of two prompts, (2, 77, 768)."""
    with torch.no_grad():
        return refs.clip(prompts_ids).last_hidden_state
