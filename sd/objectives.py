"""What a stage of training optimises (Rombach et al., 2022): one objective object per stage.

The loop in `sd/train.py` is the same for every stage (AdamW, warm-up and cosine decay, clipping, EMA,
atomic state, exact resume). An objective says which networks it trains, what it prepares once, its loss
at step k from that step's generator, the samples it draws and what it does after the last step:
- `VAEObjective`: the KL autoencoder on an L1 reconstruction loss plus a small KL term (the LDM paper's
  loss without its perceptual and adversarial terms, which flat synthetic images do not need); after the
  last step the latent scale is measured on the data as 1 / std of the latents (LDM's `scale_by_std`).
- `DiffusionObjective`: the UNet (and the text encoder, when it trains) on the MSE to the target of its
  prediction type, eps (Ho et al., 2020) or v (Salimans & Ho, 2022), at a uniform timestep of SD v1's
  noise schedule, on latents the frozen VAE encodes once; 10% of captions are dropped to "" (the prompt of
  classifier-free guidance). Optionally each sample's loss is weighted by min-SNR-gamma (Hang et al., 2023):
  min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v, with SNR = a_bar_t / (1 - a_bar_t).
A new objective (LoRA, textual inversion) is a new class and a line in `OBJECTIVES`.
"""

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from sd.checkpoint import StableDiffusionModels
from sd.cli import note
from sd.datasets import CaptionedShapes, CaptionFolder, to_tensor
from sd.errors import InputError
from sd.files import write_atomically
from sd.parameterization import check_prediction_type, noised, scales, target
from sd.pipeline import StableDiffusion
from sd.prediction import prediction_name
from sd.prompt import PromptParser
from sd.samplers.schedule import NoiseSchedule
from sd.tokenizer import MAX_PROMPT_TOKENS, CLIPTokenizer
from sd.vae import AutoencoderKL

SAMPLE_PROMPTS = ["a large red circle in the top left", "a small blue square in the bottom right",
                  "a large yellow star in the center on a black background", "a green heart in the top right",
                  "a white triangle in the bottom left on a blue background", "a red star", "a blue heart",
                  "a purple circle in the center"]


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over the latent: (B,)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, images: list[Image.Image], device, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Means and standard deviations of the latents of `images`: 2 x (N, 4, h, w), on the CPU."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        mean, logvar = vae.encode(to_tensor(images[i:i + batch]).to(device))  # 2 x (b, 4, h, w)
        means.append(mean.float().cpu())
        stds.append(torch.exp(0.5 * logvar).float().cpu())
    return torch.cat(means), torch.cat(stds)


def first_images(data, n: int) -> list[tuple]:
    """The first n samples of an endless dataset, or all of a folder."""
    return [data.sample(i) for i in range(len(data) if isinstance(data, CaptionFolder) else n)]


def measure_scale(vae: AutoencoderKL, data, device, n: int = 2048) -> float:
    """1 / std of the latent samples of n images (LDM's scale_by_std)."""
    mean, std = encode_pool(vae, [s[0] for s in first_images(data, n)], device)
    samples = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    return float(1 / samples.std())


def save_grid(images: list[Image.Image], columns: int, path: Path) -> None:
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, math.ceil(len(images) / columns) * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    write_atomically(path, lambda tmp: grid.save(tmp, format="PNG"))


