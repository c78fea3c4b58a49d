"""Training Stable Diffusion's networks from scratch, and fine-tuning checkpoints (Rombach et al., 2022).

Latent diffusion trains in two stages, each one objective of `sd/objectives.py` run by the loop of
`sd/training.py`:
- `vae`: the KL autoencoder on an L1 reconstruction loss plus a small KL term; then the latent scale is
  measured on the data as 1 / std of the latents (LDM's `scale_by_std`).
- `diffusion`: the UNet on the epsilon- (Ho et al., 2020) or v-prediction MSE (`--prediction v`, Salimans &
  Ho, 2022) under the model's noise schedule, so every sampler works unchanged, on latents the frozen VAE
  encodes once. From scratch the text encoder trains jointly (as the LDM paper's own text-to-image model);
  from a checkpoint it stays frozen unless asked. 10% of captions are dropped to "", the prompt the
  pipeline feeds for classifier-free guidance.
- `all`: vae, then diffusion.
Fine-tuning a checkpoint as kohya sd-scripts and diffusers' examples do (`sd/finetune.py`), on kohya-style
folders (`sd/finetune_data.py`):
- `lora`: a LoRA file in kohya's layout, which AUTOMATIC1111, ComfyUI, diffusers and our --lora load;
- `dreambooth`: a subject under a rare token with prior preservation, the whole UNet or a LoRA;
- `textual-inversion`: a new token's vectors, for --embedding and prompts.
`torchrun --nproc-per-node N -m sd.train ...` trains in N processes (`sd/distributed.py`).

    python -m sd.train all --preset tiny-shapes --run-dir runs/tiny-shapes --output data/tiny-shapes.safetensors --half
    python -m sd.train lora --init model.safetensors --data my-images --run-dir runs/my-lora --output my-lora.safetensors
"""

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from sd.checkpoint import StableDiffusionModels, load_checkpoint, read_family
from sd.cli import CommandParser, note, run_command
from sd.clip import CLIPConfig, CLIPTextModel
from sd.datasets import CaptionedShapes, CaptionFolder, vocabulary
from sd.devices import memory_budget
from sd.distributed import Processes
from sd.errors import InputError
from sd.families import Family
from sd.finetune import (FineTuneObjective, LoRAObjective, TextualInversionObjective, bucket_options,
                         check_identifier, read_prompts, textual_inversion_flags, training_metadata)
from sd.finetune_data import FineTuneData, ensure_class_images
from sd.objectives import Objective
from sd.pipeline import StableDiffusion
from sd.prediction import SHORT, prediction_name
from sd.prompt import words
from sd.settings import MAX_IMAGES, MAX_SIDE, VAE_FACTOR, Range
from sd.training import MAX_SEED, MAX_STEPS, PROG, SCHEDULES, RunFolder, Stage, StageConfig, saving
from sd.unet import UNet, UNetConfig
from sd.vae import AutoencoderKL, VAEConfig

BASE_STAGES = ("vae", "diffusion")
MAX_BATCH = 65536
COUNT = Range(1, MAX_STEPS, whole=True)  # of steps
FRACTION = Range(0, 1, below=True, text="at least 0 and below 1")
OPEN_FRACTION = Range(0, 1, above=True, below=True, text="above 0 and below 1")
FLAG_RANGES = {  # every numeric flag of every command
    "steps": COUNT, "save_every": COUNT, "sample_every": COUNT, "warmup": Range(0, MAX_STEPS, whole=True),
    "batch_size": Range(1, MAX_BATCH, whole=True), "seed": Range(0, MAX_SEED, whole=True),
    "image_size": Range(VAE_FACTOR, MAX_SIDE, whole=True, multiple=VAE_FACTOR,
                        text=f"a positive multiple of {VAE_FACTOR} up to {MAX_SIDE}"),
    "lr": OPEN_FRACTION, "unet_lr": FRACTION, "text_encoder_lr": FRACTION, "ema_decay": OPEN_FRACTION,
    "caption_dropout": FRACTION, "network_dropout": FRACTION,
    "min_snr_gamma": Range(0, 1e4, above=True, text="above 0 (5 is usual)"), "noise_offset": Range(0, 10),
    "prior_loss_weight": Range(0, 1e4), "num_class_images": Range(0, MAX_IMAGES, whole=True),
    "alpha": Range(0, 1e6), "conv_alpha": Range(0, 1e6),
}


