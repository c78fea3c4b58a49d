"""The pipeline's API on a tiny checkpoint: guidance batching, outputs, inputs and argument checks."""


import numpy as np
import pytest
import torch
from PIL import Image

from sd.conditioning import Conditioning
from sd.errors import InputError, SettingError
from sd.guidance import ClassifierFreeGuidance
from sd.pipeline import StableDiffusion, settle
from sd.samplers import NoiseSchedule, make_sampler
from sd.token_merging import TokenMerging
from tests.conftest import rel_err
from tests.tiny import write_tiny_checkpoint

SMALL = dict(steps=2, width=64, height=48, progress=False)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return StableDiffusion.from_checkpoint(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "t.safetensors"))


@pytest.fixture(scope="module")
def sd_inpainting(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "i.safetensors", in_channels=9)
    return StableDiffusion.from_checkpoint(path)


def unet_batches(sd, monkeypatch) -> list[int]:
    """Record the batch size of every UNet call."""
    calls, forward = [], sd.models.unet.forward
    monkeypatch.setattr(sd.models.unet, "forward", lambda x, t, c, **kw: calls.append(x.shape[0]) or forward(x, t, c, **kw))
    return calls


@pytest.mark.parametrize("guidance, expected", [(1.0, 1), (7.5, 2)])
def test_guidance_is_one_batched_call_and_skipped_at_scale_one(sd, monkeypatch, guidance, expected):
    calls = unet_batches(sd, monkeypatch)
    sd.text_to_image("a cat", guidance_scale=guidance, sampler="euler", seed=0, **SMALL)
    assert calls == [expected, expected]


def test_guidance_batches_every_field_unconditional_first():
    cond = Conditioning(torch.ones(2, 3, 4), vector=torch.ones(2, 5), concat=torch.ones(2, 5, 2, 2))
    uncond = cond.map(torch.zeros_like)
    guidance = ClassifierFreeGuidance(3.0)
    both = guidance.conditioning(cond, uncond)
    for field in (both.context, both.vector, both.concat):
        assert field.shape[0] == 4 and not field[:2].any() and field[2:].all()
    x = torch.randn(2, 4, 2, 2)
    assert torch.equal(guidance.inputs(x), torch.cat([x, x]))
    assert torch.equal(guidance.combine(torch.cat([torch.zeros(2, 4), torch.ones(2, 4)])), torch.full((2, 4), 3.0))
    off = ClassifierFreeGuidance(1.0)
    assert not off.guided and off.conditioning(cond, None) is cond and off.inputs(x) is x and off.combine(x) is x


def test_the_inpainting_unet_gets_mask_and_masked_image_as_conditioning(sd_inpainting, monkeypatch):
    """The 9-channel UNet is called with the 4-channel sample and the 5 extra channels in `Conditioning.concat`,
    batched with the unconditional half like the text."""
    calls, forward = [], sd_inpainting.models.unet.forward
    monkeypatch.setattr(sd_inpainting.models.unet, "forward", lambda x, t, c, **kw: calls.append(
        (x.shape, c.context.shape[0], c.concat.shape)) or forward(x, t, c, **kw))
    sd_inpainting.inpaint("a cat", Image.new("RGB", (64, 48)), Image.new("L", (64, 48), 255), seed=0, **SMALL)
    assert calls == [((2, 4, 6, 8), 2, (2, 5, 6, 8))] * 2


def test_the_prediction_type_of_the_model_decides_how_the_unet_output_is_read(sd, monkeypatch):
    """A model that predicts the eps (or the v) of fixed clean latents at every step lands on them when the
    pipeline reads its output as that prediction type, and not when it reads it as the other."""
    x0 = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    alphas_cumprod = NoiseSchedule().alphas_cumprod

    def unet(kind):
        def forward(x, t, cond, **kw):
            alpha, s = alphas_cumprod[int(t)] ** 0.5, (1 - alphas_cumprod[int(t)]) ** 0.5
            eps = (x - alpha * x0) / s
            return eps if kind == "epsilon" else alpha * eps - s * x0
        return forward

    for predicts in ("epsilon", "v_prediction"):
        monkeypatch.setattr(sd.models.unet, "forward", unet(predicts))
        for read_as in ("epsilon", "v_prediction"):
            monkeypatch.setattr(sd.models, "prediction_type", read_as)
            latents = sd.text_to_image("a cat", sampler="dpmpp_2m", guidance_scale=1, seed=0, output_type="latent",
                                       **SMALL)
            assert (rel_err(latents, x0) < 1e-4) == (predicts == read_as), (predicts, read_as)


