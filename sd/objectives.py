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
from torch import nn
from PIL import Image

from sd.checkpoint import StableDiffusionModels, save_checkpoint
from sd.cli import note
from sd.conditioning import Conditioning
from sd.datasets import CaptionedShapes, CaptionFolder, to_tensor
from sd.distributed import Processes
from sd.errors import InputError
from sd.files import write_atomically
from sd.micro_conditioning import embed
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
    """One stage's loss and what goes with it. `attach` is called once on the models (it says what trains),
    `prepare` once before the first step (after a resumed state is loaded), `loss` at every step, `sample`
    with the averaged weights, `finish` after the last step and `write` for the output."""

    trains: tuple[str, ...] = ()  # the networks it optimises, of "unet", "vae", "clip"
    options = None  # a frozen dataclass of its settings, or None
    processes = Processes()  # the run's processes (set by the stage under torchrun)

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

    def attach(self, models: StableDiffusionModels) -> dict[str, nn.Module]:
        """The modules holding what a step optimises (their parameters that require grad), by part name."""
        self.modules = self.trainable(models)
        return self.modules

    def trainable(self, models: StableDiffusionModels) -> dict[str, nn.Module]:
        """The networks of `trains`, trained whole; the others frozen."""
        for net in ("unet", "vae", "clip"):
            getattr(models, net).requires_grad_(net in self.trains).train(net in self.trains)
        return {net: getattr(models, net) for net in self.trains}

    def learning_rates(self, lr: float) -> dict[str, float]:
        """Each attached part's peak learning rate, given the run's (--lr)."""
        return {part: lr for part in self.modules}

    def prepare(self, models: StableDiffusionModels, data, cfg, device: torch.device) -> None:
        self.models, self.data, self.cfg, self.device = models, data, cfg, device

    def loss(self, step: int, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, models: StableDiffusionModels, path: Path) -> None:
        raise NotImplementedError

    def finish(self, models: StableDiffusionModels) -> None:
        """After the last step, on the models with the averaged weights in place."""

    def outputs(self, path: Path) -> list[Path]:
        """The files `write` makes for the output `path`."""
        return [path]

    def write(self, models: StableDiffusionModels, path: Path, dtype: torch.dtype | None) -> None:
        """The result: a checkpoint of the models (in `dtype`, None: as they are)."""
        save_checkpoint(models, path, dtype)


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
    """What the UNet learns to predict, the min-SNR-gamma loss weighting (None: every timestep alike) and the
    noise offset (Guttenberg, 2023: noise + offset * N(0, 1) per image and channel, for darker and brighter
    images than the mean; kohya users take about 0.1)."""

    prediction_type: str = "epsilon"  # or "v_prediction" (`sd.parameterization.PREDICTION_TYPES`)
    min_snr_gamma: float | None = None  # Hang et al. use 5
    noise_offset: float = 0.0

    def __post_init__(self):
        check_prediction_type(self.prediction_type)
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise InputError(f"min_snr_gamma must be a positive number (Hang et al. use 5) or None, "
                             f"got {self.min_snr_gamma}")
        if not 0 <= self.noise_offset <= 1:
            raise InputError(f"--noise-offset must be between 0 and 1 (kohya users take about 0.1), got "
                             f"{self.noise_offset}")


LITERAL = str.maketrans({c: "\\" + c for c in "()[]\\"})  # the prompt syntax's brackets and backslash, escaped


def literal(caption: str) -> str:
    """A caption as the prompt parser reads it as plain text: training reads brackets as text, not emphasis."""
    return caption.translate(LITERAL)


@dataclass(frozen=True)
class LatentBatch:
    """A step's whole batch, before any process takes its part."""

    latents: torch.Tensor  # (B, 4, h, w): samples of the images' latent distributions, scaled
    captions: list[str]
    weights: torch.Tensor | None = None  # (B,): each image's share of the loss (DreamBooth's class images)
    micro: list[list[float]] | None = None  # SDXL: each image's original size, crop and target size


class LatentPool:
    """The images of the generated set or a caption folder, encoded once by the frozen VAE; each step draws
    its batch from them at random (the generated set's captions drawn anew each time)."""

    def __init__(self, objective: "DiffusionObjective", data, pool: int):
        self.data = data
        samples = first_images(data, pool)
        self.mean, self.std = encode_pool(objective.models.vae, [s[0] for s in samples], objective.device)  # 2 x (N, 4, h, w)
        self.captions = objective.cut([s[1] for s in samples])
        if isinstance(data, CaptionFolder):  # the sample grid's prompts, refused now rather than after training
            parser = PromptParser(objective.tokenizer)
            for image, caption in zip(data.images[:8], self.captions):
                parser.parse(caption, f"the caption {image.with_suffix('.txt')} (a prompt of the sample grid)")
        self.scenes = [s[2] for s in samples]
        self.scale_factor = objective.models.scale_factor

    def caption(self, index: int, draw: int) -> str:
        """A caption of pool image `index`: drawn anew each time for the generated set, else its own."""
        scene = self.scenes[index]
        return self.data.caption_of(scene, draw) if scene is not None else self.captions[index]

    def draw(self, step: int, gen: torch.Generator, b: int) -> LatentBatch:
        index = torch.randint(len(self.mean), (b,), generator=gen)  # (B,)
        eps_latent = torch.randn((b, *self.mean.shape[1:]), generator=gen)
        x0 = (self.mean[index] + self.std[index] * eps_latent) * self.scale_factor  # (B, 4, h, w)
        return LatentBatch(x0, [self.caption(int(i), step * b + j) for j, i in enumerate(index)])

    def sample_prompts(self) -> list[str]:
        return SAMPLE_PROMPTS if isinstance(self.data, CaptionedShapes) else self.captions[:8]