@dataclass(frozen=True)
class Preset:
    """The networks' sizes, the image size and the optimisation of both stages."""

    image_size: int
    unet: UNetConfig
    vae: VAEConfig
    clip: CLIPConfig
    vae_stage: StageConfig
    diffusion_stage: StageConfig


TINY_CLIP = CLIPConfig(width=64, layers=2, heads=1)
PRESETS = {
    # 64x64 images, 8x8x4 latents, about 8.5M parameters; trains in about 75 minutes on 2 CPU cores. Narrow
    # networks keep about SD v1's channels per GroupNorm group (4 to 16), not its 32 groups: one channel per
    # group would normalise every flat region to zero and leave no way to carry its colour.
    "tiny-shapes": Preset(
        image_size=64,
        unet=UNetConfig(model_channels=64, channel_mult=(1, 2), attention_levels=(0, 1), num_res_blocks=1,
                        num_heads=4, context_dim=TINY_CLIP.width, norm_groups=8),
        vae=VAEConfig(base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8),
        clip=TINY_CLIP,
        vae_stage=StageConfig(steps=5000, batch_size=16, lr=1e-3, warmup=100, ema_decay=0.995),
        diffusion_stage=StageConfig(steps=3000, batch_size=64, lr=7e-4, warmup=200, ema_decay=0.999),
    ),
    # 32x32 images and the smallest networks of the same architecture: for tests and smoke runs (seconds).
    "micro": Preset(
        image_size=32,
        unet=UNetConfig(model_channels=32, channel_mult=(1,), attention_levels=(0,), num_res_blocks=1, num_heads=2,
                        context_dim=TINY_CLIP.width),
        vae=VAEConfig(base_channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1),
        clip=CLIPConfig(width=64, layers=1, heads=1),
        vae_stage=StageConfig(steps=150, batch_size=8, lr=3e-3, warmup=10, ema_decay=0.9),
        diffusion_stage=StageConfig(steps=150, batch_size=16, lr=1e-3, warmup=10, ema_decay=0.9, pool=256),
    ),
    # The networks of SD v1 at full size (a GPU job): the configs' defaults.
    "sd-v1": Preset(
        image_size=512, unet=UNetConfig(), vae=VAEConfig(), clip=CLIPConfig(),
        vae_stage=StageConfig(steps=100_000, batch_size=8, lr=4.5e-6, warmup=1000, ema_decay=0.9999),
        diffusion_stage=StageConfig(steps=100_000, batch_size=32, lr=1e-4, warmup=10_000, ema_decay=0.9999),
    ),
}


# Training memory per pixel of each image of a batch, measured on the micro preset (32 channels: 5 kB per
# pixel for the VAE stage, 0.8 kB for the diffusion stage), scaled by the networks' widths; the diffusion
# stage also encodes its pool 32 images at a time (inference: about SD's decoder's 1100 numbers per pixel
# at 128 channels).
VAE_NUMBERS_PER_PIXEL_PER_CHANNEL = 40
UNET_NUMBERS_PER_PIXEL_PER_CHANNEL = 6
ENCODE_NUMBERS_PER_PIXEL_PER_CHANNEL = 9
ENCODE_BATCH = 32  # of `sd.objectives.encode_pool`


def training_memory(name: str, models: StableDiffusionModels, cfg: StageConfig) -> int:
    """Bytes that stage `name` needs at its batch size and the models' image size (estimate, float32)."""
    pixels, width = models.image_size ** 2, models.vae.config.base_channels
    if name == "vae":
        return 4 * cfg.batch_size * pixels * VAE_NUMBERS_PER_PIXEL_PER_CHANNEL * width
    train_pass = cfg.batch_size * pixels * UNET_NUMBERS_PER_PIXEL_PER_CHANNEL * models.unet.config.model_channels
    encode = min(ENCODE_BATCH, cfg.pool) * pixels * ENCODE_NUMBERS_PER_PIXEL_PER_CHANNEL * width
    return 4 * max(train_pass, encode)