def test_output_types_and_batch(sd):
    images = sd.text_to_image("a cat", seed=1, num_images=2, **SMALL)
    assert len(images) == 2 and all(im.size == (64, 48) and im.mode == "RGB" for im in images)
    array = sd.text_to_image("a cat", seed=1, num_images=2, output_type="np", **SMALL)
    assert array.shape == (2, 48, 64, 3) and array.dtype == np.float32
    np.testing.assert_array_equal((array * 255).round().astype(np.uint8), np.stack([np.asarray(i) for i in images]))
    latents = sd.text_to_image("a cat", seed=1, output_type="latent", **SMALL)
    assert latents.shape == (1, 4, 6, 8)


def test_seed_decides_the_image(sd):
    a, b, c = (sd.text_to_image("a cat", seed=s, output_type="latent", **SMALL) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_image_inputs_from_path_and_any_mode(sd, tmp_path):
    rgba = Image.new("RGBA", (64, 48), (200, 30, 30, 128))
    rgba.save(tmp_path / "init.png")
    from_path = sd.image_to_image("a cat", tmp_path / "init.png", seed=2, output_type="np", **SMALL)
    from_image = sd.image_to_image("a cat", rgba, seed=2, output_type="np", **SMALL)
    np.testing.assert_array_equal(from_path, from_image)
    palette = Image.new("P", (64, 48))
    mask = Image.new("L", (64, 48), 255)
    assert sd.inpaint("a cat", palette, mask, seed=2, output_type="np", **SMALL).shape == (1, 48, 64, 3)


def test_strength_zero_keeps_the_image_latents(sd):
    image = Image.new("RGB", (64, 48), (10, 120, 200))
    out = sd.image_to_image("a cat", image, strength=0.0, seed=2, output_type="latent", **SMALL)
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]  # (1, 3, 48, 64)
    assert torch.equal(out, sd.encode_image(pixels, torch.Generator().manual_seed(2)))


def test_inpainting_checkpoint_needs_a_mask(sd_inpainting):
    image = Image.new("RGB", (64, 48))
    with pytest.raises(InputError, match="mask"):
        sd_inpainting.image_to_image("a cat", image, **SMALL)
    out = sd_inpainting.inpaint("a cat", image, Image.new("L", (64, 48), 255), output_type="latent", **SMALL)
    assert out.shape == (1, 4, 6, 8)


@pytest.mark.parametrize("options, message", [
    (dict(width=60), "width must be a positive multiple of 8"),
    (dict(height=0), "height must be a positive multiple of 8"),
    (dict(steps=0), "steps must be a whole number between 1 and 1000, got 0"),
    (dict(steps=1001), "steps must be a whole number between 1 and 1000, got 1001"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(num_images=0), "num_images"),
    (dict(seed=-1), "seed must be between 0 and 2"),
    (dict(strength=0.5), "strength 0.5 needs image"),
    (dict(negative_prompt=["a", "b"]), "got 2 values of negative_prompt for 1 prompts"),
    (dict(sampler="nope"), "unknown sampler 'nope'; choose one of: ddpm"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(image=Image.new("RGB", (64, 48)), strength=1.5), "strength must be between 0 and 1"),
    (dict(mask=Image.new("L", (64, 48))), "mask needs image: the image to inpaint"),
    (dict(image="/nonexistent/init.png"), "init image not found"),
])
def test_bad_arguments_raise_input_error(sd, options, message):
    with pytest.raises(InputError, match=message):
        sd.generate("a cat", **{**SMALL, **options})


