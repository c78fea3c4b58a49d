"""Fine-tuning a checkpoint as its users do it (kohya sd-scripts, diffusers' examples, AUTOMATIC1111), each an
objective of the training loop in `sd/train.py`:

- `lora`: low-rank layers beside the frozen weights (Hu et al., 2021) in kohya's places and file layout
  (`sd/lora_network.py`); the UNet's and the text encoders' at their own learning rates.
- `dreambooth`: the whole UNet (and optionally the text encoder), or a LoRA, taught a subject under a rare
  identifier ("a photo of sks dog", Ruiz et al., 2023), with prior preservation: class images ("a photo of
  dog") that the base model makes itself are trained on too, at `prior_loss_weight`, so the class keeps its
  meaning.
- `textual-inversion`: one new token's 1..N vectors (Gal et al., 2022), nothing else (`sd/textual_inversion.py`).

All of them train on kohya-style data (`sd/finetune_data.py`): folders `10_sks dog` (repeats, class caption),
aspect-ratio buckets, captions shuffled by tag, latents encoded once. The loss is the diffusion objective's
(epsilon or v as the model predicts, min-SNR-gamma, noise offset, caption dropout) with each image weighted
(class images at prior_loss_weight): loss = sum_i w_i mse_i / B. For a batch of n instance and n class
images that is (mse_instance + w mse_class) / 2, half of diffusers' DreamBooth loss: the same direction,
and for Adam the same steps.
"""

import argparse
import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sd.checkpoint import StableDiffusionModels
from sd.datasets import read_image_size
from sd.errors import InputError, SettingError
from sd.hashing import file_sha256
from sd.finetune_data import BucketOptions, CaptionOptions, FineTuneData, cache_latents
from sd.lora_network import LoRANetworkConfig, add_lora_network, write_lora
from sd.paths import readable_file
from sd.objectives import DiffusionObjective, DiffusionOptions, LatentBatch, save_grid
from sd.pipeline import StableDiffusion
from sd.prediction import prediction_name
from sd.prompt import words
from sd.textual_inversion import TrainableEmbedding, write_embedding

SAMPLE_STEPS = 20
MAX_SAMPLE_PROMPTS = 8


@dataclass(frozen=True)
class DataOptions:
    """How the images and captions are read and weighted."""

    shuffle_tags: bool = False
    keep_tokens: int = 0
    prior_loss_weight: float = 1.0  # of class images

    def __post_init__(self):
        if not 0 <= self.prior_loss_weight <= 1000:
            raise InputError(f"--prior-loss-weight must be between 0 and 1000 (DreamBooth uses 1), got "
                             f"{self.prior_loss_weight}")


def micro_values(size: tuple[int, int], bucket: tuple[int, int]) -> list[float]:
    """SDXL's micro-conditions of an image of `size` (w, h) fitted to its bucket (w, h): its original size (h, w),
    the top-left corner of the centre crop in the resized image, the bucket's size (h, w), as kohya's SDXL
    trainer passes them."""
    width, height = size
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    top, left = (round(height * scale) - bh) // 2, (round(width * scale) - bw) // 2
    return [height, width, top, left, bh, bw]


class BucketLatents:
    """The batches of a fine-tune: each step's images from `FineTuneData.batch_at` (one bucket, repeats and class
    images per epoch), their latents encoded once, their captions processed anew each step."""

    def __init__(self, objective: "FineTuneObjective", data: FineTuneData):
        self.objective, self.data = objective, data
        self.latents = cache_latents(objective.models.vae, data, objective.device)  # N x 2 x (1, 4, h, w)
        self.captions = objective.cut([item.caption for item in data.items])
        self.weights = torch.tensor([objective.data_options.prior_loss_weight if item.is_class else 1.0
                                     for item in data.items])  # (N,)
        self.micro = [micro_values(read_image_size(item.path), item.bucket) for item in data.items] \
            if objective.models.family.micro_conditions else None
        self.caption_options = CaptionOptions(objective.data_options.shuffle_tags, objective.data_options.keep_tokens)
        self.seed = objective.seed

    def draw(self, step: int, gen: torch.Generator, b: int) -> LatentBatch:
        _, indices = self.data.batch_at(step, self.seed, b)
        mean = torch.cat([self.latents[i][0] for i in indices])  # (B, 4, h, w)
        std = torch.cat([self.latents[i][1] for i in indices])
        x0 = (mean + std * torch.randn(mean.shape, generator=gen)) * self.objective.models.scale_factor
        rng = random.Random(self.seed * 1_000_003 + step)
        captions = [self.caption_options.apply(self.captions[i], rng) for i in indices]
        weights = self.weights[indices] if any(self.data.items[i].is_class for i in indices) else None
        micro = [self.micro[i] for i in indices] if self.micro is not None else None
        return LatentBatch(x0, captions, weights, micro)

    def sample_prompts(self) -> list[str]:
        """The first instance captions, each once."""
        captions = [c for c, item in zip(self.captions, self.data.items) if not item.is_class]
        return list(dict.fromkeys(captions))[:MAX_SAMPLE_PROMPTS]