def check_memory(name: str, models: StableDiffusionModels, cfg: StageConfig, device: torch.device) -> None:
    need, room = training_memory(name, models, cfg), memory_budget(device)
    if room is not None and need > room:
        raise InputError(f"the {name} stage at {models.image_size}x{models.image_size}, {cfg.batch_size} images "
                         f"per step, needs about {need / 2**30:.1f} GiB but this process can use "
                         f"{max(room, 0) / 2**30:.1f} GiB on {device.type}; lower --image-size or --batch-size")


# ---- the command ---------------------------------------------------------------------------------

def initial_models(args: argparse.Namespace, preset: Preset) -> StableDiffusionModels:
    """From --init (fine-tuning: SD 1.x and 2.x, whose family is checked from a .safetensors header before the
    load), or new networks of the preset's sizes, seeded."""
    if args.init is not None:
        return load_init(args.init, base_stage_fault)
    torch.manual_seed(args.seed)
    return StableDiffusionModels(clip=CLIPTextModel(preset.clip), vae=AutoencoderKL(preset.vae),
                                 unet=UNet(preset.unet), image_size=preset.image_size)


def load_init(path: Path, trainable) -> StableDiffusionModels:
    """The --init checkpoint, its family checked by `trainable` (an error's text or None) from a .safetensors
    header before the load, and again after it."""
    check_trainable(path, read_family(path) if Path(path).is_file() else None, trainable)
    models = load_checkpoint(path, device="cpu")
    check_trainable(path, models.family, trainable)
    return models


def check_trainable(path: Path, family: Family | None, trainable) -> None:
    """None: a family not known before loading."""
    fault = family is not None and trainable(family)
    if fault:
        raise InputError(f"--init {path} is an {family.title} checkpoint; {fault}")


def base_stage_fault(family: Family) -> str | None:
    """The base stages condition on one text encoder's hidden states: SDXL's two towers, pooled vector and
    micro-conditions are trained by the fine-tuning commands only."""
    if len(family.text_encoders) != 1 or family.micro_conditions:
        return ("the vae and diffusion stages train SD 1.x and 2.x models (one text encoder, no size "
                "conditioning): give an SD 1.x or 2.x checkpoint, or fine-tune it with lora, dreambooth or "
                "textual-inversion")
    return None


def dataset(args: argparse.Namespace, image_size: int):
    if args.data == "shapes":
        return CaptionedShapes(image_size, seed=args.seed)
    return CaptionFolder(args.data, image_size)


def words_of(data) -> tuple[str, ...]:
    if isinstance(data, CaptionedShapes):
        return tuple(vocabulary())
    return tuple(sorted({w for c in data.captions for w in words(c)}))


def with_flags(cfg: StageConfig, args: argparse.Namespace) -> StageConfig:
    """cfg with the optimisation flags given on the command line in place of its values."""
    given = {field: getattr(args, flag) for field, flag in STAGE_FLAGS.items() if getattr(args, flag, None) is not None}
    return dataclasses.replace(cfg, **given)


def stage_config(preset: Preset, name: str, args: argparse.Namespace) -> StageConfig:
    return with_flags(getattr(preset, f"{name}_stage"), args)


def train(args: argparse.Namespace) -> None:
    preset = PRESETS[args.preset]
    if args.prediction is not None:
        prediction_name(args.prediction, "--prediction")
    if Processes.from_environment().several:
        raise InputError(f"the {args.command} stage runs in one process; torchrun is for lora, dreambooth and "
                         f"textual-inversion: run {PROG} {args.command} without torchrun")
    stages = BASE_STAGES if args.command == "all" else (args.command,)
    folder = RunFolder(args, stages, [args.output], ".safetensors")
    folder.check()
    with folder.hold():
        folder.check()  # again, now that no other run can change the folder
        models = initial_models(args, preset)
        if args.prediction is None and args.init is not None:  # fine-tuning keeps what the model predicts
            args = argparse.Namespace(**{**vars(args), "prediction": SHORT[models.prediction_type]})
        if args.image_size:
            models.image_size = args.image_size
        for name in stages:
            check_memory(name, models, stage_config(preset, name, args), torch.device(args.device))
        data = dataset(args, models.image_size)
        for name in stages:
            models = run_stage(name, models, data, stage_config(preset, name, args), args, last=name == stages[-1])


