"""Text-to-image, image-to-image and inpainting with Stable Diffusion 1.x, 2.x and SDXL (Rombach et al., 2022;
Podell et al., 2023).

Latent diffusion: the prompt is encoded by CLIP, a sampler denoises random latents (B, 4, H/8, W/8)
with the UNet, steered by classifier-free guidance (Ho & Salimans, 2022; `sd.guidance`), and the VAE
decodes the result. Image-to-image starts from the noised latents of an image (SDEdit, Meng et al., 2021);
inpainting keeps the unmasked region, either by blending it back after every step (any checkpoint)
or by giving the 9-channel inpainting UNet the mask and the masked image as extra input
(`Conditioning.concat`). SDXL's UNet also takes a vector: the pooled text and the micro-conditions
(`sd.micro_conditioning`); its refiner may take over the last steps of a run on the latents (`refiner=`,
diffusers' denoising_end / denoising_start hand-off). The UNet's prediction becomes noise in
`sd.parameterization`; the arguments are checked, before any weights are needed, in `sd.settings`.
Random numbers come from a CPU generator seeded with `seed`, drawn in the order diffusers draws
them (image latents, initial noise, masked-image latents, per-step noise), so a seed gives the
same image on every device and the same image as diffusers.
"""

import copy
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from sd.attention import configure_attention
from sd.checkpoint import StableDiffusionModels, load_checkpoint
from sd.conditioning import Conditioning
from sd.devices import check_memory, pick_device
from sd.embeddings import Embedding, check_name, check_vectors, check_width, read_embedding
from sd.guidance import ClassifierFreeGuidance
from sd.lora import LoRA, LoRAMerger, read_lora
from sd.errors import GenerationError, SettingError
from sd.micro_conditioning import embed
from sd.parameterization import to_epsilon
from sd.prompt import PromptParser, TextEncoder, check_clip_skip, encode, words
from sd.samplers import DEFAULT_SAMPLER, Sampler, make_sampler
from sd.samplers.ddim import DDIMInverseSampler
# re-exported as the library's names: the defaults, `settle` and the checks it runs before loading
from sd.settings import (DEFAULT_GUIDANCE, DEFAULT_STEPS, LATENT_DTYPE, MAX_SEED, RANGES, REFINER_SWITCH,  # noqa: F401
                         UPSCALERS, VAE_FACTOR, ImageInput, Settings, check_argument, check_range,
                         check_deep_cache_branch, check_hires, check_invertible, check_path, check_refiner, check_task,
                         check_upscaled, is_finite_number, is_int, model_traits, settle)
from sd.tokenizer import CLIPTokenizer
from sd.unet import DeepCache, Speedups

StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]  # (i, t, latents, predicted x0)


@dataclass
class Inpainting:
    """What the denoising loop needs to keep the unmasked region: the mask at latent size (1 = repaint)."""

    mask: torch.Tensor  # (B, 1, h, w)
    masked_image_latents: torch.Tensor  # (B, 4, h, w), input of the 9-channel UNet
    image_latents: torch.Tensor | None  # (B, 4, h, w), blended back by the 4-channel UNet
    noise: torch.Tensor  # (B, 4, h, w), the noise the image latents are brought to each level with

    @property
    def concat(self) -> torch.Tensor:
        """The 9-channel UNet's extra input channels: the mask and the masked image's latents, (B, 5, h, w)."""
        return torch.cat([self.mask, self.masked_image_latents], dim=1)


@dataclass(frozen=True)
class Handoff:
    """A run stopped where a refiner takes over (`StableDiffusion.hand_off`): what `refine` continues from."""

    latents: torch.Tensor  # (B, 4, h, w): the base's, after its share of the steps
    generator: torch.Generator  # the run's, as the base left it
    settings: Settings
    switch: float | None  # the share of the run after which the refiner takes over (None: the base ran to the end)
    begin: int  # where in its timesteps the base's run began (image-to-image begins part-way)
    embeddings: dict[str, Embedding]  # the base's: the refiner reads the prompt with those it lacks too


def image_to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """PIL image -> (1, C, H, W) float32 in [0, 1], resized (Lanczos) to `size` = (width, height)."""
    if image.size != size:
        image = image.resize(size, Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W) or (H, W, C)
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)[None]  # (1, C, H, W)