class FineTuneObjective(DiffusionObjective):
    """The diffusion loss on a fine-tune's data; the whole UNet (and the text encoder if asked) trains, and the
    output is a checkpoint (DreamBooth without LoRA)."""

    def __init__(self, args: argparse.Namespace):
        prediction = prediction_name(args.prediction, "--prediction") if args.prediction else "epsilon"
        super().__init__(train_text_encoder=args.text_encoder == "train",
                         options=DiffusionOptions(prediction, args.min_snr_gamma, args.noise_offset))
        self.data_options = DataOptions(args.shuffle_tags, args.keep_tokens, args.prior_loss_weight)
        self.seed = args.seed
        self.prompts = args.sample_prompt_list
        self.sample_size = (args.resolution, args.resolution)  # of the sample images (settled by sd.train)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "FineTuneObjective":
        return cls(args)

    def identity(self) -> dict:
        return {**super().identity(), **non_default(self.data_options)}

    def latents(self, data, cfg):
        return BucketLatents(self, data)

    @torch.no_grad()
    def sample(self, models: StableDiffusionModels, path: Path) -> None:
        """The prompts of --sample-prompts (default: the first captions), one image each, at the training size."""
        pipe = self.sampling_pipeline(models)
        prompts = self.prompts or self.source.sample_prompts()
        width, height = self.sample_size
        images = [pipe.text_to_image(p, seed=self.seed, steps=SAMPLE_STEPS, width=width, height=height,
                                     progress=False)[0] for p in prompts]
        save_grid(images, min(len(images), 4), path)

    def sampling_pipeline(self, models: StableDiffusionModels) -> StableDiffusion:
        return StableDiffusion(dataclasses.replace(models, prediction_type=self.options.prediction_type),
                               self.tokenizer)


def non_default(options) -> dict:
    """The fields of a frozen dataclass that differ from their defaults."""
    values = dataclasses.asdict(options)
    return {f.name: values[f.name] for f in dataclasses.fields(options) if values[f.name] != f.default}


class LoRAObjective(FineTuneObjective):
    """A LoRA network in kohya's places trains, everything else frozen; the output is the LoRA file."""

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.network = LoRANetworkConfig(rank=args.rank, alpha=args.alpha, conv_rank=args.conv_dim,
                                         conv_alpha=args.conv_alpha, dropout=args.network_dropout,
                                         unet=args.unet_lr > 0, text_encoder=args.text_encoder_lr > 0)
        self.rates = {"unet": args.unet_lr, "text": args.text_encoder_lr}
        self.metadata: dict[str, object] = {}  # the training settings for the file (`training_metadata`)
        self.formats = ("kohya", "peft") if args.save_peft else ("kohya",)

    def identity(self) -> dict:
        return {**super().identity(), "network": dataclasses.asdict(self.network)}

    def trainable(self, models: StableDiffusionModels) -> dict[str, nn.Module]:
        for net in ("unet", "vae", "clip", "clip_g"):
            if getattr(models, net) is not None:
                getattr(models, net).requires_grad_(False)
        with torch.random.fork_rng():  # kaiming's init of the down weights from --seed, alike in every process
            torch.manual_seed(self.seed)
            layers = add_lora_network(models, self.network)
        parts = {net: getattr(models, net).train() for net, found in layers.items() if found}
        return parts

    def learning_rates(self, lr: float) -> dict[str, float]:
        return {part: self.rates["unet" if part == "unet" else "text"] for part in self.modules}

    def finish(self, models: StableDiffusionModels) -> None:
        """The layers stay unmerged: the file is written from them."""

    def outputs(self, path: Path) -> list[Path]:
        return [path, *([path.with_suffix(".peft.safetensors")] if "peft" in self.formats else [])]

    def write(self, models: StableDiffusionModels, path: Path, dtype: torch.dtype | None) -> None:
        done = {"ss_steps": self.cfg.steps, "ss_training_finished_at": int(time.time())}
        write_lora(path, models, {**self.metadata, **done}, formats=self.formats)


def check_identifier(captions: list[str], class_prompt: str | None, source: str = "--instance-prompt") -> None:
    """DreamBooth binds the subject to a word of each instance caption that the class prompt lacks."""
    for caption in captions if class_prompt is not None else []:
        if not set(words(caption)) - set(words(class_prompt)):
            raise InputError(f"{source} {caption!r} has no word that --class-prompt {class_prompt!r} lacks: add a "
                             f"rare identifier for the subject, e.g. 'a photo of sks dog' for the class 'a photo of "
                             f"dog'")