def run_stage(name: str, models: StableDiffusionModels, data, cfg: StageConfig, args: argparse.Namespace,
              last: bool) -> StableDiffusionModels:
    """One stage, and the checkpoint it writes: --output after the last, else the VAE's hand-over."""
    run_dir = Path(args.run_dir)
    if name == "diffusion" and args.command == "all":  # the VAE stage's result, as a resumable hand-over
        models = load_checkpoint(run_dir / "vae.safetensors")
    stage = Stage(name, models, data, cfg, args)
    models = stage.run(args.resume)
    if args.init is None or models.vocabulary is not None:  # a model that knows only its training words
        models.vocabulary = tuple(sorted(set(models.vocabulary or ()) | set(words_of(data))))
    path = Path(args.output) if last else run_dir / "vae.safetensors"
    with saving(path, f"the training states in {run_dir} are kept"):
        stage.objective.write(models, path, torch.float16 if last and args.half else None)
    print(f"wrote {path}", file=sys.stderr)
    return models


# ---- fine-tuning ---------------------------------------------------------------------------------

FINE_TUNED = dict(warmup=0, ema_decay=None, caption_dropout=0.0, schedule="constant")  # kohya's defaults


@dataclass(frozen=True)
class FineTune:
    """A fine-tuning command: its objective, the output's suffix and the optimisation's defaults."""

    objective: Callable[[argparse.Namespace], Objective]
    cfg: StageConfig
    help: str


def dreambooth_objective(args: argparse.Namespace) -> Objective:
    check_identifier([args.instance_prompt] if args.instance_prompt else [], args.class_prompt)
    return LoRAObjective(args) if args.lora else FineTuneObjective(args)


FINE_TUNES = {
    "lora": FineTune(LoRAObjective, StageConfig(steps=1000, batch_size=1, lr=1e-4, **FINE_TUNED),
                     "train a LoRA (kohya's layout) on a checkpoint's UNet and text encoder(s)"),
    "dreambooth": FineTune(dreambooth_objective, StageConfig(steps=800, batch_size=1, lr=5e-6, **FINE_TUNED),
                           "teach a checkpoint a subject under a rare token, with prior preservation; the "
                           "whole UNet, or a LoRA with --lora"),
    "textual-inversion": FineTune(TextualInversionObjective,
                                  StageConfig(steps=2000, batch_size=1, lr=5e-3, **FINE_TUNED),
                                  "learn a new token's vectors (an embedding for --embedding and prompts)"),
}
LORA_LR = FINE_TUNES["lora"].cfg.lr  # dreambooth --lora's default


def fine_tune_trainable(family: Family) -> str | None:
    if family.kind != "text-to-image":
        return "fine-tuning takes a text-to-image model (not an inpainting model or a refiner)"
    return None


def fine_tune_config(args: argparse.Namespace) -> StageConfig:
    cfg = FINE_TUNES[args.command].cfg
    if args.command == "dreambooth" and args.lora:
        cfg = dataclasses.replace(cfg, lr=LORA_LR)
    return with_flags(cfg, args)


def fine_tune(args: argparse.Namespace) -> None:
    cfg = fine_tune_config(args)
    processes = Processes.from_environment()
    processes.share(cfg.batch_size)
    processes.join(args.device)
    try:
        args.unet_lr = cfg.lr if args.unet_lr is None else args.unet_lr
        args.text_encoder_lr = cfg.lr if args.text_encoder_lr is None else args.text_encoder_lr
        objective = FINE_TUNES[args.command].objective(args)
        folder = RunFolder(args, (args.command,), objective.outputs(args.output), ".safetensors")
        processes.agree(error_of(folder.check) if processes.main else None)
        with folder.hold() if processes.main else nullcontext():
            processes.agree(error_of(folder.check) if processes.main else None)  # now that the folder is held
            models = load_init(args.init, fine_tune_trainable)
            args.resolution = args.resolution or models.image_size
            if args.prediction is None:  # fine-tuning keeps what the model predicts
                args.prediction = SHORT[models.prediction_type]
            objective = FINE_TUNES[args.command].objective(args)
            buckets = bucket_options(args)
            read = functools.partial(FineTuneData, args.data, buckets, caption_extension=args.caption_extension,
                                     instance_caption=args.instance_prompt)
            captions = [item.caption for item in read().items]  # the folders checked before class images are made
            check_identifier(captions, args.class_prompt, "the instance caption")
            data = read(class_root=class_images(args, models, buckets, processes), class_caption=args.class_prompt)
            if processes.main:
                note(data.describe())
            for net in ("unet", "clip", "clip_g"):
                if getattr(models, net) is not None:
                    getattr(models, net).gradient_checkpointing = args.gradient_checkpointing
            objective.metadata = training_metadata(args, models, data, cfg)
            stage = Stage(args.command, models, data, cfg, args, objective, processes)
            models = stage.run(args.resume)
            if processes.main:
                path = Path(args.output)
                with saving(path, f"the training state in {args.run_dir} is kept"):
                    objective.write(models, path, torch.float16 if args.half else None)
                print(f"wrote {', '.join(map(str, objective.outputs(path)))}", file=sys.stderr)
    finally:
        processes.close()


