"""Text-to-image, image-to-image and inpainting with Stable Diffusion v1 (Rombach et al., 2022).

Latent diffusion: the prompt is encoded by CLIP, a sampler denoises random latents (B, 4, H/8, W/8)
with the UNet, steered by classifier-free guidance (Ho & Salimans, 2022), and the VAE decodes the
result. Image-to-image starts from the noised latents of an image (SDEdit, Meng et al., 2021);
inpainting keeps the unmasked region, either by blending it back after every step (any checkpoint)
or by giving the 9-channel inpainting UNet the mask and the masked image as extra input.
Random numbers come from a CPU generator seeded with `seed`, drawn in the order diffusers draws
them (image latents, initial noise, masked-image latents, per-step noise), so a seed gives the
same image on every device and the same image as diffusers.
"""

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from sd.attention import configure_attention
from sd.checkpoint import SD_V1_SIZE, StableDiffusionModels, load_checkpoint
from sd.datasets import words
from sd.embeddings import Embedding, check_name, check_width, read_embedding
from sd.errors import GenerationError, InputError, SettingError
from sd.prompt import PromptParser, check_clip_skip, encode, parse_emphasis
from sd.samplers import DEFAULT_SAMPLER, Sampler, make_sampler
from sd.tokenizer import CLIPTokenizer

VAE_FACTOR = 8  # image pixels per latent pixel, each way
LATENT_DTYPE = torch.float32  # latents and sampler arithmetic stay fp32 whatever the networks run in
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
OUTPUT_TYPES = ("pil", "np", "latent")
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed accepts

ImageInput = Image.Image | str | Path
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]  # (i, t, latents, predicted x0)


@dataclass
class Inpainting:
    """What the denoising loop needs to keep the unmasked region: the mask at latent size (1 = repaint)."""

    mask: torch.Tensor  # (B, 1, h, w)
    masked_image_latents: torch.Tensor  # (B, 4, h, w), input of the 9-channel UNet
    image_latents: torch.Tensor | None  # (B, 4, h, w), blended back by the 4-channel UNet
    noise: torch.Tensor  # (B, 4, h, w), the noise the image latents are brought to each level with


def open_image(image: ImageInput, what: str, mode: str) -> Image.Image:
    """A PIL image in `mode` ("RGB" or "L") from an image or a path; errors name the file."""
    if not isinstance(image, Image.Image):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"{what} not found: {path}; check the path.")
        try:
            with Image.open(path) as opened:
                image = opened.copy()
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # a bomb: over PIL's pixel limit
            raise InputError(f"cannot read {what} {path}: {e}; give a PNG or JPEG file.") from None
    try:
        if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")  # composite transparency onto white rather than black
            image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
        return image.convert(mode)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot convert {what} ({image.mode}, {image.width}x{image.height}) to {mode}: {e}; "
                         f"save it as an RGB PNG or JPEG") from None


def image_to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """PIL image -> (1, C, H, W) float32 in [0, 1], resized (Lanczos) to `size` = (width, height)."""
    if image.size != size:
        image = image.resize(size, Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W) or (H, W, C)
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)[None]  # (1, C, H, W)


