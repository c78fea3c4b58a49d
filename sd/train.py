"""Training Stable Diffusion's three networks, from scratch or from a checkpoint (Rombach et al., 2022).

Latent diffusion trains in two stages, each one objective of `sd/objectives.py` run by the same loop:
- `vae`: the KL autoencoder on an L1 reconstruction loss plus a small KL term; then the latent scale is
  measured on the data as 1 / std of the latents (LDM's `scale_by_std`).
- `diffusion`: the UNet on the epsilon- (Ho et al., 2020) or v-prediction MSE (`--prediction v`, Salimans &
  Ho, 2022) under SD v1's noise schedule
  (`NoiseSchedule`), so every sampler works unchanged, on latents the frozen VAE encodes once. From
  scratch the text encoder trains jointly (as the LDM paper's own text-to-image model); from a
  checkpoint it stays frozen unless asked. 10% of captions are dropped to "", the prompt the
  pipeline feeds for classifier-free guidance.
The loop (`Stage`) uses AdamW with a linear warm-up and a cosine decay, gradient clipping and an EMA of the
weights; the EMA copy is what is written. Every random draw of step k comes from a generator seeded with
(seed, stage, k), and sample i of the data is a pure function of i, so `--resume` continues a run
exactly. Each stage keeps, in the run folder, its training state (`<stage>-state.pt`), its loss
(`<stage>-loss.csv` and `.png`) and sample grids (`<stage>-samples-<step>.png`).

    python -m sd.train all --preset tiny-shapes --run-dir runs/tiny-shapes --output data/tiny-shapes.safetensors --half
"""

import argparse
import copy
import csv
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import nn
from tqdm.auto import tqdm

from sd.checkpoint import StableDiffusionModels, load_checkpoint, save_checkpoint
from sd.cli import CommandParser, run_command
from sd.clip import CLIPConfig, CLIPTextModel
from sd.datasets import CaptionedShapes, CaptionFolder, vocabulary
from sd.errors import InputError, SDError
from sd.files import write_atomically
from sd.paths import writable_output
from sd.objectives import OBJECTIVES, Objective
from sd.prediction import SHORT, prediction_name
from sd.prompt import words
from sd.unet import UNet, UNetConfig
from sd.vae import AutoencoderKL, VAEConfig

PROG = "python -m sd.train"
STAGES = ("vae", "diffusion")


@dataclass(frozen=True)
class StageConfig:
    """Optimisation of one stage."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    kl_weight: float = 1e-6  # vae: weight of the KL term, per latent number against the L1 per pixel number
    caption_dropout: float = 0.1  # diffusion: share of captions replaced by ""
    pool: int = 8192  # diffusion: images of an endless dataset encoded once and reused


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


class TrainingError(SDError):
    """Training cannot go on: a non-finite loss, or a --resume state that does not fit the run."""


# ---- the pieces ----------------------------------------------------------------------------------

def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The generator of every random draw of one step: the same on resume as in an uninterrupted run."""
    return torch.Generator().manual_seed(seed * 1_000_003 + STAGES.index(stage) * 100_000_019 + step)