def error_of(check: Callable[[], None]) -> str | None:
    """The message of the InputError `check` raises, None if it passes."""
    try:
        check()
    except InputError as e:
        return str(e)
    return None


def class_images(args: argparse.Namespace, models: StableDiffusionModels, buckets, processes: Processes) -> Path | None:
    """DreamBooth's class folder, topped up to --num-class-images by the base model (the main process makes
    them, the others wait)."""
    if args.class_prompt is None:
        return None
    folder = args.class_data or Path(args.run_dir) / "class-images"
    if processes.main:
        folder.mkdir(parents=True, exist_ok=True)
        pipe = StableDiffusion(models)
        ensure_class_images(pipe, args.class_prompt, folder, args.num_class_images, seed=args.seed,
                            size=(buckets.resolution, buckets.resolution), progress=not args.no_progress)
    processes.wait()
    return folder


# ---- the command line ----------------------------------------------------------------------------

STAGE_FLAGS = {"steps": "steps", "batch_size": "batch_size", "lr": "lr", "warmup": "warmup",
               "schedule": "lr_schedule", "ema_decay": "ema_decay", "caption_dropout": "caption_dropout"}


def common_flags() -> argparse.ArgumentParser:
    """The flags of every command: the run folder, the optimisation, the loss and the device."""
    p = CommandParser(add_help=False)
    p.add_argument("--run-dir", type=Path, required=True, help="folder for the training state, loss curve and samples")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the training state in --run-dir (--lr, "
                                                             "--steps and --batch-size may differ from the saved run's; "
                                                             "steps past the first run's schedule run at its last "
                                                             "learning rate)")
    again.add_argument("--overwrite", action="store_true", help="start over, replacing the training state in "
                                                                "--run-dir and --output (default: refuse)")
    p.add_argument("--prediction", metavar="v|epsilon", help="what the UNet learns to predict, the noise (epsilon) or "
                   "v (default: the --init model's, else epsilon)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the preset's or the command's)")
    p.add_argument("--batch-size", type=int, help="images per step, all processes together (default: the preset's "
                                                  "or the command's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's or the command's)")
    p.add_argument("--warmup", type=int, help="steps of linear warm-up to the peak learning rate (default: the "
                                              "preset's; 0 for fine-tuning)")
    p.add_argument("--lr-schedule", choices=SCHEDULES, help="the learning rate after the warm-up: cosine or linear "
                   "to a tenth of the peak at the last step, or constant (default: cosine for the stages, constant "
                   "for fine-tuning)")
    p.add_argument("--ema-decay", type=float, help="keep an exponential moving average of the trained weights and "
                   "write it (default: the preset's, none for fine-tuning)")
    p.add_argument("--caption-dropout", type=float, help="share of captions replaced by the empty prompt, for "
                   "classifier-free guidance (default: 0.1 for the stages, 0 for fine-tuning)")
    p.add_argument("--min-snr-gamma", type=float, help="weight each image's loss by min(SNR, gamma)/SNR (Hang et "
                                                       "al., 2023; 5 is usual) (default: off)")
    p.add_argument("--noise-offset", type=float, default=0.0, help="add offset * N(0,1) per image and channel to "
                                                                   "the noise (about 0.1 is usual) (default: 0)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute the blocks' activations in the "
                                                                        "backward pass: less memory, slower")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: 0)")
    p.add_argument("--save-every", type=int, default=250, help="save the training state every N steps (default: 250)")
    p.add_argument("--sample-every", type=int, help="write sample images every N steps (default: 1000 for the "
                                                    "stages; for fine-tuning at the end if --sample-prompts is given)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available; under torchrun each process its own "
                                    "GPU)")
    p.add_argument("--bf16", action="store_true", help="on CUDA: bf16 autocast (default: fp32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def stage_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=PRESETS, default="tiny-shapes",
                   help="network sizes, image size and optimisation (default: tiny-shapes)")
    p.add_argument("--init", type=Path, help="start from this checkpoint (its networks' sizes are used); required "
                                             "for the diffusion stage alone (default: new networks)")
    p.add_argument("--data", default="shapes", help="'shapes' (the generated captioned-shapes set) or a folder of "
                                                    "name.png + name.txt pairs (default: shapes)")
    p.add_argument("--output", type=Path, required=True, help="the checkpoint to write (.safetensors)")
    p.add_argument("--half", action="store_true", help="write the output checkpoint in fp16 (half the size)")
    p.add_argument("--text-encoder", choices=("train", "freeze"),
                   help="diffusion stage: train the text encoder jointly, or keep it frozen (default: train from "
                        "scratch, freeze with --init)")
    p.add_argument("--image-size", type=int, help="train at this size, a multiple of 8 (default: the preset's, or "
                                                  "that of --init)")