@pytest.mark.parametrize("arguments, message", [
    (dict(prompt=[]), "prompt must be a text or a non-empty list of texts, got []"),
    (dict(prompt=None), "prompt must be a text or a non-empty list of texts, got None"),
    (dict(negative_prompt=[1]), "negative_prompt must be a text or a non-empty list of texts"),
    (dict(negative_prompt="caf\udce9"), "negative_prompt holds characters that are not valid Unicode"),
    (dict(sampler=None), "sampler must be a sampler's name or a Sampler, got None"),
    (dict(guidance_scale="7"), "guidance_scale must be between -100 and 100, got '7'"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be between -100 and 100, got nan"),
    (dict(image=np.zeros((64, 64, 3), np.uint8)), "image must be a PIL image or the path of an image file, got a "
                                                  "ndarray"),
    (dict(image=Image.new("RGB", (8, 8)), strength="0.5"), "strength must be between 0 and 1, got '0.5'"),
    (dict(seed=2**64), "seed must be between 0 and 2**64-1"),
    (dict(seed=1.5), "seed must be between 0 and 2**64-1, got 1.5"),
])
def test_bad_values_of_any_type_are_setting_errors(arguments, message):
    arguments = {"prompt": "a cat", **arguments}
    with pytest.raises(SettingError) as error:
        settle(arguments.pop("prompt"), **arguments)
    assert str(error.value) == message or str(error.value).startswith(message), str(error.value)


def test_an_image_that_cannot_be_converted_is_an_input_error(monkeypatch):
    image = Image.new("RGB", (8, 8))
    monkeypatch.setattr(Image.Image, "convert", lambda self, mode: (_ for _ in ()).throw(ValueError("unsupported")))
    with pytest.raises(InputError, match=r"cannot convert init image \(RGB, 8x8\) to RGB: unsupported; save it as"):
        settle("a cat", image=image)


def test_settings_are_checked_without_weights():
    """`settle` is what the command line runs before loading: defaults filled, the same errors as generate."""
    s = settle("a cat", image=Image.new("RGB", (70, 50)), image_size=64)
    assert (s.width, s.height, s.strength, s.steps) == (64, 48, 0.75, 25)  # the image's size, rounded down
    assert settle("a cat", image_size=64).width == 64 and settle("a cat").width == 512
    assert settle("a", image=Image.new("RGB", (64, 64)), mask=Image.new("L", (64, 64))).strength == 1.0
    with pytest.raises(SettingError) as error:
        settle("a cat", num_images=0)
    assert str(error.value) == "num_images must be a whole number between 1 and 10000, got 0"
    assert str(error.value.for_flags()) == "--num-images must be a whole number between 1 and 10000, got 0"


def test_callback_sees_every_step(sd):
    seen = []
    latents = sd.text_to_image("a cat", sampler="ddim", seed=3, output_type="latent",
                               callback=lambda i, t, x, x0: seen.append((i, int(t), x.clone(), x0.clone())), **SMALL)
    ddim = make_sampler("ddim")
    ddim.set_timesteps(SMALL["steps"])
    assert [(i, t) for i, t, _, _ in seen] == list(enumerate(ddim.timesteps.tolist()))
    assert torch.equal(seen[-1][2], latents)
    # DDIM's last step goes to a_bar_0 (not to 1), so its result is close to, not equal to, the predicted x0
    assert not torch.equal(seen[0][3], seen[1][3]) and torch.allclose(seen[-1][3], latents, atol=0.1)


@pytest.mark.parametrize("network", ["decode", "encode"])
def test_fp16_vae_overflow_falls_back_to_fp32_for_that_call_only(sd, monkeypatch, network):
    """SDXL's VAE overflows in float16: a decode (or an encode, of image-to-image) that does runs again in float32,
    giving the float32 result, and the VAE stays float16."""
    def call():
        return np.asarray(sd.decode(torch.ones(1, 4, 6, 8), "np") if network == "decode" else
                          sd.encode_image(torch.zeros(1, 3, 48, 64), torch.Generator().manual_seed(0)))

    expected = call()
    vae = sd.models.vae.half()
    try:
        run = getattr(vae, network)

        def overflowing(x):
            out = run(x)
            if x.dtype != torch.float16:
                return out
            return tuple(o * torch.inf for o in out) if isinstance(out, tuple) else out * torch.inf

        monkeypatch.setattr(vae, network, overflowing)
        out = call()
        assert np.isfinite(out).all() and vae.dtype == torch.float16 and np.allclose(out, expected, atol=2e-3)
    finally:
        vae.float()


# ---- every public method's arguments, checked before any work ------------------------------------------

META, SPARSE = torch.zeros(1, 4, 6, 8, device="meta"), torch.zeros(1, 4, 6, 8).to_sparse()
NOT_BOOLS = [1, 0, "yes", None, 1.0]
# (method, argument, the other arguments it needs): bad values of that argument
# (method, argument): bad values of that argument
BAD_API_ARGUMENTS = {
    ("generate", "callback"): [123, "print", object()],
    ("generate", "progress"): NOT_BOOLS,
    ("generate", "tiled_decode"): NOT_BOOLS,
    ("generate", "latents"): [META, SPARSE, torch.zeros(1, 4, 6, 8, dtype=torch.complex64), torch.zeros(4, 0, 8),
                                  torch.full((1, 4, 6, 8), 3e38), torch.full((1, 4, 6, 8), -1e5),
                                  torch.zeros(1, 4, 6, 8, dtype=torch.int64), torch.full((1, 4, 6, 8), float("nan"))],
    ("generate", "image_latents"): [META, SPARSE, torch.zeros(1, 4, 6, 8, dtype=torch.complex64)],
    ("generate", "token_merging"): [TokenMerging(0.5, max_downsample=0), TokenMerging(0.5, stride=(0, 2)),
                                        TokenMerging(0.5, stride=(2,)), TokenMerging(float("nan")), TokenMerging(2.0)],
    ("generate", "guidance_scale"): [1e30, -1e30, float("inf")],
    ("hires_fix", "hires_scale"): [1e308, float("inf"), 1.0, 9],
    ("hires_fix", "tiled_decode"): NOT_BOOLS,
    ("hires_fix", "sampler"): [123, None],
    ("invert", "progress"): NOT_BOOLS,
    ("configure_attention", "query_slice"): [0, -1, 1.5, "8", True],
    ("configure_attention", "fused"): NOT_BOOLS,
    ("load_lora", "path"): [123, None, b"x.safetensors", ""],
    ("load_embedding", "path"): [123, None, ""],
    ("load_lora", "weight"): [1e30, -101, float("nan"), "1"],
    ("add_embedding", "embedding"): [123, None, "x.pt"],
    ("load_embedding", "token"): [123, b"x", ""],
}
NEEDS = {("invert", "progress"): {"image": Image.new("RGB", (64, 48))}, ("load_embedding", "token"): {"path": "x.pt"},
         ("load_lora", "weight"): {"path": "x.safetensors"}}
API_CASES = [(method, name, value) for (method, name), values in BAD_API_ARGUMENTS.items() for value in values]


@pytest.mark.parametrize("method, name, value", API_CASES, ids=[f"{m}-{n}-{i}" for i, (m, n, _) in enumerate(API_CASES)])
def test_every_bad_argument_is_refused_before_any_work(sd, monkeypatch, method, name, value):
    calls, before = [], {key: value.clone() for key, value in sd.models.unet.state_dict().items()}
    monkeypatch.setattr(sd.models.unet, "forward", lambda *args, **kwargs: calls.append(1))
    options = {**SMALL, "prompt": "a cat"} if method in ("generate", "hires_fix") else {}
    if method == "invert":
        options = {"progress": False, "steps": 2}
    with pytest.raises(SettingError, match=name):
        getattr(sd, method)(**{**options, **NEEDS.get((method, name), {}), name: value})
    assert calls == [] and all(torch.equal(v, before[k]) for k, v in sd.models.unet.state_dict().items())
    assert all(layer.query_slice is None for layer in sd.models.unet.modules() if hasattr(layer, "query_slice"))


@pytest.mark.parametrize("device", ["gpu", 123, "cuda:7", ["cpu"], "cpu:x"])
def test_from_checkpoint_refuses_a_device_this_machine_lacks_before_reading(tmp_path, device):
    with pytest.raises(InputError, match="device .* is unknown or not available"):
        StableDiffusion.from_checkpoint(tmp_path / "not-read.safetensors", device=device)


@pytest.mark.parametrize("name, value", [("path", 123), ("dtype", "fp16"), ("dtype", torch.int8), ("use_ema", "no")])
def test_from_checkpoint_checks_its_arguments(tmp_path, name, value):
    arguments = {"path": write_tiny_checkpoint(tmp_path / "tiny.safetensors"), name: value}
    with pytest.raises(SettingError, match=name):
        StableDiffusion.from_checkpoint(**arguments)