def learning_rate(cfg: StageConfig, step: int) -> float:
    """Linear warm-up to cfg.lr, then a cosine decay to a tenth of it at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of a model's parameters (Polyak averaging); `model` is the averaged copy."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short memory at first, as the CompVis LitEma
        for ema, p in zip(self.model.parameters(), model.parameters()):
            ema.lerp_(p.detach(), 1 - decay)


# ---- progress files ------------------------------------------------------------------------------

def draw_loss_curve(rows: list[tuple[int, float]], path: Path, title: str) -> None:
    """The loss against the step on a log scale, smoothed, as a PNG drawn with PIL."""
    width, height, margin = 640, 360, 48
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    steps = [s for s, _ in rows]
    smoothed, value = [], None
    for _, loss in rows:
        value = loss if value is None else 0.95 * value + 0.05 * loss
        smoothed.append(math.log10(max(value, 1e-12)))
    lo, hi = min(smoothed), max(smoothed)
    hi = hi if hi > lo else lo + 1

    def xy(step: int, log_loss: float) -> tuple[float, float]:
        x = margin + (width - 2 * margin) * (step - steps[0]) / max(1, steps[-1] - steps[0])
        return x, height - margin - (height - 2 * margin) * (log_loss - lo) / (hi - lo)

    draw.rectangle([margin, margin, width - margin, height - margin], outline="gray")
    draw.line([xy(s, v) for s, v in zip(steps, smoothed)], fill="blue", width=2)
    draw.text((margin, 12), f"{title}: loss (log scale, smoothed) at steps {steps[0]}-{steps[-1]}", fill="black")
    for value in (lo, hi):
        draw.text((4, xy(steps[0], value)[1] - 6), f"{10 ** value:.3g}", fill="black")
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


# ---- one stage -----------------------------------------------------------------------------------

class Stage:
    """One stage of training, the loop around an objective (by default the stage name's in `OBJECTIVES`):
    `run()` takes the networks the objective trains from the saved step (0 without --resume) to
    `cfg.steps` steps, saving the state every `save_every` steps, and returns the models with the EMA
    weights in place."""

    def __init__(self, name: str, models: StableDiffusionModels, data, cfg: StageConfig, args: argparse.Namespace,
                 objective: Objective | None = None):
        self.name, self.models, self.data, self.cfg, self.args = name, models, data, cfg, args
        self.objective = objective or OBJECTIVES[name].from_args(args)
        self.device = torch.device(args.device)
        self.run_dir = Path(args.run_dir)
        self.state_path = self.run_dir / f"{name}-state.pt"
        self.loss_path = self.run_dir / f"{name}-loss.csv"
        self.trained = list(self.objective.trains)
        for net in ("unet", "vae", "clip"):
            getattr(models, net).to(self.device).requires_grad_(net in self.trained).train(net in self.trained)
        self.params = [p for net in self.trained for p in getattr(models, net).parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = {net: EMA(getattr(models, net), cfg.ema_decay) for net in self.trained}
        self.identity = json.dumps({"stage": name, "cfg": dataclasses.asdict(cfg), "seed": args.seed,
                                    "trained": self.trained, "data": str(args.data),
                                    "configs": {n: dataclasses.asdict(getattr(models, n).config)
                                                for n in ("unet", "vae", "clip")},
                                    **self.objective.identity()}, sort_keys=True)
        self.step = 0
        self.losses: list[tuple[int, float]] = []
        self.autocast = torch.autocast("cuda", torch.bfloat16, enabled=args.bf16 and self.device.type == "cuda")

    # -- state ---------------------------------------------------------------------------------------

    def save_state(self) -> None:
        state = {"identity": self.identity, "step": self.step, "optimizer": self.optimizer.state_dict(),
                 "models": {n: getattr(self.models, n).state_dict() for n in self.trained},
                 "ema": {n: e.model.state_dict() for n, e in self.ema.items()},
                 "scale_factor": self.models.scale_factor}
        write_atomically(self.state_path, lambda tmp: torch.save(state, tmp))
        rows = self.losses
        write_atomically(self.loss_path, lambda tmp: self.write_csv(tmp, rows))
        if len(rows) > 1:
            draw_loss_curve(rows, self.loss_path.with_suffix(".png"), f"{self.name} stage")

    @staticmethod
    def write_csv(path: Path, rows: list[tuple[int, float]]) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "loss"])
            writer.writerows((s, f"{loss:.6g}") for s, loss in rows)

    def load_state(self) -> None:
        try:
            state = torch.load(self.state_path, map_location=self.device, weights_only=True)
            identity = state["identity"]
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
            raise TrainingError(f"cannot read the training state {self.state_path} ({type(e).__name__}); it is "
                                f"not a state written by {PROG}: start without --resume") from None
        if identity != self.identity:
            ours, theirs = json.loads(self.identity), json.loads(identity)
            differs = [k for k in sorted(ours.keys() | theirs.keys()) if ours.get(k) != theirs.get(k)]
            raise TrainingError(f"--resume: {self.state_path} was written by a run with another configuration "
                                f"(differs in: {', '.join(differs)}); resume with the same flags, or use another "
                                f"--run-dir")
        for net in self.trained:
            getattr(self.models, net).load_state_dict(state["models"][net])
            self.ema[net].model.load_state_dict(state["ema"][net])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.models.scale_factor = state["step"], state["scale_factor"]
        if self.loss_path.is_file():
            with open(self.loss_path, newline="") as f:
                self.losses = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)][:self.step]

    # -- the loop ------------------------------------------------------------------------------------

    def run(self, resume: bool) -> StableDiffusionModels:
        if resume and self.state_path.is_file():
            self.load_state()
        self.prepare()
        bar = tqdm(range(self.step, self.cfg.steps), initial=self.step, total=self.cfg.steps, desc=self.name,
                   disable=self.args.no_progress)
        for step in bar:
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(self.cfg, step)
            with self.autocast:
                loss = self.loss(step, step_generator(self.args.seed, self.name, step))
            if not torch.isfinite(loss):
                raise TrainingError(f"the {self.name} loss became {loss.item()} at step {step}; the last good "
                                    f"state (step {self.step}) is kept in {self.state_path}: lower --lr and "
                                    f"continue with --resume")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.optimizer.step()
            for net, ema in self.ema.items():
                ema.update(getattr(self.models, net), step)
            self.losses.append((step, loss.item()))
            bar.set_postfix(loss=f"{loss.item():.4f}")
            done = step + 1
            if done % self.args.save_every == 0 or done == self.cfg.steps:
                self.step = done
                self.save_state()
            if done % self.args.sample_every == 0 or done == self.cfg.steps:
                self.sample(done)
        for net, ema in self.ema.items():
            getattr(self.models, net).load_state_dict(ema.model.state_dict())
            getattr(self.models, net).requires_grad_(False).eval()
        self.objective.finish(self.models)
        return self.models

    def with_ema(self) -> StableDiffusionModels:
        """The models with the EMA copies of the trained networks, for samples."""
        return dataclasses.replace(self.models, **{n: e.model for n, e in self.ema.items()})

    # -- the objective -------------------------------------------------------------------------------

    def prepare(self) -> None:
        self.objective.prepare(self.models, self.data, self.cfg, self.device)

    def loss(self, step: int, gen: torch.Generator) -> torch.Tensor:
        return self.objective.loss(step, gen)

    def sample(self, step: int) -> None:
        self.objective.sample(self.with_ema(), self.run_dir / f"{self.name}-samples-{step:06d}.png")


# ---- the command ---------------------------------------------------------------------------------

def initial_models(args: argparse.Namespace, preset: Preset) -> StableDiffusionModels:
    """From --init (fine-tuning), or new networks of the preset's sizes, seeded."""
    if args.init is not None:
        return load_checkpoint(args.init, device="cpu")
    torch.manual_seed(args.seed)
    return StableDiffusionModels(clip=CLIPTextModel(preset.clip), vae=AutoencoderKL(preset.vae),
                                 unet=UNet(preset.unet), image_size=preset.image_size)


def dataset(args: argparse.Namespace, image_size: int):
    if args.data == "shapes":
        return CaptionedShapes(image_size, seed=args.seed)
    return CaptionFolder(args.data, image_size)


def words_of(data) -> tuple[str, ...]:
    if isinstance(data, CaptionedShapes):
        return tuple(vocabulary())
    return tuple(sorted({w for c in data.captions for w in words(c)}))


def train(args: argparse.Namespace) -> None:
    preset = PRESETS[args.preset]
    if args.prediction is not None:
        prediction_name(args.prediction, "--prediction")
    models = initial_models(args, preset)
    if args.prediction is None and args.init is not None:  # fine-tuning keeps what the model predicts
        args = argparse.Namespace(**{**vars(args), "prediction": SHORT[models.prediction_type]})
    if args.image_size:
        models.image_size = args.image_size
    data = dataset(args, models.image_size)
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    stages = STAGES if args.stage == "all" else (args.stage,)
    for name in stages:
        cfg = getattr(preset, f"{name}_stage")
        cfg = dataclasses.replace(cfg, **{k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                                             ("lr", args.lr)) if v is not None})
        if name == "diffusion" and args.stage == "all":  # the VAE stage's result, as a resumable hand-over
            models = load_checkpoint(Path(args.run_dir) / "vae.safetensors")
        models = Stage(name, models, data, cfg, args).run(args.resume)
        if args.init is None or models.vocabulary is not None:  # a model that knows only its training words
            models.vocabulary = tuple(sorted(set(models.vocabulary or ()) | set(words_of(data))))
        last = name == stages[-1]
        path = Path(args.output) if last else Path(args.run_dir) / "vae.safetensors"
        save_checkpoint(models, path, torch.float16 if last and args.half else None)
        print(f"wrote {path}", file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("vae", "diffusion", "all"),
                   help="vae: the autoencoder and its latent scale; diffusion: the UNet (and text encoder) on the "
                        "frozen VAE of --init; all: vae, then diffusion")
    p.add_argument("--preset", choices=PRESETS, default="tiny-shapes",
                   help="network sizes, image size and optimisation (default: tiny-shapes)")
    p.add_argument("--init", type=Path, help="start from this checkpoint (fine-tuning; its networks' sizes are "
                                             "used); required for the diffusion stage alone (default: new networks)")
    p.add_argument("--data", default="shapes", help="'shapes' (the generated captioned-shapes set) or a folder of "
                                                    "name.png + name.txt pairs (default: shapes)")
    p.add_argument("--run-dir", type=Path, required=True, help="folder for the training state, loss curve and samples")
    p.add_argument("--output", type=Path, required=True, help="the checkpoint to write (.safetensors)")
    p.add_argument("--half", action="store_true", help="write the output checkpoint in fp16 (half the size)")
    p.add_argument("--resume", action="store_true", help="continue from the training state in --run-dir")
    p.add_argument("--text-encoder", choices=("train", "freeze"),
                   help="diffusion stage: train the text encoder jointly, or keep it frozen (default: train from "
                        "scratch, freeze with --init)")
    p.add_argument("--prediction", metavar="v|epsilon", help="diffusion stage: what the UNet learns to predict, "
                   "the noise (epsilon) or v (default: the --init model's, else epsilon)")
    p.add_argument("--steps", type=int, help="steps of each stage run (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="images per step (default: the preset's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    p.add_argument("--image-size", type=int, help="train at this size, a multiple of 8 (default: the preset's, or "
                                                  "that of --init)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and every random draw (default: 0)")
    p.add_argument("--save-every", type=int, default=250, help="save the training state every N steps (default: 250)")
    p.add_argument("--sample-every", type=int, default=1000, help="write a sample grid every N steps (default: 1000)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--bf16", action="store_true", help="on CUDA: bf16 autocast (default: fp32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.text_encoder = args.text_encoder or ("freeze" if args.init else "train")
    if args.stage == "diffusion" and args.init is None:
        raise InputError("the diffusion stage alone needs --init CHECKPOINT (whose VAE it trains on); or run 'all'")
    writable_output(args.output, "--output", ".safetensors", made=args.run_dir)
    for name in ("steps", "batch_size", "save_every", "sample_every", "image_size"):
        value = getattr(args, name)
        if value is not None and (value < 1 or (name == "image_size" and value % 8)):
            kind = "multiple of 8" if name == "image_size" else "whole number"
            raise InputError(f"--{name.replace('_', '-')} must be a positive {kind}, got {value}")
    if args.lr is not None and not (0 < args.lr < 1):
        raise InputError(f"--lr must be between 0 and 1, got {args.lr}")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: train(parse_args(argv)), out_of_memory="lower --batch-size",
                       interrupted="the last saved training state is intact: continue with --resume")


if __name__ == "__main__":
    sys.exit(main())