def data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", type=Path, required=True, help="the checkpoint to fine-tune (SD 1.x, 2.x or SDXL)")
    p.add_argument("--data", type=Path, required=True,
                   help="the images: kohya's folders '<repeats>_<caption>' (e.g. '10_sks dog': 10 repeats, caption "
                        "'sks dog' for images without a caption file), or one folder of images with captions")
    p.add_argument("--caption-extension", default=".txt", help="caption files beside the images (default: .txt)")
    p.add_argument("--instance-prompt", help="the caption of images without a caption file, e.g. 'a photo of sks "
                                             "dog'")
    p.add_argument("--resolution", type=int, help="training area resolution x resolution (default: the model's "
                                                  "size: 512 SD 1.x, 768 SD 2.x-v, 1024 SDXL)")
    p.add_argument("--no-buckets", action="store_true", help="centre-crop every image to a square instead of "
                                                             "aspect-ratio buckets")
    p.add_argument("--min-bucket-side", type=int, help="smallest bucket side (default: resolution / 2)")
    p.add_argument("--max-bucket-side", type=int, help="largest bucket side (default: resolution x 2)")
    p.add_argument("--bucket-step", type=int, default=64, help="bucket sides are multiples of this (default: 64)")
    p.add_argument("--shuffle-tags", action="store_true", help="shuffle each caption's comma-separated tags at "
                                                               "every step")
    p.add_argument("--keep-tokens", type=int, default=0, help="with --shuffle-tags: keep the first N tags in place "
                                                              "(default: 0)")
    p.add_argument("--sample-prompts", type=Path, help="a text file of prompts, one per line, drawn every "
                                                       "--sample-every steps (default: the first captions)")


def prior_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--class-prompt", help="prior preservation: the class's prompt, e.g. 'a photo of dog'; class "
                                          "images are trained on with --prior-loss-weight")
    p.add_argument("--class-data", type=Path, help="the class images (kohya's '1_dog' folders, or a folder of "
                                                   "images), topped up by the base model to --num-class-images "
                                                   "(default: RUN_DIR/class-images)")
    p.add_argument("--num-class-images", type=int, default=100, help="class images to have (default: 100)")
    p.add_argument("--prior-loss-weight", type=float, default=1.0, help="weight of the class images' loss "
                                                                        "(default: 1)")


def network_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, default=4, help="LoRA rank of the linear layers (kohya's network_dim) "
                                                       "(default: 4)")
    p.add_argument("--alpha", type=float, default=1.0, help="LoRA alpha: the change is scaled by alpha / rank "
                                                            "(default: 1)")
    p.add_argument("--conv-dim", type=int, help="LoCon: also the 3x3 convolutions of the res blocks and "
                                                "resamplers, at this rank (default: off)")
    p.add_argument("--conv-alpha", type=float, default=1.0, help="LoCon alpha (default: 1)")
    p.add_argument("--network-dropout", type=float, default=0.0, help="dropout on each LoRA layer's input "
                                                                      "(default: 0)")
    p.add_argument("--unet-lr", type=float, help="the UNet's LoRA learning rate (default: --lr)")
    p.add_argument("--text-encoder-lr", type=float, help="the text encoders' LoRA learning rate, 0 = not trained "
                                                         "(default: --lr)")
    p.add_argument("--save-peft", action="store_true", help="also write the LoRA in diffusers/PEFT layout "
                                                            "(NAME.peft.safetensors)")