def mse(prediction: torch.Tensor, wanted: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The mean squared error; with `weights` (B,), the mean over the batch of each sample's weighted MSE."""
    if weights is None:
        return F.mse_loss(prediction, wanted)
    return (F.mse_loss(prediction, wanted, reduction="none").flatten(1).mean(1) * weights).mean()


class Objective:
    """One stage's loss and what goes with it. `prepare` is called once before the first step (after a
    resumed state is loaded), `loss` at every step, `sample` with the EMA weights, `finish` after the last step."""

    trains: tuple[str, ...] = ()  # the networks it optimises, of "unet", "vae", "clip"
    options = None  # a frozen dataclass of its settings, or None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Objective":
        return cls()

    def identity(self) -> dict:
        """Its options that differ from their defaults: part of a run's identity (so a state written before
        an option existed still resumes)."""
        if self.options is None:
            return {}
        values = dataclasses.asdict(self.options)
        return {f.name: values[f.name] for f in dataclasses.fields(self.options) if values[f.name] != f.default}

    def prepare(self, models: StableDiffusionModels, data, cfg, device: torch.device) -> None:
        self.models, self.data, self.cfg, self.device = models, data, cfg, device

    def loss(self, step: int, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, models: StableDiffusionModels, path: Path) -> None:
        raise NotImplementedError

    def finish(self, models: StableDiffusionModels) -> None:
        """After the last step, on the models with the EMA weights in place."""


class VAEObjective(Objective):
    """The autoencoder: L1 reconstruction plus cfg.kl_weight times the KL term per latent number."""

    trains = ("vae",)

    def loss(self, step: int, gen: torch.Generator) -> torch.Tensor:
        b = self.cfg.batch_size
        x = to_tensor([self.data.sample(step * b + j)[0] for j in range(b)]).to(self.device)  # (B, 3, H, W)
        mean, logvar = self.models.vae.encode(x)  # 2 x (B, 4, h, w)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen).to(self.device)
        reconstruction = self.models.vae.decode(z)  # (B, 3, H, W)
        return (reconstruction - x).abs().mean() + self.cfg.kl_weight * kl_divergence(mean, logvar).mean() / x[0].numel()

    @torch.no_grad()
    def sample(self, models: StableDiffusionModels, path: Path) -> None:
        """Eight images no step trained on, over their reconstructions from the latent means."""
        originals = [self.data.sample(10**9 + i)[0] for i in range(8)]
        x = to_tensor(originals).to(self.device)  # (8, 3, H, W)
        mean, _ = models.vae.encode(x)  # (8, 4, h, w)
        decoded = ((models.vae.decode(mean) / 2 + 0.5).clamp(0, 1) * 255).round().byte()  # (8, 3, H, W)
        rebuilt = [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in decoded]
        save_grid(originals + rebuilt, 8, path)

    def finish(self, models: StableDiffusionModels) -> None:
        models.scale_factor = measure_scale(models.vae, self.data, self.device)
        print(f"latent scale factor: {models.scale_factor:.5f}", file=sys.stderr)


@dataclass(frozen=True)
class DiffusionOptions:
    """What the UNet learns to predict, and the min-SNR-gamma loss weighting (None: every timestep alike)."""

    prediction_type: str = "epsilon"  # or "v_prediction" (`sd.parameterization.PREDICTION_TYPES`)
    min_snr_gamma: float | None = None  # Hang et al. use 5

    def __post_init__(self):
        check_prediction_type(self.prediction_type)
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise InputError(f"min_snr_gamma must be a positive number (Hang et al. use 5) or None, "
                             f"got {self.min_snr_gamma}")


class DiffusionObjective(Objective):
    """The UNet, and the text encoder if `train_text_encoder`, on the denoising MSE of `options`."""

    def __init__(self, train_text_encoder: bool = True, options: DiffusionOptions = DiffusionOptions()):
        self.trains = ("unet", "clip") if train_text_encoder else ("unet",)
        self.options = options
        self.schedule = NoiseSchedule()
        self.alphas_cumprod = self.schedule.alphas_cumprod  # (T,)
        self.tokenizer = CLIPTokenizer()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DiffusionObjective":
        """--text-encoder, and --prediction v|epsilon (settled by `sd.train.train`: the --init model's by default)."""
        prediction = prediction_name(args.prediction, "--prediction") if args.prediction else "epsilon"
        return cls(train_text_encoder=args.text_encoder == "train", options=DiffusionOptions(prediction))

    def finish(self, models: StableDiffusionModels) -> None:
        models.prediction_type = self.options.prediction_type  # stored in the checkpoint written

    def prepare(self, models: StableDiffusionModels, data, cfg, device: torch.device) -> None:
        """Encode the image pool once with the frozen VAE."""
        super().prepare(models, data, cfg, device)
        samples = first_images(data, cfg.pool)
        self.pool_mean, self.pool_std = encode_pool(models.vae, [s[0] for s in samples], device)  # 2 x (N, 4, h, w)
        self.pool_captions = self.cut([s[1] for s in samples])
        if isinstance(data, CaptionFolder):  # the sample grid's prompts, refused now rather than after training
            parser = PromptParser(self.tokenizer)
            for image, caption in zip(data.images[:8], self.pool_captions):
                parser.parse(caption, f"the caption {image.with_suffix('.txt')} (a prompt of the sample grid)")
        self.pool_scenes = [s[2] for s in samples]
        self.alphas_cumprod = self.alphas_cumprod.to(device)

    def cut(self, captions: list[str]) -> list[str]:
        """Captions as CLIP reads them in training: longer ones cut to their first MAX_PROMPT_TOKENS tokens
        (as SD's training did), with one note, so that the sample grid draws what was trained on."""
        tokens = self.tokenizer.tokenize(captions)
        long = [i for i, t in enumerate(tokens) if len(t) > MAX_PROMPT_TOKENS]
        if long:
            note(f"{len(long)} caption(s) are longer than CLIP's {MAX_PROMPT_TOKENS} tokens (the longest: "
                 f"{max(len(tokens[i]) for i in long)}); training reads their first {MAX_PROMPT_TOKENS}")
        return [self.tokenizer.decode(t[:MAX_PROMPT_TOKENS]) if i in long else c
                for i, (c, t) in enumerate(zip(captions, tokens))]

    def caption(self, pool_index: int, draw: int) -> str:
        """A caption of pool image `pool_index`: drawn anew each time for the generated set, else its own."""
        scene = self.pool_scenes[pool_index]
        return self.data.caption_of(scene, draw) if scene is not None else self.pool_captions[pool_index]

    def training_pair(self, x0: torch.Tensor, noise: torch.Tensor,
                      t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The network's input x_t, its target, and each sample's loss weight (None: unweighted) for clean
        latents x0 (B, 4, h, w) noised with `noise` to the timesteps t (B,)."""
        alpha, s = scales(self.alphas_cumprod, t, x0)  # 2 x (B, 1, 1, 1)
        noisy = noised(x0, noise, alpha, s)  # (B, 4, h, w), Ho et al. eq. 4
        wanted = target(self.options.prediction_type, x0, noise, alpha, s)  # (B, 4, h, w)
        gamma = self.options.min_snr_gamma
        if gamma is None:
            return noisy, wanted, None
        snr = (alpha / s).square().flatten()  # (B,)
        weights = snr.clamp(max=gamma) / (snr + 1 if self.options.prediction_type == "v_prediction" else snr)
        return noisy, wanted, weights

    def loss(self, step: int, gen: torch.Generator) -> torch.Tensor:
        b = self.cfg.batch_size
        index = torch.randint(len(self.pool_mean), (b,), generator=gen)  # (B,)
        eps_latent = torch.randn((b, *self.pool_mean.shape[1:]), generator=gen)
        x0 = (self.pool_mean[index] + self.pool_std[index] * eps_latent) * self.models.scale_factor  # (B, 4, h, w)
        captions = [self.caption(int(i), step * b + j) for j, i in enumerate(index)]
        drop = torch.rand(b, generator=gen) < self.cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        t = torch.randint(self.schedule.num_train_timesteps, (b,), generator=gen)  # (B,)
        noise = torch.randn(x0.shape, generator=gen)
        x0, noise, t = x0.to(self.device), noise.to(self.device), t.to(self.device)
        noisy, wanted, weights = self.training_pair(x0, noise, t)
        context = self.models.clip(self.tokenizer(captions).to(self.device))  # (B, 77, C)
        return mse(self.models.unet(noisy, t, context).float(), wanted, weights)

    @torch.no_grad()
    def sample(self, models: StableDiffusionModels, path: Path) -> None:
        """Eight prompts (the dataset's first captions for a folder), 20 steps of the default sampler."""
        pipe = StableDiffusion(dataclasses.replace(models, prediction_type=self.options.prediction_type), self.tokenizer)
        prompts = SAMPLE_PROMPTS if isinstance(self.data, CaptionedShapes) else self.pool_captions[:8]
        save_grid(pipe.text_to_image(prompts, seed=0, steps=20, progress=False), 8, path)


OBJECTIVES = {"vae": VAEObjective, "diffusion": DiffusionObjective}  # stage name -> its objective
