"""Running our pipeline and diffusers' pipelines on the same inputs, and comparing them step by step."""

import numpy as np
import torch

import run_demo
from sd.files import DATA_DIR
from sd.pipeline import StableDiffusion
from sd.tokenizer import BOS_ID, EOS_ID
from tests.conftest import rel_err
from tests.reference import oracle, reference_scheduler
from tests.tiny import write_tiny_checkpoint


def reference_tokenizer(**options):
    """transformers' CLIPTokenizer of our vocabulary; SD 2.x's pads with "!" (id 0): `pad_token="!"`."""
    return oracle("transformers").CLIPTokenizer(vocab=str(DATA_DIR / "vocab.json"), merges=str(DATA_DIR / "merges.txt"),
                                                model_max_length=77, **options)


def reference_context(clip, runs: list[tuple[str, float]], chunks: int = 0, clip_skip: int = 1,
                      pad_id: int = EOS_ID) -> torch.Tensor:
    """AUTOMATIC1111's encoding written out over transformers' CLIP, for prompts without commas: each run
    tokenized by transformers' tokenizer, the tokens cut every 75, each chunk encoded as [BOS] + 75 +
    [EOS] padded with `pad_id` (SD v1: EOS; SD 2.x: 0), its output (that of the `clip_skip`-th last layer, then
    the final LayerNorm) weighted and brought back to its mean; padded to `chunks` chunks with the empty
    prompt's."""
    tok = reference_tokenizer()
    ids, weights = [], []
    for text, weight in runs:
        run_ids = tok(text, add_special_tokens=False)["input_ids"]
        ids += run_ids
        weights += [weight] * len(run_ids)
    outputs = []
    for start in range(0, max(75 * chunks, len(ids), 1), 75):
        chunk_ids, chunk_weights = ids[start:start + 75], weights[start:start + 75]
        pad = 75 - len(chunk_ids)
        out = clip(torch.tensor([[BOS_ID, *chunk_ids, EOS_ID] + [pad_id] * pad]), output_hidden_states=True)
        z = out.last_hidden_state if clip_skip == 1 else clip.final_layer_norm(out.hidden_states[-clip_skip])
        mean = z.mean()
        z = z * torch.tensor([1.0, *chunk_weights, 1.0] + [1.0] * pad)[None, :, None]
        outputs.append(z * (mean / z.mean()))
    return torch.cat(outputs, dim=1)


def reference_pipeline(cls, refs, unet, sampler: str, text_encoder=None, tokenizer=None,
                       prediction_type: str = "epsilon"):
    """A diffusers pipeline of the reference models (text_encoder: another CLIP in place of refs.clip), its
    scheduler configured for `prediction_type`."""
    scheduler, _ = reference_scheduler(sampler, {})
    scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)
    pipe = cls(vae=refs.vae, text_encoder=text_encoder or refs.clip, tokenizer=tokenizer or reference_tokenizer(),
               unet=unet,
               scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(pipe, seed: int, **inputs):
    """diffusers' pipeline; returns (the latents after every step, images in [0, 1])."""
    steps = []

    def keep_latents(pipe, i, t, tensors):
        steps.append(tensors["latents"])
        return tensors

    images = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                  callback_on_step_end=keep_latents, **inputs).images
    return steps, images


def run_ours(sd: StableDiffusion, method: str, seed: int, **inputs):
    """Our pipeline; returns (the latents after every step, from its step callback, images in [0, 1])."""
    steps = []
    latents = getattr(sd, method)(seed=seed, output_type="latent", progress=False,
                                  callback=lambda i, t, x, x0: steps.append(x.clone()), **inputs)
    assert torch.equal(steps[-1], latents)
    return steps, sd.decode(latents, "np")


def assert_same(ours, theirs):
    """The same latents after every step, and the same images."""
    (steps, images), (ref_steps, ref_images) = ours, theirs
    assert len(steps) == len(ref_steps) and images.shape == ref_images.shape
    errors = [rel_err(a, b) for a, b in zip(steps, ref_steps)]
    assert max(errors) < 1e-3, f"worst step {errors.index(max(errors))} of {len(errors)}: {max(errors):.2e}"
    assert np.abs(images - ref_images).mean() < 1 / 255


def assert_flag_round_trip(tmp_path, capsys, flags: list[str], stored: dict, refused: list[tuple[list[str], str]]):
    """The command line with `flags` on a tiny model writes the PNG parameters `stored`, `--from-png` remakes
    the same file, and each of `refused` (flags, message) is one line `error: ...` with no file written."""
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    common = ["--checkpoint", str(checkpoint), "--no-progress", "--steps", "4", "--width", "64", "--height", "48"]
    first, again, bad = (tmp_path / name for name in ("first.png", "again.png", "bad.png"))
    assert run_demo.main([*common, "--prompt", "a cat", *flags, "--seed", "1", "--output", str(first)]) == 0
    assert run_demo.main([*common, "--from-png", str(first), "--output", str(again)]) == 0
    assert again.read_bytes() == first.read_bytes()
    parameters = run_demo.read_parameters(first)
    assert {key: parameters[key] for key in stored} == stored
    capsys.readouterr()
    for extra, message in refused:
        assert run_demo.main([*common, "--prompt", "a cat", *extra, "--output", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
        assert not bad.exists()