class Denoiser(nn.Module):
    """The networks a training step runs through, as one module (what DDP wraps when several processes train):
    captions -> the text encoders' conditioning -> the UNet's prediction at (x_t, t); `extra` holds other
    trained modules the conditioning uses (textual inversion's vectors)."""

    def __init__(self, objective: "DiffusionObjective", extra: dict[str, nn.Module]):
        super().__init__()
        self.unet = objective.models.unet
        self.text_encoders = nn.ModuleList(encoder.network for encoder in objective.pipe.text_encoders)
        self.extra = nn.ModuleDict(extra)
        self.conditioning = objective.conditioning

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, captions: list[str],
                micro: list[list[float]] | None = None) -> torch.Tensor:
        return self.unet(noisy, t, self.conditioning(captions, micro))  # (B, 4, h, w)


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
        """Encode the images once with the frozen VAE; the denoiser module a step calls."""
        super().prepare(models, data, cfg, device)
        self.pipe = StableDiffusion(models, self.tokenizer)
        self.source = self.latents(data, cfg)
        self.denoiser = self.processes.wrap(Denoiser(self, self.extra_modules()))
        self.schedule = models.schedule  # the one it was trained with (zero terminal SNR or SD's)
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(device)

    def latents(self, data, cfg):
        """Where the batches come from: the pool of encoded images."""
        return LatentPool(self, data, cfg.pool)

    def extra_modules(self) -> dict[str, nn.Module]:
        """Trained modules besides the networks (none)."""
        return {}

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

    def conditioning(self, captions: list[str], micro: list[list[float]] | None = None) -> Conditioning:
        """What the UNet is conditioned on for these captions, computed as the pipeline computes it for a
        prompt (the family's text encoders and layers, embeddings by name), the captions read literally; for
        SDXL the pooled text and each image's micro-conditions (B, k) make the vector."""
        context, pooled = self.encode([literal(c) for c in captions])  # (B, 77, C), (B, P) or None
        if not self.models.family.micro_conditions:
            return Conditioning(context)
        values = torch.tensor(micro, dtype=torch.float32, device=context.device)  # (B, k)
        return Conditioning(context, vector=embed(pooled, values))  # vector (B, P + 256 k)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text encoders' hidden states and pooled vectors of the prompts."""
        return self.pipe.encode_text(prompts, None, 1)

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
        """Every random number of the step's whole batch is drawn (the same in every process), then this
        process takes its part."""
        b = self.cfg.batch_size
        batch = self.source.draw(step, gen, b)
        drop = torch.rand(b, generator=gen) < self.cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(batch.captions, drop.tolist())]
        t = torch.randint(self.schedule.num_train_timesteps, (b,), generator=gen)  # (B,)
        noise = torch.randn(batch.latents.shape, generator=gen)
        if self.options.noise_offset:
            noise = noise + self.options.noise_offset * torch.randn((*noise.shape[:2], 1, 1), generator=gen)
        x0, noise, t = (self.processes.part(x, b).to(self.device) for x in (batch.latents, noise, t))
        noisy, wanted, weights = self.training_pair(x0, noise, t)
        if batch.weights is not None:
            share = self.processes.part(batch.weights, b).to(self.device)  # (B,)
            weights = share if weights is None else weights * share
        micro = self.processes.part(batch.micro, b) if batch.micro is not None else None
        prediction = self.denoiser(noisy, t, self.processes.part(captions, b), micro)  # (B, 4, h, w)
        return mse(prediction.float(), wanted, weights)

    @torch.no_grad()
    def sample(self, models: StableDiffusionModels, path: Path) -> None:
        """Eight prompts (the dataset's first captions for a folder), 20 steps of the default sampler."""
        pipe = StableDiffusion(dataclasses.replace(models, prediction_type=self.options.prediction_type), self.tokenizer)
        save_grid(pipe.text_to_image(self.source.sample_prompts(), seed=0, steps=20, progress=False), 8, path)


OBJECTIVES = {"vae": VAEObjective, "diffusion": DiffusionObjective}  # stage name -> its objective