def check_finite(x: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    if not torch.isfinite(x).all():
        cause = (f"most likely an overflow in {dtype}: run again in float32 (or bfloat16)"
                 if dtype != torch.float32 else "in float32 that means damaged weights: download the checkpoint again")
        raise GenerationError(f"the {what} contain NaN or inf values, {cause}")


@dataclass
class Settings:
    """What one generation asks for, defaults filled in and checked (see `settle`)."""

    prompts: list[str]
    negatives: list[str]
    image: Image.Image | None
    mask: Image.Image | None
    strength: float
    steps: int
    guidance_scale: float
    sampler: Sampler
    seed: int
    width: int
    height: int
    num_images: int
    output_type: str
    clip_skip: int

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images


def whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def texts(name: str, value) -> list[str]:
    """A text or a non-empty list of texts, as a list."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not values or not all(isinstance(v, str) for v in values):
        raise SettingError(lambda n: f"{n(name)} must be a text or a non-empty list of texts, got {value!r:.60}")
    for text in values:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # e.g. bytes a shell passed on that are not UTF-8
            raise SettingError(lambda n: f"{n(name)} holds characters that are not valid Unicode "
                                         f"({text!r:.60}); give UTF-8 text") from None
    return list(values)


def settle(prompt: str | list[str], negative_prompt: str | list[str] = "", *, image: ImageInput | None = None,
           mask: ImageInput | None = None, strength: float | None = None, steps: int = DEFAULT_STEPS,
           guidance_scale: float = DEFAULT_GUIDANCE, sampler: str | Sampler = DEFAULT_SAMPLER,
           seed: int | None = None, width: int | None = None, height: int | None = None, num_images: int = 1,
           output_type: str = "pil", clip_skip: int = 1, image_size: int = SD_V1_SIZE,
           inpainting_model: bool = False) -> Settings:
    """The arguments of `StableDiffusion.generate`, checked, opened and completed with their defaults, without
    any weights: a command line settles its flags here before it loads a model. `image_size` is the model's
    own size and `inpainting_model` whether it is a 9-channel inpainting model. A bad value raises a
    `SettingError`, whose message can name the parameters as command-line flags."""
    prompts = texts("prompt", prompt)
    negatives = texts("negative_prompt", negative_prompt)
    negatives = negatives * len(prompts) if isinstance(negative_prompt, str) else negatives
    for name, text in [("prompt", p) for p in prompts] + [("negative_prompt", p) for p in negatives]:
        parse_emphasis(text, name)  # a malformed weight is refused before any work
    check_clip_skip(clip_skip)
    for name, value in (("image", image), ("mask", mask)):
        if value is not None and not isinstance(value, (Image.Image, str, Path)):
            raise SettingError(lambda n: f"{n(name)} must be a PIL image or the path of an image file, got a "
                                         f"{type(value).__name__}")
    if not isinstance(sampler, (str, Sampler)):
        raise SettingError(lambda n: f"{n('sampler')} must be a sampler's name or a Sampler, got {sampler!r}")
    if not finite(guidance_scale):
        raise SettingError(lambda n: f"{n('guidance_scale')} must be a finite number, got {guidance_scale!r}")
    if len(negatives) != len(prompts):
        raise SettingError(lambda n: f"got {len(negatives)} values of {n('negative_prompt')} for {len(prompts)} "
                                     f"prompts; give one each")
    if mask is not None and image is None:
        raise SettingError(lambda n: f"{n('mask')} needs {n('image')}: the image to inpaint")
    if strength is not None and image is None:
        raise SettingError(lambda n: f"{n('strength')} {strength} needs {n('image')}: it says how much of that "
                                     f"image is redrawn")
    if inpainting_model and mask is None:
        raise SettingError(lambda n: f"this is an inpainting checkpoint: give {n('image')} and {n('mask')}")
    strength = (0.75 if mask is None else 1.0) if strength is None else strength
    if not finite(strength) or not 0.0 <= strength <= 1.0:
        raise SettingError(lambda n: f"{n('strength')} must be between 0 and 1, got {strength!r}")
    sampler = make_sampler(sampler) if isinstance(sampler, str) else sampler
    max_steps = sampler.schedule.num_train_timesteps  # no run has more steps than training had timesteps
    if not whole(steps) or not 1 <= steps <= max_steps:
        raise SettingError(lambda n: f"{n('steps')} must be a whole number between 1 and {max_steps}, got {steps!r}")
    if not whole(num_images) or num_images < 1:
        raise SettingError(lambda n: f"{n('num_images')} must be at least 1, got {num_images!r}")
    seed = random.randrange(2**32) if seed is None else seed
    if not whole(seed) or not 0 <= seed <= MAX_SEED:
        raise SettingError(lambda n: f"{n('seed')} must be between 0 and 2**64-1, got {seed!r}")
    if output_type not in OUTPUT_TYPES:
        raise SettingError(lambda n: f"{n('output_type')} must be one of {', '.join(OUTPUT_TYPES)}, "
                                     f"got {output_type!r}")
    image = open_image(image, "init image", "RGB") if image is not None else None
    mask = open_image(mask, "mask", "L") if mask is not None else None
    size = {}
    for name, value in (("width", width), ("height", height)):  # default: the image's own, rounded down
        value = (getattr(image, name) // VAE_FACTOR * VAE_FACTOR if image else image_size) if value is None else value
        if not whole(value) or value < VAE_FACTOR or value % VAE_FACTOR:
            raise SettingError(lambda n: f"{n(name)} must be a positive multiple of {VAE_FACTOR}, got {value!r}")
        size[name] = value
    return Settings(prompts, negatives, image, mask, strength, steps, guidance_scale, sampler, seed,
                    num_images=num_images, output_type=output_type, clip_skip=clip_skip, **size)


class StableDiffusion:
    """The three networks of a checkpoint, the tokenizer, the textual-inversion embeddings loaded, and the
    methods that make images with them."""

    def __init__(self, models: StableDiffusionModels, tokenizer: CLIPTokenizer | None = None):
        self.models = models
        self.tokenizer = tokenizer or CLIPTokenizer()
        self.embeddings: dict[str, Embedding] = {}
        self.prompt_parser = PromptParser(self.tokenizer, self.embeddings)
        self.device = next(models.unet.parameters()).device
        self.dtype = next(models.unet.parameters()).dtype

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, use_ema: bool = True) -> "StableDiffusion":
        return cls(load_checkpoint(path, device=device, dtype=dtype, use_ema=use_ema))

    def configure_attention(self, *, query_slice: int | None = None, fused: bool = True) -> None:
        """Attention of all three networks: sliced to `query_slice` query positions at a time (bounds the
        memory of attention kernels that hold the score matrix), and torch's fused kernel or the formula
        written out (`sd.attention.plain_attention`)."""
        for net in (self.models.clip, self.models.unet, self.models.vae):
            configure_attention(net, query_slice=query_slice, fused=fused)

    def load_embedding(self, path: str | Path, token: str | None = None) -> Embedding:
        """Load a textual-inversion embedding (AUTOMATIC1111, kohya or diffusers file): prompts then use it
        by `token`, by default the token the file names, else the file's name. Returns it."""
        return self.add_embedding(read_embedding(path, token))

    def add_embedding(self, embedding: Embedding) -> Embedding:
        check_width(embedding, self.models.clip.config.width)
        check_name(embedding, self.tokenizer, self.embeddings)
        self.embeddings[embedding.name] = embedding
        return embedding

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

    # ---- the shared machinery ----------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *,
                 progress: bool = True, tiled_decode: bool = False, callback: StepCallback | None = None,
                 **settings):
        """One denoising loop for all three tasks.

        prompt, negative_prompt: a text or a list of texts (one negative per prompt), in AUTOMATIC1111's
            syntax: (emphasis), [less], (text:1.3), BREAK, any length, embeddings by name (`sd.prompt`).
        image, mask: an init image (path or PIL image) for image-to-image; with a mask (white: repaint)
            for inpainting.
        strength: how much of the image is redrawn, 0 to 1 (default 0.75, with a mask 1.0).
        steps (25), guidance_scale (7.5; 1 or less: no classifier-free guidance), sampler (a name of
            `sd.samplers.SAMPLERS` or a `Sampler`, default dpmpp_2m_karras), seed (default: random).
        width, height: multiples of 8 (default: the image's size rounded down, else the model's size).
        num_images: images per prompt.
        output_type: "pil" (a list of images), "np" (an array (N, H, W, 3) in [0, 1]) or "latent" (the
            final scaled latents (N, 4, H/8, W/8)).
        clip_skip: 1 (the text encoder's output, default) or N: the hidden states of its N-th last layer.
        progress: a progress bar; tiled_decode: decode in tiles, bounding the VAE's memory for large
            images; callback: called after every step with (step index, timestep, latents, predicted x0).
        Random numbers come from a CPU generator seeded with `seed`, drawn in diffusers' order.
        """
        s = settle(prompt, negative_prompt, image_size=self.models.image_size,
                   inpainting_model=self.models.is_inpainting, **settings)
        generator = torch.Generator("cpu").manual_seed(s.seed)
        guided = s.guidance_scale > 1.0
        check_clip_skip(s.clip_skip, self.models.clip.config.layers)
        context = self.encode_prompts(s.prompts, s.negatives if guided else None, s.num_images,
                                      s.clip_skip)  # (2B or B, 77·k, 768)
        s.sampler.set_timesteps(s.steps, self.device)
        if s.image is not None:
            s.sampler.set_strength(s.strength)
        pixels = image_to_tensor(s.image, (s.width, s.height)) * 2 - 1 if s.image is not None else None  # (1, 3, H, W)
        latents, image_latents, noise = self.starting_latents(s, pixels, generator)
        inpainting = self.prepare_inpainting(s, pixels, image_latents, noise, generator) if s.mask is not None else None
        latents = self.denoise(latents, context, s.sampler, s.guidance_scale, generator, inpainting, progress, callback)
        return self.decode(latents, s.output_type, tiled_decode)

    def starting_latents(self, s: Settings, pixels: torch.Tensor | None,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(latents to start from, the image's latents or None, the initial noise), each (B, 4, h, w):
        noise for text-to-image and full-strength inpainting, else the image's latents noised to the
        sampler's first timestep (SDEdit)."""
        sampler = s.sampler
        needs_image_latents = pixels is not None and (s.mask is None or not self.models.is_inpainting
                                                      or s.strength < 1.0)
        image_latents = (self.encode_image(pixels, generator).expand(s.batch, -1, -1, -1)
                         if needs_image_latents else None)  # (B, 4, h, w)
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
        decode = vae.decode_tiled if tiled else vae.decode
        images = decode(latents.to(vae.dtype) / self.models.scale_factor)  # (B, 3, H, W)
        if vae.dtype == torch.float16 and not torch.isfinite(images).all():
            vae.float()  # the fp16 VAE decoder overflows on some latents: this decode runs in fp32
            try:
                images = decode(latents.float() / self.models.scale_factor)
            finally:
                vae.half()  # fp16 -> fp32 -> fp16 gives back the same weights
        check_finite(images, "decoded images", vae.dtype)
        images = (images / 2 + 0.5).clamp(0, 1)
        images = images.permute(0, 2, 3, 1).float().cpu().numpy()  # (B, H, W, 3)
        if output_type == "np":
            return images
        return [Image.fromarray(im) for im in (images * 255).round().astype(np.uint8)]

    def denoise(self, latents: torch.Tensor, context: torch.Tensor, sampler: Sampler, guidance_scale: float,
                generator: torch.Generator, inpainting: Inpainting | None, progress: bool,
                callback: StepCallback | None = None) -> torch.Tensor:
        """The sampling loop from the sampler's begin index: one (batched, when guided) UNet call per
        timestep, then a sampler step."""
        guided = context.shape[0] != latents.shape[0]
        timesteps = sampler.timesteps[sampler.begin_index:]
        for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="denoising", leave=False)):
            x = sampler.scale_model_input(latents, t)  # (B, 4, h, w)
            if inpainting is not None and self.models.is_inpainting:
                x = torch.cat([x, inpainting.mask, inpainting.masked_image_latents], dim=1)  # (B, 9, h, w)
            x = torch.cat([x, x]) if guided else x  # unconditional half first
            eps = self.models.unet(x.to(self.dtype), t, context).float()  # (2B or B, 4, h, w)
            if guided:
                eps_uncond, eps_text = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
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
        """CLIP hidden states of the prompts, each repeated num_images times: (B, 77·k, 768), or with the
        negative prompts' first for classifier-free guidance: (2B, 77·k, 768); k chunks of 77 positions,
        as many as the longest text needs (`sd.prompt.encode`)."""
        parsed = [self.prompt_parser.parse(text, "negative_prompt") for text in negatives or []]
        parsed += [self.prompt_parser.parse(text) for text in prompts]
        return encode(self.models.clip, parsed, clip_skip).repeat_interleave(num_images, dim=0)

    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Image in [-1, 1] (1, 3, H, W) -> a sample of its latent distribution, scaled: (1, 4, H/8, W/8)."""
        mean, logvar = (m.float() for m in self.models.vae.encode(pixels.to(self.device, self.models.vae.dtype)))
        return (mean + torch.exp(0.5 * logvar) * self.randn(mean.shape, generator)) * self.models.scale_factor

    def randn(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Standard normal noise from the CPU generator, moved to the model's device."""
        return torch.randn(shape, generator=generator, dtype=LATENT_DTYPE).to(self.device)