def command_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    common = common_flags()
    for name, what in STAGE_COMMANDS.items():
        stage_flags(commands.add_parser(name, parents=[common], help=what, description=what))
    for name, spec in FINE_TUNES.items():
        sub = commands.add_parser(name, parents=[common], help=spec.help, description=spec.help,
                                  epilog=defaults_shown(spec.cfg, name))
        data_flags(sub)
        sub.add_argument("--output", type=Path, required=True, help=OUTPUT_HELP[name])
        if name != "textual-inversion":
            prior_flags(sub)
            network_flags(sub)
        if name == "dreambooth":
            sub.add_argument("--lora", action="store_true", help="train a LoRA (the network flags) instead of the "
                                                                 "whole UNet")
            sub.add_argument("--half", action="store_true", help="write the checkpoint in fp16")
            sub.add_argument("--text-encoder", choices=("train", "freeze"), default="freeze",
                             help="without --lora: train the text encoder too (default: freeze)")
        if name == "textual-inversion":
            textual_inversion_flags(sub)
    return p


STAGE_COMMANDS = {"vae": "the autoencoder and its latent scale",
                  "diffusion": "the UNet (and text encoder) on the frozen VAE of --init",
                  "all": "vae, then diffusion"}
OUTPUT_HELP = {"lora": "the LoRA file to write (.safetensors, kohya's layout)",
               "dreambooth": "the checkpoint (.safetensors), or with --lora the LoRA file",
               "textual-inversion": "the embedding to write (.safetensors; NAME.pt in AUTOMATIC1111's layout "
                                    "beside it)"}


def defaults_shown(cfg: StageConfig, name: str) -> str:
    """The optimisation numbers a fine-tune command uses when its flags are not given."""
    lr = f"--lr {cfg.lr:g}" + (f" ({LORA_LR:g} with --lora)" if name == "dreambooth" else "")
    return (f"defaults: --steps {cfg.steps}, --batch-size {cfg.batch_size}, {lr}, --warmup {cfg.warmup}, "
            f"--lr-schedule {cfg.schedule}, --caption-dropout {cfg.caption_dropout:g}, "
            + (f"--ema-decay {cfg.ema_decay:g}" if cfg.ema_decay else "no EMA"))


FINE_TUNE_DEFAULTS = dict(class_prompt=None, class_data=None, num_class_images=0, prior_loss_weight=1.0,
                          unet_lr=None, text_encoder_lr=None, half=False, text_encoder="freeze")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = command_parser().parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.command in STAGE_COMMANDS:
        args.text_encoder = args.text_encoder or ("freeze" if args.init else "train")
        args.sample_every = 1000 if args.sample_every is None else args.sample_every
        if args.command == "diffusion" and args.init is None:
            raise InputError("the diffusion stage alone needs --init CHECKPOINT (whose VAE it trains on); or run 'all'")
    else:
        args.sample_prompt_list = read_prompts(args.sample_prompts) if args.sample_prompts else None
        for flag, value in FINE_TUNE_DEFAULTS.items():  # the flags a fine-tune command lacks
            vars(args).setdefault(flag, value)
        if args.command == "textual-inversion" and args.caption_dropout:
            raise InputError("--caption-dropout does not go with textual-inversion: every caption must use the "
                             "token being learned; leave it out")
        if args.sample_every is None and args.sample_prompts:
            args.sample_every = MAX_STEPS  # at the end only
    for name, bounds in FLAG_RANGES.items():
        value = getattr(args, name, None)
        if value is not None and not bounds.holds(value):
            raise InputError(f"--{name.replace('_', '-')} must be {bounds.says()}, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    def body():
        args = parse_args(argv)
        (train if args.command in STAGE_COMMANDS else fine_tune)(args)
    return run_command(body, out_of_memory="lower --batch-size",
                       interrupted="the last saved training state is intact: continue with --resume")


if __name__ == "__main__":
    sys.exit(main())
