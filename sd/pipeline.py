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

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from sd.datasets import words
from sd.errors import GenerationError, InputError
from sd.samplers import DEFAULT_SAMPLER, Sampler, make_sampler
from sd.tokenizer import CLIPTokenizer
from sd.checkpoint import StableDiffusionModels, load_checkpoint

VAE_FACTOR = 8  # image pixels per latent pixel, each way
LATENT_DTYPE = torch.float32  # latents and sampler arithmetic stay fp32 whatever the networks run in
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
OUTPUT_TYPES = ("pil", "np", "latent")

ImageInput = Image.Image | str | Path


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
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read {what} {path}: {e}; give a PNG or JPEG file.") from None
    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")  # composite transparency onto white rather than black
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
    return image.convert(mode)


def image_to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """PIL image -> (1, C, H, W) float32 in [0, 1], resized (Lanczos) to `size` = (width, height)."""
    if image.size != size:
        image = image.resize(size, Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W) or (H, W, C)
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)[None]  # (1, C, H, W)


def check_finite(x: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    if not torch.isfinite(x).all():
        cause = (f"most likely an overflow in {dtype}: run again with --dtype fp32 (or bf16)"
                 if dtype != torch.float32 else "in fp32 that means damaged weights: download the checkpoint again")
        raise GenerationError(f"the {what} contain NaN or inf values, {cause}")


def check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive whole number, got {value!r}")


class StableDiffusion:
    """The three networks of a checkpoint, the tokenizer, and the methods that make images with them."""

    def __init__(self, models: StableDiffusionModels, tokenizer: CLIPTokenizer | None = None):
        self.models = models
        self.tokenizer = tokenizer or CLIPTokenizer()
        self.device = next(models.unet.parameters()).device
        self.dtype = next(models.unet.parameters()).dtype

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, use_ema: bool = True) -> "StableDiffusion":
        return cls(load_checkpoint(path, device=device, dtype=dtype, use_ema=use_ema))

    def unseen_words(self, text: str) -> list[str]:
        """The words of `text` that the model's training captions never had (none when that is not known)."""
        if self.models.vocabulary is None:
            return []
        return [w for w in words(text) if w not in self.models.vocabulary]

    # ---- the three tasks ---------------------------------------------------------------------------

    def text_to_image(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *,
                      width: int | None = None, height: int | None = None, **options):
        """Images from a prompt, by default at the model's own size (512 for SD v1). Options: steps, guidance_scale, sampler, seed, num_images, output_type,
        progress (see `generate`)."""
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
                 image: ImageInput | None = None, mask: ImageInput | None = None, strength: float = 1.0,
                 steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 sampler: str | Sampler = DEFAULT_SAMPLER, seed: int | None = None,
                 width: int | None = None, height: int | None = None, num_images: int = 1,
                 output_type: str = "pil", progress: bool = True, tiled_decode: bool = False):
        """One denoising loop for all three tasks; returns a list of PIL images, an array (N, H, W, 3)
        in [0, 1] ("np"), or the final scaled latents (N, 4, H/8, W/8) ("latent"). `tiled_decode` decodes
        in tiles to bound the VAE's memory for large images."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        check_positive("steps", steps)
        check_positive("num_images", num_images)
        if len(negatives) != len(prompts):
            raise InputError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one each")
        if not 0.0 <= strength <= 1.0:
            raise InputError(f"strength must be between 0 and 1, got {strength}")
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        sampler = make_sampler(sampler) if isinstance(sampler, str) else sampler
        source = open_image(image, "init image", "RGB") if image is not None else None
        default_w, default_h = (self.models.image_size,) * 2 if source is None else (  # the image's own size,
            source.width - source.width % VAE_FACTOR, source.height - source.height % VAE_FACTOR)  # rounded down
        width, height = default_w if width is None else width, default_h if height is None else height
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value < VAE_FACTOR or value % VAE_FACTOR:
                raise InputError(f"{name} must be a positive multiple of {VAE_FACTOR}, got {value!r}")
        if self.models.is_inpainting and mask is None:
            raise InputError("this is an inpainting checkpoint: give an image and a mask (--image, --mask)")
        if mask is not None and source is None:
            raise InputError("a mask needs an init image to inpaint (--image)")

        batch = len(prompts) * num_images
        generator = torch.Generator("cpu").manual_seed(random.randrange(2**32) if seed is None else seed)
        guided = guidance_scale > 1.0
        context = self.encode_prompts(prompts, negatives if guided else None, num_images)  # (2B or B, 77, 768)

        sampler.set_timesteps(steps, self.device)
        begin = (steps - min(int(steps * strength), steps)) * sampler.order if source is not None else 0
        timesteps = sampler.timesteps[begin:]
        sampler.set_begin_index(begin)
        shape = (batch, 4, height // VAE_FACTOR, width // VAE_FACTOR)

        pixels = image_to_tensor(source, (width, height)) * 2 - 1 if source is not None else None  # (1, 3, H, W)
        needs_image_latents = pixels is not None and (mask is None or not self.models.is_inpainting
                                                      or strength < 1.0)
        image_latents = self.encode_image(pixels, generator).expand(batch, -1, -1, -1) if needs_image_latents else None
        noise = self.randn(shape, generator)  # (B, 4, h, w)
        if image_latents is None or (mask is not None and strength == 1.0):
            latents = noise * sampler.init_noise_sigma
        elif len(timesteps):
            latents = sampler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
        else:  # strength 0: nothing to denoise
            latents = image_latents

        inpainting = None
        if mask is not None:
            repaint = (image_to_tensor(open_image(mask, "mask", "L"), (width, height)) >= 0.5).to(pixels.dtype)
            masked_image_latents = self.encode_image(pixels * (1 - repaint), generator).expand(batch, -1, -1, -1)
            inpainting = Inpainting(mask=F.interpolate(repaint, size=shape[2:]).to(self.device)
                                    .expand(batch, -1, -1, -1),
                                    masked_image_latents=masked_image_latents,
                                    image_latents=None if self.models.is_inpainting else image_latents, noise=noise)

        latents = self.denoise(latents, context, sampler, timesteps, guidance_scale, generator, inpainting, progress)
        return self.decode(latents, output_type, tiled_decode)

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
            vae.float()  # the fp16 VAE decoder overflows on some latents: decode in fp32 from now on
            images = decode(latents.float() / self.models.scale_factor)
        check_finite(images, "decoded images", vae.dtype)
        images = (images / 2 + 0.5).clamp(0, 1)
        images = images.permute(0, 2, 3, 1).float().cpu().numpy()  # (B, H, W, 3)
        if output_type == "np":
            return images
        return [Image.fromarray(im) for im in (images * 255).round().astype(np.uint8)]

    def denoise(self, latents: torch.Tensor, context: torch.Tensor, sampler: Sampler, timesteps: torch.Tensor,
                guidance_scale: float, generator: torch.Generator, inpainting: Inpainting | None,
                progress: bool) -> torch.Tensor:
        """The sampling loop: one (batched, when guided) UNet call per timestep, then a sampler step."""
        guided = context.shape[0] != latents.shape[0]
        for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="denoising", leave=False)):
            x = sampler.scale_model_input(latents, t)  # (B, 4, h, w)
            if inpainting is not None and self.models.is_inpainting:
                x = torch.cat([x, inpainting.mask, inpainting.masked_image_latents], dim=1)  # (B, 9, h, w)
            x = torch.cat([x, x]) if guided else x  # unconditional half first
            eps = self.models.unet(x.to(self.dtype), t, context).float()  # (2B or B, 4, h, w)
            if guided:
                eps_uncond, eps_text = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
            latents = sampler.step(eps, t, latents, generator)
            if inpainting is not None and inpainting.image_latents is not None:
                known = inpainting.image_latents
                if i < len(timesteps) - 1:  # bring the known region to the noise level of the next step
                    known = sampler.add_noise(known, inpainting.noise, timesteps[i + 1: i + 2])
                latents = (1 - inpainting.mask) * known + inpainting.mask * latents
        return latents

    def encode_prompts(self, prompts: list[str], negatives: list[str] | None, num_images: int) -> torch.Tensor:
        """CLIP hidden states of the prompts, each repeated num_images times: (B, 77, 768), or with the
        negative prompts' first for classifier-free guidance: (2B, 77, 768)."""
        texts = (negatives or []) + prompts
        ids = self.tokenizer(texts).to(self.device)  # (P or 2P, 77)
        return self.models.clip(ids).repeat_interleave(num_images, dim=0)

    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Image in [-1, 1] (1, 3, H, W) -> a sample of its latent distribution, scaled: (1, 4, H/8, W/8)."""
        mean, logvar = (m.float() for m in self.models.vae.encode(pixels.to(self.device, self.models.vae.dtype)))
        return (mean + torch.exp(0.5 * logvar) * self.randn(mean.shape, generator)) * self.models.scale_factor

    def randn(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Standard normal noise from the CPU generator, moved to the model's device."""
        return torch.randn(shape, generator=generator, dtype=LATENT_DTYPE).to(self.device)