def check_finite(x: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    if not torch.isfinite(x).all():
        cause = (f"most likely an overflow in {dtype}: run again in float32 (or bfloat16)"
                 if dtype != torch.float32 else "in float32, with weights and settings checked on the way in, a fault of this program: please report "
                 "it with the command that made it")
        raise GenerationError(f"the {what} contain NaN or inf values, {cause}")


def check_flags(**flags) -> None:
    """Arguments that are True or False."""
    for name, value in flags.items():
        check_argument(name, value, isinstance(value, bool), "True or False")


def check_callback(callback) -> None:
    check_argument("callback", callback, callback is None or callable(callback),
                   "None or a function (step, timestep, latents, predicted x0)")


def compiler_missing(device: torch.device) -> str | None:
    """Why `torch.compile` cannot run on `device`, found by compiling a one-line function; None if it can."""
    try:
        torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(4, device=device))
    except Exception as e:  # noqa: BLE001 - a missing compiler shows up as errors of many kinds
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}"
    return None


class StableDiffusion:
    """The three networks of a checkpoint, the tokenizer, the textual-inversion embeddings loaded, and the
    methods that make images with them."""

    def __init__(self, models: StableDiffusionModels, tokenizer: CLIPTokenizer | None = None):
        self.models = models
        self.tokenizer = tokenizer or CLIPTokenizer()
        self.embeddings: dict[str, Embedding] = {}
        self.prompt_parser = PromptParser(self.tokenizer, self.embeddings)
        self.text_encoders = [TextEncoder(spec, getattr(models, spec.name)) for spec in models.family.text_encoders]
        self.loras = LoRAMerger(models)
        self.device = next(models.unet.parameters()).device
        self.dtype = next(models.unet.parameters()).dtype

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        use_ema: bool = True, prediction: str | None = None) -> "StableDiffusion":
        """The model of an SD 1.x, 2.x or SDXL checkpoint file; `prediction` "v" or "epsilon" overrides what the file
        says its UNet predicts (`sd.prediction`; the rule that decided is `models.prediction_rule`)."""
        check_path("path", path)
        device = pick_device(device)
        check_argument("dtype", dtype, dtype in (torch.float32, torch.bfloat16, torch.float16),
                       "torch.float32, torch.bfloat16 or torch.float16")
        check_flags(use_ema=use_ema)
        return cls(load_checkpoint(path, device=device, dtype=dtype, use_ema=use_ema, prediction=prediction))

    def configure_attention(self, *, query_slice: int | None = None, fused: bool = True) -> None:
        """Attention of all three networks: sliced to `query_slice` query positions at a time (bounds the
        memory of attention kernels that hold the score matrix), and torch's fused kernel or the formula
        written out (`sd.attention.plain_attention`)."""
        check_argument("query_slice", query_slice, query_slice is None or is_int(query_slice) and query_slice >= 1,
                       "None or a whole number of query positions, at least 1")
        check_argument("fused", fused, isinstance(fused, bool), "True or False")
        for net in (*self.models.text_towers, self.models.unet, self.models.vae):
            configure_attention(net, query_slice=query_slice, fused=fused)

    def compile(self) -> bool:
        """Compile the UNet and the VAE decoder with `torch.compile` (TorchInductor), in place. Each compiles on
        its first call, and again for each new image size or speed-up setting (minutes on a CPU: the cost is
        in `benchmarks/RESULTS.md`); the images equal the eager ones within float rounding. Where torch cannot
        compile on this device (no C++ compiler, no Triton for the GPU), a warning says why, nothing changes,
        and the result is False."""
        reason = compiler_missing(self.device)
        if reason is not None:
            warnings.warn(f"torch.compile cannot run on {self.device} here ({reason}); the models stay uncompiled "
                          f"(to compile: a C++ compiler such as g++ for the CPU, Triton for CUDA)")
            return False
        self.models.unet.compile()
        self.models.vae.decoder.compile()
        return True

    def load_embedding(self, path: str | Path, token: str | None = None) -> Embedding:
        """Load a textual-inversion embedding (AUTOMATIC1111, kohya or diffusers file): prompts then use it
        by `token`, by default the token the file names, else the file's name. Returns it."""
        check_path("path", path)
        check_argument("token", token, token is None or isinstance(token, str) and token != "", "None or a text")
        return self.add_embedding(read_embedding(path, token))

    def load_lora(self, path: str | Path, weight: float = 1.0) -> LoRA:
        """Merge a LoRA file (kohya's or diffusers/PEFT's layout) into the weights, scaled by `weight`;
        several LoRAs add up. Layers of the file that this model lacks are named in a warning. A file that
        does not fit is refused before any weight changes. Returns the LoRA read."""
        check_path("path", path)
        check_argument("weight", weight, RANGES["lora_weight"].holds(weight), RANGES["lora_weight"].says())
        lora = read_lora(path, self.models)
        if lora.unmatched:
            warnings.warn(f"{len(lora.unmatched)} of the {len(lora.unmatched) + len(lora.layers)} layers of LoRA "
                          f"{path} are not layers of this model and were left out: "
                          f"{', '.join(lora.unmatched[:3])}{', ...' * (len(lora.unmatched) > 3)}", stacklevel=2)
        self.loras.merge(lora, weight)
        return lora

    def unload_lora(self) -> None:
        """Take every LoRA out again: the layers they changed get back their original values, bit for bit."""
        self.loras.unmerge()

    def add_embedding(self, embedding: Embedding) -> Embedding:
        """Use `embedding` (read by `sd.embeddings.read_embedding`, or made in code) in prompts by its name."""
        check_argument("embedding", embedding, isinstance(embedding, Embedding), "an sd.embeddings.Embedding")
        check_vectors(embedding.path, "vectors", embedding.vectors)
        check_width(embedding, {e.spec.embedding_key: e.network.config.width for e in self.text_encoders})
        check_name(embedding, self.tokenizer, self.embeddings)
        self.embeddings[embedding.name] = embedding
        return embedding

    @property
    def clip_skip_limit(self) -> int:
        """The largest clip skip every text encoder of the stack can take."""
        return min(encoder.skippable_layers for encoder in self.text_encoders)

    def unseen_words(self, text: str) -> list[str]:
        """The words of `text` that the model's training captions never had (none when that is not known),
        the names of loaded embeddings aside."""
        if self.models.vocabulary is None:
            return []
        named = {w for name in self.embeddings for w in words(name)}
        return [w for w in words(text) if w not in self.models.vocabulary and w not in named]

    # ---- the three tasks ---------------------------------------------------------------------------

    def text_to_image(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *,
                      width: int | None = None, height: int | None = None, **options):
        """Images from a prompt, by default at the model's own size (512 for SD v1). Options: see `generate`."""
        return self.generate(prompt, negative_prompt, width=width, height=height, **options)

    def image_to_image(self, prompt: str | list[str], image: ImageInput, negative_prompt: str | list[str] = "", *,
                       strength: float = 0.75, **options):
        """Redraw `image` after noising it `strength` of the way (0: unchanged, 1: from pure noise)."""
        return self.generate(prompt, negative_prompt, image=image, strength=strength, **options)

    def inpaint(self, prompt: str | list[str], image: ImageInput, mask: ImageInput,
                negative_prompt: str | list[str] = "", *, strength: float = 1.0, **options):
        """Repaint the white part of `mask` in `image`, keeping the black part."""
        return self.generate(prompt, negative_prompt, image=image, mask=mask, strength=strength, **options)

    def hires_fix(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *, hires_scale: float = 2.0,
                  hires_strength: float = 0.55, hires_steps: int | None = None, hires_upscaler: str = "latent",
                  output_type: str = "pil", tiled_decode: bool = False, **options):
        """AUTOMATIC1111's "hires fix": an image at the base size (width, height; default the model's),
        upscaled `hires_scale` times (to a multiple of 8; SDXL: 32), then redrawn `hires_strength` of the way at the
        new size, from fresh noise of the same seed, in `hires_steps` steps (default: `steps`). The
        upscaler: "latent" (bilinear in latent space, as AUTOMATIC1111's "Latent") or "lanczos" (decode,
        Lanczos, encode). Options: those of `generate` but image, mask and latents."""
        check_flags(tiled_decode=tiled_decode)
        if options.get("refiner") is not None:
            raise SettingError(lambda n: f"{n('refiner')} takes over a run of one size; the hires fix makes two: "
                                         f"give one of them")
        sampler = options.get("sampler", DEFAULT_SAMPLER)
        check_argument("sampler", sampler, isinstance(sampler, (str, Sampler)), "a sampler's name or a Sampler")
        check_hires(scale=hires_scale, strength=hires_strength, steps=hires_steps, upscaler=hires_upscaler,
                    max_steps=(make_sampler(sampler) if isinstance(sampler, str) else sampler).max_steps)
        if hires_upscaler == "lanczos" and (not isinstance(prompt, str) or options.get("num_images", 1) != 1):
            raise SettingError(lambda n: f"{n('hires_upscaler')} lanczos redraws one image at a time; make one image "
                                         f"per call, or use the latent upscaler")
        width, height = check_upscaled(*(options.get(side) or self.models.image_size for side in ("width", "height")),
                                       hires_scale, self.models.family.side_multiple)  # rounded down
        options.setdefault("seed", random.randrange(2**32))
        base = self.generate(prompt, negative_prompt, output_type="latent", **options)  # (B, 4, h, w)
        h, w = height // VAE_FACTOR, width // VAE_FACTOR
        second = {key: value for key, value in options.items() if key not in ("width", "height", "steps")}
        second.update(strength=hires_strength, output_type=output_type, tiled_decode=tiled_decode,
                      steps=options.get("steps", DEFAULT_STEPS) if hires_steps is None else hires_steps)
        if hires_upscaler == "latent":
            return self.generate(prompt, negative_prompt, image_latents=F.interpolate(base, size=(h, w), mode="bilinear"),
                                 **second)  # (B, 4, h', w') upscaled
        return self.generate(prompt, negative_prompt, image=self.decode(base)[0], width=w * VAE_FACTOR,
                             height=h * VAE_FACTOR, **second)

    @torch.inference_mode()
    def invert(self, image: ImageInput, prompt: str = "", steps: int = 50, *, negative_prompt: str = "",
               guidance_scale: float = 1.0, width: int | None = None, height: int | None = None, clip_skip: int = 1,
               progress: bool = True) -> torch.Tensor:
        """DDIM inversion: the latents (1, 4, H/8, W/8) from which DDIM sampling with the same prompt, steps
        and guidance comes back to `image` (nearly: each step uses the noise predicted at its far end;
        guidance 1 keeps closest). `text_to_image(prompt, latents=..., sampler="ddim", steps=steps,
        guidance_scale=1)` reconstructs the image; another prompt edits it. The image is encoded to its
        latent mean (no randomness); its sides must be multiples of 8 unless width and height are given."""
        if not isinstance(prompt, str):
            raise SettingError(lambda n: f"{n('prompt')} of an inversion must be one text, got {prompt!r:.60}")
        check_flags(progress=progress)
        s = settle(prompt, negative_prompt, image=image, steps=steps, guidance_scale=guidance_scale,
                   sampler=DDIMInverseSampler(self.models.schedule), width=width, height=height, clip_skip=clip_skip, **self.traits)
        if width is None and height is None:
            check_invertible(s.image)
        check_clip_skip(s.clip_skip, self.clip_skip_limit)
        pixels = image_to_tensor(s.image, (s.width, s.height)) * 2 - 1  # (1, 3, H, W)
        mean, _ = self.run_vae(self.models.vae.encode, pixels.to(self.device))
        latents = mean.float() * self.models.scale_factor  # (1, 4, h, w)
        guidance = ClassifierFreeGuidance(s.guidance_scale)
        s.sampler.set_timesteps(s.steps, self.device)
        return self.denoise(latents, self.conditioning(s, guidance, 1), sampler=s.sampler, guidance=guidance,
                            generator=None, progress=progress)

    # ---- the shared machinery ----------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *,
                 progress: bool = True, tiled_decode: bool = False, callback: StepCallback | None = None,
                 refiner: "StableDiffusion | None" = None, refiner_switch: float | None = None, **settings):
        """One denoising loop for all three tasks.

        prompt, negative_prompt: a text or a list of texts (one negative per prompt), in AUTOMATIC1111's
            syntax: (emphasis), [less], (text:1.3), BREAK, any length, embeddings by name (`sd.prompt`).
        image, mask: an init image (path or PIL image) for image-to-image; with a mask (white: repaint)
            for inpainting.
        strength: how much of the image is redrawn, 0 to 1 (default 0.75, with a mask 1.0).
        steps (25), guidance_scale (the family's: 7.5, SDXL 7.0; 1 or less: no classifier-free guidance), sampler (a name of
            `sd.samplers.SAMPLERS` or a `Sampler`, default dpmpp_2m_karras), seed (default: random).
        width, height: multiples of 8, of 32 for SDXL (default: the image's size rounded down, else the model's).
        num_images: images per prompt.
        latents: for text-to-image, the latents (1 or N, 4, H/8, W/8) to start from instead of noise drawn
            from the seed, e.g. those of `invert`.
        image_latents: for image-to-image, an image's scaled latents (1 or N, 4, H/8, W/8) instead of an
            image (as the second pass of `hires_fix`).
        output_type: "pil" (a list of images), "np" (an array (N, H, W, 3) in [0, 1]) or "latent" (the
            final scaled latents (N, 4, H/8, W/8)).
        clip_skip: 1 (the text encoder's output, default) or N: the hidden states of its N-th last layer (SDXL:
            of CLIP ViT-L only, and 1 and 2 both its penultimate: AUTOMATIC1111's "sdxl_clip_l_skip" but at 1).
        original_size (h, w), crop (top, left), target_size (h, w): SDXL's micro-conditions (default: the
            image's size, crop 0, 0); aesthetic_score (6.0) and negative_aesthetic_score (2.5): the refiner's.
        refiner: a loaded SDXL refiner that takes over after `refiner_switch` (0 to 1, default 0.8) of the run,
            on the latents: the base runs the timesteps at or above 1000 - 1000 * switch, the refiner the rest
            of the same schedule (diffusers' denoising_end / denoising_start; about the first 80% of the
            steps, AUTOMATIC1111's "Refiner switch at"). It encodes the prompts itself and decodes the image.
        deep_cache: DeepCache (`sd.unet.DeepCache`): a full UNet call every this many steps, between them
            only the shallow branch ending at skip connection `deep_cache_branch` (0: the outermost).
            Faster, and a slightly different image. Default: off.
        token_merging: merge this share of the image tokens (0 to 0.75) before the self-attention of the
            highest-resolution blocks (`sd.token_merging`, tomesd's defaults; or a `TokenMerging`).
            Faster, and a slightly different image. Default: off.
        progress: a progress bar; tiled_decode: decode in tiles, bounding the VAE's memory for large
            images; callback: called after every step with (step index, timestep, latents, predicted x0).
        Random numbers come from a CPU generator seeded with `seed`, drawn in diffusers' order.
        """
        check_callback(callback)
        check_flags(progress=progress, tiled_decode=tiled_decode)
        if refiner is not None:
            check_argument("refiner", refiner, isinstance(refiner, StableDiffusion), "a loaded StableDiffusion refiner")
            check_refiner(refiner.models.family)
        if refiner is None and refiner_switch is not None:
            raise SettingError(lambda n: f"{n('refiner_switch')} says when a refiner takes over; give "
                                         f"{n('refiner')}, or leave it out")
        switch = None if refiner is None else REFINER_SWITCH if refiner_switch is None else refiner_switch
        s = self.settled(prompt, negative_prompt, settings, switch)
        check_memory(s.width, s.height, self.device, self.vae_dtype, tiled_decode, s.batch)
        handoff = self.run(s, switch, progress, callback)
        if refiner is not None:
            return refiner.refine(handoff, progress=progress, callback=callback, tiled_decode=tiled_decode)
        return self.decode(handoff.latents, s.output_type, tiled_decode)

    @torch.inference_mode()
    def hand_off(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *,
                 refiner_switch: float = REFINER_SWITCH, progress: bool = True, callback: StepCallback | None = None,
                 **settings) -> Handoff:
        """The base's part of `generate(..., refiner=refiner, refiner_switch=...)`, for a caller that frees the
        base before it loads the refiner: `refiner.refine(base.hand_off(...))` makes the same images, bit for
        bit, with never both models in memory. The settings are `generate`'s (output_type: the refiner's)."""
        check_callback(callback)
        check_flags(progress=progress)
        return self.run(self.settled(prompt, negative_prompt, settings, refiner_switch), refiner_switch, progress,
                        callback)

    def settled(self, prompt, negative_prompt, settings: dict, switch: float | None) -> Settings:
        """`generate`'s settings, checked for this model (and, with `switch`, for a hand-off to a refiner)."""
        s = settle(prompt, negative_prompt, **self.traits, **settings)
        check_task(s, self.models.family, switch)
        check_clip_skip(s.clip_skip, self.clip_skip_limit)
        return s

    def run(self, s: Settings, switch: float | None, progress: bool, callback: StepCallback | None) -> Handoff:
        """The denoising of settled `s` up to the hand-off at `switch` (None: to the end): the latents
        (B, 4, h, w), the run's generator as it left it, and what a refiner needs to go on."""
        generator = torch.Generator("cpu").manual_seed(s.seed)
        guidance = ClassifierFreeGuidance(s.guidance_scale)
        cond = self.conditioning(s, guidance, s.num_images)
        s.sampler.set_timesteps(s.steps, self.device)
        if s.redraws:
            s.sampler.set_strength(s.strength)
        pixels = image_to_tensor(s.image, (s.width, s.height)) * 2 - 1 if s.image is not None else None  # (1, 3, H, W)
        latents, image_latents, noise = self.starting_latents(s, pixels, generator)
        inpainting = self.prepare_inpainting(s, pixels, image_latents, noise, generator) if s.mask is not None else None
        if inpainting is not None and self.models.is_inpainting:
            cond = replace(cond, concat=guidance.inputs(inpainting.concat.to(self.dtype)))  # (2B or B, 5, h, w)
        stop = None if switch is None else s.sampler.begin_index + s.sampler.steps_before(switch)
        latents = self.denoise(latents, cond, sampler=s.sampler, guidance=guidance, generator=generator,
                               inpainting=inpainting, progress=progress, callback=callback,
                               speedups=self.speedups(s), stop=stop)
        return Handoff(latents, generator, s, switch, s.sampler.begin_index, dict(self.embeddings))

    @torch.inference_mode()
    def refine(self, handoff: Handoff, *, progress: bool = True, callback: StepCallback | None = None,
               tiled_decode: bool = False):
        """The refiner's part of a run whose base stopped at the switch (`hand_off`, or `generate`'s `refiner`):
        the rest of the same schedule from the base's latents, with this model's own conditioning, the run's
        generator where the base left it (a copy: the handoff can be refined again), and this model's VAE to
        decode. Returns what `generate` returns."""
        check_argument("handoff", handoff, isinstance(handoff, Handoff), "the Handoff of an SDXL base's hand_off")
        check_callback(callback)
        check_flags(progress=progress, tiled_decode=tiled_decode)
        check_refiner(self.models.family)
        s = handoff.settings
        check_clip_skip(s.clip_skip, self.clip_skip_limit)
        if s.sampler.schedule != self.models.schedule:
            raise SettingError(lambda n: f"{n('refiner')} was trained with another noise schedule than the base "
                                         f"(zero terminal SNR in one of them only); give a refiner of the base's kind")
        check_memory(s.width, s.height, self.device, self.vae_dtype, tiled_decode, s.batch)
        generator = torch.Generator("cpu").set_state(handoff.generator.get_state())
        guidance = ClassifierFreeGuidance(s.guidance_scale)
        sampler = copy.deepcopy(s.sampler)  # the same kind and options, a state of its own
        sampler.set_timesteps(s.steps, self.device)
        # where the base stopped; an image-to-image base that began past the switch ran no step: from its start
        sampler.set_begin_index(max(len(sampler.timesteps) - sampler.steps_after(handoff.switch), handoff.begin))
        lacking = [e for name, e in handoff.embeddings.items() if name not in self.embeddings]
        for embedding in lacking:
            self.add_embedding(embedding)
        try:
            cond = self.conditioning(s, guidance, s.num_images)
        finally:
            for embedding in lacking:
                del self.embeddings[embedding.name]
        latents = self.denoise(handoff.latents.to(self.device), cond, sampler=sampler, guidance=guidance,
                               generator=generator, progress=progress, callback=callback, speedups=self.speedups(s))
        return self.decode(latents, s.output_type, tiled_decode)

    def speedups(self, s: Settings) -> Speedups:
        """DeepCache (a fresh state for this UNet) and token merging, as the settings ask."""
        deep_cache = None
        if s.deep_cache is not None:
            check_deep_cache_branch(s.deep_cache_branch, self.models.unet)
            deep_cache = DeepCache(s.deep_cache, s.deep_cache_branch)
        return Speedups(deep_cache=deep_cache, token_merging=s.token_merging)

    @property
    def traits(self) -> dict:
        """What `settle` needs of this model: its size, kind, side multiple, guidance default and noise schedule."""
        return model_traits(self.models.family, self.models.image_size, self.models.schedule)

    def starting_latents(self, s: Settings, pixels: torch.Tensor | None,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(latents to start from, the image's latents or None, the initial noise), each (B, 4, h, w):
        the given latents or noise for text-to-image and full-strength inpainting, else the image's latents noised to the
        sampler's first timestep (SDEdit)."""
        sampler = s.sampler
        if s.latents is not None:  # given: no noise is drawn, as diffusers' pipelines do with `latents=`
            return s.latents.to(self.device) * sampler.init_noise_sigma, None, s.latents.to(self.device)
        needs_image_latents = pixels is not None and (s.mask is None or not self.models.is_inpainting
                                                      or s.strength < 1.0)
        image_latents = (self.encode_image(pixels, generator).expand(s.batch, -1, -1, -1) if needs_image_latents
                         else s.image_latents.to(self.device) if s.image_latents is not None else None)  # (B, 4, h, w)
        noise = self.randn((s.batch, 4, s.height // VAE_FACTOR, s.width // VAE_FACTOR), generator)  # (B, 4, h, w)
        timesteps = sampler.timesteps[sampler.begin_index:]
        if image_latents is None or (s.mask is not None and s.strength == 1.0):
            return noise * sampler.init_noise_sigma, image_latents, noise
        if len(timesteps) == 0:  # strength 0: nothing to denoise
            return image_latents, image_latents, noise
        return sampler.add_noise(image_latents, noise, timesteps[:1].repeat(s.batch)), image_latents, noise

    def prepare_inpainting(self, s: Settings, pixels: torch.Tensor, image_latents: torch.Tensor | None,
                           noise: torch.Tensor, generator: torch.Generator) -> Inpainting:
        """The mask at latent size and what each kind of UNet needs to keep the unmasked region."""
        repaint = (image_to_tensor(s.mask, (s.width, s.height)) >= 0.5).to(pixels.dtype)  # (1, 1, H, W)
        masked_image_latents = self.encode_image(pixels * (1 - repaint), generator).expand(s.batch, -1, -1, -1)
        mask = F.interpolate(repaint, size=noise.shape[2:]).to(self.device).expand(s.batch, -1, -1, -1)
        return Inpainting(mask=mask, masked_image_latents=masked_image_latents,
                          image_latents=None if self.models.is_inpainting else image_latents, noise=noise)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, output_type: str = "pil", tiled: bool = False):
        """Scaled latents (B, 4, h, w) -> PIL images, or an array (B, 8h, 8w, 3) in [0, 1] ("np")."""
        check_finite(latents, "latents", self.dtype)
        if output_type == "latent":
            return latents
        vae = self.models.vae
        images = self.run_vae(vae.decode_tiled if tiled else vae.decode,
                              latents / self.models.scale_factor)  # (B, 3, H, W)
        check_finite(images, "decoded images", vae.dtype)
        images = (images / 2 + 0.5).clamp(0, 1)
        images = images.permute(0, 2, 3, 1).float().cpu().numpy()  # (B, H, W, 3)
        if output_type == "np":
            return images
        return [Image.fromarray(im) for im in (images * 255).round().astype(np.uint8)]

    @property
    def vae_dtype(self) -> torch.dtype:
        """What the VAE computes in: its own dtype, but float32 for a float16 VAE of a family whose VAE overflows
        in float16 (SDXL's: diffusers' `force_upcast`)."""
        dtype = self.models.vae.dtype
        return torch.float32 if dtype == torch.float16 and self.models.family.vae_upcast else dtype

    def run_vae(self, run: Callable, x: torch.Tensor):
        """`run(x)` (the VAE's encode or decode) in `vae_dtype`; where float16 overflows (on some latents), once
        more in float32. For float32 the weights are converted there and back (fp16 -> fp32 -> fp16 gives back
        the same weights)."""
        vae = self.models.vae
        if self.vae_dtype == vae.dtype:
            out = run(x.to(vae.dtype))
            if vae.dtype != torch.float16 or all(torch.isfinite(o).all() for o in (out if isinstance(out, tuple)
                                                                                    else (out,))):
                return out
        vae.float()
        try:
            return run(x.float())
        finally:
            vae.half()

    def conditioning(self, s: Settings, guidance: ClassifierFreeGuidance, num_images: int) -> Conditioning:
        """What the UNet is conditioned on, batched for `guidance` (the negative prompts' first): the prompts'
        hidden states (2B or B, 77·k, C) and, for SDXL, the vector of their pooled text and the
        micro-conditions (2B or B, D)."""
        context, pooled = self.encode_text(s.prompts, s.negatives if guidance.guided else None, num_images,
                                           s.clip_skip)
        names = self.models.family.micro_conditions
        sides = (True, False) if guidance.guided else (False,)  # negative?, in the batch's order
        bundles = []
        for negative, side_context, side_pooled in zip(sides, context.chunk(len(sides)),
                                                       pooled.chunk(len(sides)) if names else sides):
            vector = None
            if names:
                values = torch.tensor([s.micro_conditions.values(names, negative)], device=self.device)  # (1, k)
                vector = embed(side_pooled, values.expand(len(side_pooled), -1))  # (B, P + 256 k)
            bundles.append(Conditioning(side_context, vector=vector))  # context (B, 77·k, C)
        return guidance.conditioning(bundles[-1], bundles[0] if guidance.guided else None)

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts (`sd.parameterization`), as `sd.prediction` decided when loading."""
        return self.models.prediction_type

    def denoise(self, latents: torch.Tensor, cond: Conditioning, *, sampler: Sampler,
                guidance: ClassifierFreeGuidance, generator: torch.Generator | None,
                inpainting: Inpainting | None = None, progress: bool = True, callback: StepCallback | None = None,
                speedups: Speedups | None = None, stop: int | None = None) -> torch.Tensor:
        """The sampling loop from the sampler's begin index (to `stop`, where a refiner takes over): one
        (batched, when guided) UNet call per timestep, its prediction turned into noise, then a sampler step;
        with `inpainting` for a 4-channel UNet, the known region is blended back after each step.
        `speedups`: DeepCache (the calls between full ones are shallow) and token merging."""
        deep_cache = speedups.deep_cache if speedups is not None else None
        prediction_type = self.prediction_type
        timesteps = sampler.timesteps[sampler.begin_index:stop]
        for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="denoising", leave=False)):
            x = sampler.scale_model_input(latents, t)  # (B, 4, h, w): x_t
            if deep_cache is not None:
                deep_cache.reuse = i % deep_cache.interval != 0
            output = self.models.unet(guidance.inputs(x).to(self.dtype), t, cond, speedups=speedups)  # (2B or B, ...)
            eps = to_epsilon(prediction_type, guidance.combine(output.float()), x, *sampler.input_scales(t, x))
            x0 = sampler.predicted_original(eps, t, latents) if callback is not None else None
            latents = sampler.step(eps, t, latents, generator)
            if inpainting is not None and inpainting.image_latents is not None:
                known = inpainting.image_latents
                if i < len(timesteps) - 1:  # bring the known region to the noise level of the next step
                    known = sampler.add_noise(known, inpainting.noise, timesteps[i + 1: i + 2])
                latents = (1 - inpainting.mask) * known + inpainting.mask * latents
            if callback is not None:
                callback(i, t, latents, x0)
        return latents

    def encode_prompts(self, prompts: list[str], negatives: list[str] | None, num_images: int,
                       clip_skip: int = 1) -> torch.Tensor:
        """The text encoders' hidden states of the prompts (`encode_text`)."""
        return self.encode_text(prompts, negatives, num_images, clip_skip)[0]

    def encode_text(self, prompts: list[str], negatives: list[str] | None, num_images: int,
                    clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text encoders' hidden states of the prompts, each repeated num_images times: (B, 77·k, C),
        or with the negative prompts' first for classifier-free guidance: (2B, 77·k, C); k chunks of 77
        positions, as many as the longest text needs (`sd.prompt.encode`); and the pooled vectors (2B or B, P)
        where the stack yields one (SDXL), else None. Where the family says so (SDXL) and every negative
        prompt is empty, the negative side is zeros, context and pooled alike (AUTOMATIC1111's rule;
        diffusers zeroes only when no negative prompt is given at all)."""
        zeroed = negatives is not None and self.models.family.zero_empty_negative and all(n == "" for n in negatives)
        parsed = [self.prompt_parser.parse(text, "negative_prompt") for text in negatives or [] if not zeroed]
        parsed += [self.prompt_parser.parse(text) for text in prompts]
        context, pooled = encode(self.text_encoders, parsed, clip_skip)  # (N, 77·k, C), (N, P) or None
        if zeroed:
            context, pooled = (None if x is None else torch.cat([torch.zeros_like(x), x]) for x in (context, pooled))
        return tuple(None if x is None else x.repeat_interleave(num_images, dim=0) for x in (context, pooled))

    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Image in [-1, 1] (1, 3, H, W) -> a sample of its latent distribution, scaled: (1, 4, H/8, W/8)."""
        mean, logvar = (m.float() for m in self.run_vae(self.models.vae.encode, pixels.to(self.device)))
        return (mean + torch.exp(0.5 * logvar) * self.randn(mean.shape, generator)) * self.models.scale_factor

    def randn(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Standard normal noise from the CPU generator, moved to the model's device."""
        return torch.randn(shape, generator=generator, dtype=LATENT_DTYPE).to(self.device)