def bucket_options(args: argparse.Namespace) -> BucketOptions:
    """The buckets of --resolution and the bucket flags: by default sides from half the resolution (kohya's 256
    for 512) to twice it, in steps of --bucket-step."""
    step, resolution = args.bucket_step, args.resolution
    return BucketOptions(resolution=resolution, min_side=args.min_bucket_side or max(step, resolution // 2 // step * step),
                         max_side=args.max_bucket_side or max(step, 2 * resolution // step * step), step=step, enabled=not args.no_buckets)


MAX_PROMPTS_BYTES = 64 * 1024


def read_prompts(path: Path) -> list[str]:
    """The prompts of a --sample-prompts file: one per line, blank lines and '#' comments left out."""
    readable_file(path, "--sample-prompts file")
    if path.stat().st_size > MAX_PROMPTS_BYTES:
        raise InputError(f"--sample-prompts {path} is over {MAX_PROMPTS_BYTES // 1024} kB; give a few prompts, "
                         f"one per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"--sample-prompts {path} is not UTF-8 text; save it as UTF-8, one prompt per line") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InputError(f"--sample-prompts {path} holds no prompt; write one prompt per line")
    return prompts


def training_metadata(args: argparse.Namespace, models: StableDiffusionModels, data: FineTuneData,
                      cfg) -> dict[str, object]:
    """The training settings kohya writes into a LoRA's metadata (`ss_*`), which AUTOMATIC1111 shows."""
    instance = [item for item in data.items if not item.is_class]
    folders: dict[str, dict] = {}
    for item in instance:
        folders.setdefault(item.path.parent.name, {"n_repeats": item.repeats, "img_count": 0})["img_count"] += 1
    tags: dict[str, dict[str, int]] = {}
    for item in instance:
        counts = tags.setdefault(item.path.parent.name, {})
        for tag in filter(None, (t.strip() for t in item.caption.split(","))):
            counts[tag] = counts.get(tag, 0) + 1
    return {
        "ss_output_name": Path(args.output).stem, "ss_sd_model_name": Path(args.init).name,
        "ss_training_started_at": int(time.time()), "ss_max_train_steps": cfg.steps,
        "ss_learning_rate": cfg.lr, "ss_unet_lr": args.unet_lr, "ss_text_encoder_lr": args.text_encoder_lr,
        "ss_lr_scheduler": cfg.schedule, "ss_lr_warmup_steps": cfg.warmup, "ss_train_batch_size": cfg.batch_size,
        "ss_resolution": f"({args.resolution}, {args.resolution})", "ss_enable_bucket": not args.no_buckets, "ss_seed": args.seed, "ss_noise_offset": args.noise_offset,
        "ss_min_snr_gamma": args.min_snr_gamma, "ss_caption_dropout_rate": cfg.caption_dropout,
        "ss_shuffle_caption": args.shuffle_tags, "ss_keep_tokens": args.keep_tokens,
        "ss_prior_loss_weight": args.prior_loss_weight,
        "ss_num_train_images": sum(item.repeats for item in instance),
        "ss_num_reg_images": len(data.items) - len(instance),
        "ss_gradient_checkpointing": args.gradient_checkpointing, "ss_mixed_precision": "bf16" if args.bf16 else "no",
        "ss_v_parameterization": models.prediction_type == "v_prediction",
        "ss_dataset_dirs": folders, "ss_tag_frequency": tags,
    }


class TextualInversionObjective(FineTuneObjective):
    """A new token's vectors train, every network frozen; the output is the embedding, in diffusers' safetensors
    layout and AUTOMATIC1111's `.pt` beside it."""

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.token, self.init_word, self.vectors = args.token, args.init_word, args.vectors
        self.init = Path(args.init)

    def identity(self) -> dict:
        return {**super().identity(), "token": self.token, "init_word": self.init_word, "vectors": self.vectors}

    def trainable(self, models: StableDiffusionModels) -> dict[str, nn.Module]:
        for net in ("unet", "vae", "clip", "clip_g"):
            if getattr(models, net) is not None:
                getattr(models, net).requires_grad_(False)
        try:
            self.embedding = TrainableEmbedding(StableDiffusion(models, self.tokenizer), self.token, self.init_word,
                                                self.vectors)
        except SettingError as e:
            raise e.for_flags() from None
        return {"embedding": self.embedding}

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"embedding": self.embedding}

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.embedding(prompts)

    def latents(self, data, cfg):
        self.embedding.check_captions([item.caption for item in data.items if not item.is_class])
        return super().latents(data, cfg)

    def sampling_pipeline(self, models: StableDiffusionModels) -> StableDiffusion:
        pipe = super().sampling_pipeline(models)
        pipe.add_embedding(self.embedding.embedding())
        return pipe

    def finish(self, models: StableDiffusionModels) -> None:
        """The networks are unchanged."""

    def outputs(self, path: Path) -> list[Path]:
        return [path, path.with_suffix(".pt")]

    def write(self, models: StableDiffusionModels, path: Path, dtype: torch.dtype | None) -> None:
        write_embedding(path, self.embedding, step=self.cfg.steps, checkpoint_name=self.init.name,
                        checkpoint_hash=file_sha256(self.init, cache=True), formats=("safetensors", "pt"))


def textual_inversion_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", required=True, help="the new token's name, as prompts will write it (e.g. "
                                                  "'my-style'); every caption must use it")
    p.add_argument("--init-word", required=True, help="one-token word whose embedding the vectors start from "
                                                      "(e.g. 'painting')")
    p.add_argument("--vectors", type=int, default=1, help="vectors per token, 1 to 75 (default: 1)")
