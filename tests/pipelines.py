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


def reference_chunks(runs: list[tuple[str, float] | None], chunks: int = 0, pad_id: int = EOS_ID):
    """AUTOMATIC1111's chunks written out over transformers' tokenizer, for prompts without commas: each run
    (text, weight) tokenized on its own, the tokens cut every 75 and where a run is None (BREAK), each chunk
    [BOS] + 75 + [EOS] padded with `pad_id` (SD v1: EOS; SD 2.x: 0), at least `chunks` of them (the empty
    prompt's after the text). Yields (ids (1, 77), weights (1, 77))."""
    tok = reference_tokenizer()
    pieces: list[tuple[list[int], list[float]]] = [([], [])]
    for run in runs:
        if run is None:
            pieces.append(([], []))
            continue
        text, weight = run
        for token in tok(text, add_special_tokens=False)["input_ids"]:
            if len(pieces[-1][0]) == 75:
                pieces.append(([], []))
            pieces[-1][0].append(token)
            pieces[-1][1].append(weight)
    pieces += [([], [])] * (chunks - len(pieces))
    for ids, weights in pieces:
        pad = 75 - len(ids)
        yield (torch.tensor([[BOS_ID, *ids, EOS_ID] + [pad_id] * pad]),
               torch.tensor([[1.0, *weights, 1.0] + [1.0] * pad]))


def emphasized(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's "Original" emphasis: one chunk's output (1, 77, C) weighted (1, 77) and brought back to
    its mean."""
    mean = z.mean()
    z = z * weights[..., None]
    return z * (mean / z.mean())


def reference_context(clip, runs: list[tuple[str, float] | None], chunks: int = 0, clip_skip: int = 1,
                      pad_id: int = EOS_ID) -> torch.Tensor:
    """AUTOMATIC1111's encoding written out over transformers' CLIP (`reference_chunks`): each chunk's output
    (that of the `clip_skip`-th last layer, then the final LayerNorm) emphasized, the chunks concatenated."""
    outputs = []
    for ids, weights in reference_chunks(runs, chunks, pad_id):
        out = clip(ids, output_hidden_states=True)
        z = out.last_hidden_state if clip_skip == 1 else clip.final_layer_norm(out.hidden_states[-clip_skip])
        outputs.append(emphasized(z, weights))
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


def run_reference(pipe, seed: int | torch.Generator, output_type: str = "np", **inputs):
    """diffusers' pipeline, its generator seeded with `seed` (or `seed` itself: one generator that goes on from
    an earlier call); returns (the latents after every step, images in [0, 1], or the final latents)."""
    steps = []

    def keep_latents(pipe, i, t, tensors):
        steps.append(tensors["latents"])
        return tensors

    generator = seed if isinstance(seed, torch.Generator) else torch.Generator("cpu").manual_seed(seed)
    images = pipe(generator=generator, output_type=output_type, callback_on_step_end=keep_latents, **inputs).images
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
