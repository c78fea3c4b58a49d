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

The run folder's policy (`RunFolder`), checked before any model is built: one run at a time holds it (a
lock file), a saved state or an existing --output is replaced only with --overwrite (or continued with
--resume), and every path the run will write is checked first. A resume may change --lr, --steps and
--batch-size (`RESUMABLE`: lower the learning rate after a NaN loss, extend a finished run), nothing else.

    python -m sd.train all --preset tiny-shapes --run-dir runs/tiny-shapes --output data/tiny-shapes.safetensors --half
"""

import argparse
import copy
import csv
import dataclasses
import json
import math
import os
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors import SafetensorError
from torch import nn
from tqdm.auto import tqdm

from sd.checkpoint import StableDiffusionModels, load_checkpoint, read_family, save_checkpoint
from sd.cli import CommandParser, note, run_command
from sd.clip import CLIPConfig, CLIPTextModel
from sd.datasets import CaptionedShapes, CaptionFolder, vocabulary
from sd.devices import memory_budget
from sd.distributed import Processes
from sd.errors import InputError, SDError
from sd.families import Family
from sd.files import write_atomically
from sd.paths import writable_folder, writable_output
from sd.objectives import OBJECTIVES, Objective
from sd.prediction import SHORT, prediction_name
from sd.prompt import words
from sd.safe_pickle import load_pickle_checkpoint
from sd.tensor_checks import structure_fault, value_fault
from sd.unet import UNet, UNetConfig
from sd.vae import AutoencoderKL, VAEConfig

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

PROG = "python -m sd.train"
STAGES = ("vae", "diffusion")
NETWORKS = ("unet", "vae", "clip", "clip_g")  # the fields of StableDiffusionModels that are networks
SEED_FACTOR, STAGE_FACTOR = 1_000_003, 100_000_019  # of `step_generator`
MAX_STEPS = 10**9
MAX_SEED = (2**64 - 1 - STAGE_FACTOR * (len(STAGES) - 1) - MAX_STEPS) // SEED_FACTOR  # every step's seed fits
LIMITS = {"steps": (1, MAX_STEPS), "batch_size": (1, 65536), "save_every": (1, None), "sample_every": (1, None),
          "image_size": (8, None), "seed": (0, MAX_SEED)}  # the integer flags' ranges, None: no upper bound
RESUMABLE = ("lr", "steps", "batch_size", "schedule_steps")  # the StageConfig fields a --resume may change
LOCK_NAME = "train.lock"
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)  # what torch.save and safetensors raise on a full disk


@dataclass(frozen=True)
class StageConfig:
    """Optimisation of one stage."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float | None = 0.999  # None: no average, the trained weights are the result
    kl_weight: float = 1e-6  # vae: weight of the KL term, per latent number against the L1 per pixel number
    caption_dropout: float = 0.1  # diffusion: share of captions replaced by ""
    pool: int = 8192  # diffusion: images of an endless dataset encoded once and reused
    schedule: str = "cosine"  # the learning rate after the warm-up (`SCHEDULES`)
    schedule_steps: int | None = None  # the steps the schedule spans: the first run's (None: steps)


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


class SaveError(OSError):
    """A file of the run could not be written (a full disk, say); the message says what was kept."""


@contextmanager
def saving(path: Path, kept: str, errors: tuple = WRITE_ERRORS) -> Iterator[None]:
    """Writing `path`; a failure is a `SaveError` in one line that says what was kept and what to do."""
    try:
        yield
    except errors as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise SaveError(f"cannot write {path} ({reason}); {kept}: free some space, then continue with "
                        f"--resume") from None


# ---- the pieces ----------------------------------------------------------------------------------

def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The generator of every random draw of one step: the same on resume as in an uninterrupted run."""
    return torch.Generator().manual_seed(seed * SEED_FACTOR + STAGES.index(stage) * STAGE_FACTOR + step)


def schedule_factor(cfg: StageConfig, step: int) -> float:
    """The learning rate of `step` as a share of the peak: a linear warm-up over cfg.warmup steps, then
    cfg.schedule (`SCHEDULES`) over the steps up to cfg.schedule_steps; a run extended past those (--resume
    --steps MORE) goes on at the schedule's last rate."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    total = cfg.schedule_steps or cfg.steps
    progress = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return SCHEDULES[cfg.schedule](progress)


SCHEDULES = {  # after the warm-up: the share of the peak rate at progress 0..1 through the run
    "cosine": lambda p: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)),  # to a tenth of the peak
    "linear": lambda p: 1 - 0.9 * p,  # to a tenth of the peak
    "constant": lambda p: 1.0,
}


class EMA:
    """Exponential moving average (Polyak averaging) of the trained parameters, by name."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short memory at first, as the CompVis LitEma
        for name, p in params.items():
            self.shadow[name].lerp_(p.detach(), 1 - decay)


def trained_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of `module` that train, by name: the whole network, or its LoRA layers' down and up."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


@contextmanager
def swapped_in(params: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> Iterator[None]:
    """`values` in place of `params` for a while (samples drawn with the averaged weights)."""
    with torch.no_grad():
        kept = {name: p.detach().clone() for name, p in params.items()}
        for name, p in params.items():
            p.copy_(values[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(kept[name])


# ---- training states -----------------------------------------------------------------------------

def damaged_state(path: Path, what: str) -> TrainingError:
    return TrainingError(f"--resume: {path} is not a training state written by {PROG} ({what}); start over with "
                         f"--overwrite, or use another --run-dir")


def read_state(path: Path) -> dict:
    """A saved state whose parts are of the kinds `Stage.save_state` writes (the tensors are checked later),
    read by the restricted unpickler: no code runs and nothing is allocated beyond what the file could hold."""
    if not path.is_file():
        raise damaged_state(path, "it is not a file")
    try:
        state = load_pickle_checkpoint(path, "training state")
    except SDError as e:
        raise damaged_state(path, f"unreadable: {str(e).removesuffix('.')}") from None
    kinds = {"identity": str, "step": int, "optimizer": dict, "models": dict, "ema": dict, "scale_factor": float}
    if not isinstance(state, dict):
        raise damaged_state(path, f"it holds a {type(state).__name__}, not a dict")
    wrong = [k for k, kind in kinds.items() if not isinstance(state.get(k), kind) or isinstance(state[k], bool)]
    if wrong:
        raise damaged_state(path, f"missing or wrong: {', '.join(wrong)}")
    try:
        identity = json.loads(state["identity"])
    except ValueError:
        identity = None
    if not isinstance(identity, dict) or not isinstance(identity.get("cfg"), dict):
        raise damaged_state(path, "its identity is not one of a run")
    if not (0 < state["step"] <= MAX_STEPS and math.isfinite(state["scale_factor"]) and state["scale_factor"] > 0):
        raise damaged_state(path, f"step {state['step']}, scale factor {state['scale_factor']}")
    return state


def check_weights(path: Path, part: str, saved, wanted: dict[str, torch.Tensor]) -> None:
    """`saved` must hold the trained tensors `wanted`: the same names, and dense finite tensors of their
    shapes and dtypes."""
    if not isinstance(saved, dict):
        raise damaged_state(path, f"no {part}")
    if saved.keys() != wanted.keys():
        missing = sorted(wanted.keys() - saved.keys()) or sorted(saved.keys() - wanted.keys())
        raise damaged_state(path, f"{part} has other weights than the network: {missing[0]} and "
                                  f"{len(missing) - 1} more")
    for key, ref in wanted.items():
        t = saved[key]
        fault = structure_fault(t) or (t.shape != ref.shape or t.dtype != ref.dtype) and \
            f"is not a {ref.dtype} tensor of shape {tuple(ref.shape)}"
        if not fault and t.is_floating_point():
            fault = value_fault(t, min_dim=0)
        if fault:
            raise damaged_state(path, f"{part}.{key} {fault}")


def fixed(identity: dict, key: str):
    """identity[key] as far as a resume must keep it: "cfg" without its `RESUMABLE` fields."""
    value = identity.get(key)
    if key == "cfg" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in RESUMABLE}
    return value


def read_losses(path: Path, step: int) -> list[tuple[int, float]]:
    """The loss log's rows before `step`."""
    try:
        with open(path, newline="") as f:
            return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)][:step]
    except (OSError, ValueError, KeyError, TypeError, csv.Error) as e:
        raise TrainingError(f"--resume: cannot read the loss log {path} ({type(e).__name__}); remove it (the "
                            f"log then starts again at the saved step) and resume again") from None


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
    `run()` trains what the objective attaches (whole networks, LoRA layers, new token vectors) from the saved
    step (0 without --resume) to `cfg.steps` steps, saving the state every `save_every` steps, and returns the
    models with the averaged weights (if any) in place. Under torchrun every process runs it; only the main
    one writes."""

    def __init__(self, name: str, models: StableDiffusionModels, data, cfg: StageConfig, args: argparse.Namespace,
                 objective: Objective | None = None, processes: Processes = Processes()):
        self.name, self.models, self.data, self.cfg, self.args = name, models, data, cfg, args
        self.processes = processes
        self.objective = objective or OBJECTIVES[name].from_args(args)
        self.objective.processes = processes
        self.device = processes.device(args.device)
        self.run_dir = Path(args.run_dir)
        self.state_path = self.run_dir / f"{name}-state.pt"
        self.loss_path = self.run_dir / f"{name}-loss.csv"
        for net in NETWORKS:
            if getattr(models, net, None) is not None:
                getattr(models, net).to(self.device)
        parts = self.objective.attach(models)
        self.trained = list(parts)
        self.params = {part: trained_parameters(module) for part, module in parts.items()}
        self.peaks = []  # each optimizer group's peak learning rate; parts of one rate share a group
        groups = []
        for part, lr in self.objective.learning_rates(cfg.lr).items():
            if lr not in self.peaks:
                self.peaks.append(lr)
                groups.append({"params": [], "lr": lr})
            groups[self.peaks.index(lr)]["params"] += self.params[part].values()
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = EMA(self.flat(), cfg.ema_decay) if cfg.ema_decay else None
        self.identity = json.dumps({"stage": name, "cfg": dataclasses.asdict(cfg), "seed": args.seed,
                                    "trained": self.trained, "data": str(args.data),
                                    "configs": {n: dataclasses.asdict(getattr(models, n).config)
                                                for n in ("unet", "vae", "clip")},
                                    **self.objective.identity()}, sort_keys=True)
        self.step = 0
        self.losses: list[tuple[int, float]] = []
        self.autocast = torch.autocast("cuda", torch.bfloat16, enabled=args.bf16 and self.device.type == "cuda")

    def flat(self) -> dict[str, nn.Parameter]:
        """Every trained parameter, named part.name."""
        return {f"{part}.{name}": p for part, params in self.params.items() for name, p in params.items()}

    def by_part(self, flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        return {part: {name: flat[f"{part}.{name}"] for name in params} for part, params in self.params.items()}

    # -- state ---------------------------------------------------------------------------------------

    def save_state(self, step: int) -> None:
        """The state at `step` (self.step becomes it once written), then the loss CSV and curve."""
        state = {"identity": self.identity, "step": step, "optimizer": self.optimizer.state_dict(),
                 "models": {part: {n: p.detach() for n, p in params.items()} for part, params in self.params.items()},
                 "ema": self.by_part(self.ema.shadow) if self.ema else {},
                 "scale_factor": self.models.scale_factor}
        with saving(self.state_path, self.kept()):
            write_atomically(self.state_path, lambda tmp: torch.save(state, tmp))
        self.step = step
        rows = self.losses
        with saving(self.loss_path, self.kept()):
            write_atomically(self.loss_path, lambda tmp: self.write_csv(tmp, rows))
            if len(rows) > 1:
                draw_loss_curve(rows, self.loss_path.with_suffix(".png"), f"{self.name} stage")

    def kept(self) -> str:
        """What a failure now leaves behind, in words."""
        if self.step == 0:
            return f"no training state of this run was saved yet (the first save is at step {self.args.save_every})"
        return f"the training state of step {self.step} is kept in {self.state_path}"

    @staticmethod
    def write_csv(path: Path, rows: list[tuple[int, float]]) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "loss"])
            writer.writerows((s, f"{loss:.6g}") for s, loss in rows)

    def load_state(self) -> None:
        """The saved state, checked whole (identity, step, every tensor) before any of it is loaded."""
        state = read_state(self.state_path)
        saved = json.loads(state["identity"])
        self.check_identity(saved, state["step"])
        for part in self.trained:
            wanted = {n: p.detach() for n, p in self.params[part].items()}
            check_weights(self.state_path, f"models.{part}", state["models"].get(part), wanted)
            if self.ema:
                check_weights(self.state_path, f"ema.{part}", state["ema"].get(part), wanted)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
            raise damaged_state(self.state_path, f"its optimizer state does not fit ({type(e).__name__})") from None
        if any(isinstance(v, torch.Tensor) and v.dim() and v.shape != p.shape
               for p in self.flat().values() for v in self.optimizer.state[p].values()):
            raise damaged_state(self.state_path, "its optimizer state is for networks of other shapes")
        with torch.no_grad():
            for part, params in self.params.items():
                for name, p in params.items():
                    p.copy_(state["models"][part][name])
                    if self.ema:
                        self.ema.shadow[f"{part}.{name}"].copy_(state["ema"][part][name])
        self.step, self.models.scale_factor = state["step"], float(state["scale_factor"])
        self.cfg = dataclasses.replace(self.cfg, schedule_steps=saved["cfg"].get("schedule_steps") or saved["cfg"]["steps"])
        self.losses = read_losses(self.loss_path, self.step) if self.loss_path.is_file() else []

    def check_identity(self, saved: dict, step: int) -> None:
        """The saved run must be this one, but for the `RESUMABLE` settings (noted when they changed), and
        must not be past this run's last step."""
        ours = json.loads(self.identity)
        differs = [k for k in sorted(ours.keys() | saved.keys()) if fixed(ours, k) != fixed(saved, k)]
        if differs:
            what = differs if differs != ["cfg"] else [f"cfg.{k}" for k in sorted(fixed(ours, "cfg"))
                                                       if fixed(ours, "cfg")[k] != fixed(saved, "cfg").get(k)]
            raise TrainingError(f"--resume: {self.state_path} was written by a run with another configuration "
                                f"(differs in: {', '.join(what)}); resume with the same flags (only --lr, "
                                f"--steps and --batch-size may change), or use another --run-dir")
        if step > self.cfg.steps:
            raise TrainingError(f"--resume: {self.state_path} is at step {step}, past --steps {self.cfg.steps}: "
                                f"give --steps above {step} to train on, or use another --run-dir")
        changed = [f"{k} {ours['cfg'][k]} (was {saved['cfg'].get(k)})" for k in RESUMABLE[:-1]
                   if ours["cfg"][k] != saved["cfg"].get(k)]
        if changed:
            span = saved["cfg"].get("schedule_steps") or saved["cfg"]["steps"]
            tail = f"; steps past {span} run at the schedule's last learning rate" if self.cfg.steps > span else ""
            note(f"resuming the {self.name} stage at step {step} with {', '.join(changed)}{tail}")

    # -- the loop ------------------------------------------------------------------------------------

    def run(self, resume: bool) -> StableDiffusionModels:
        if resume and self.state_path.exists():
            self.load_state()
        self.prepare()
        main = self.processes.main
        bar = tqdm(range(self.step, self.cfg.steps), initial=self.step, total=self.cfg.steps, desc=self.name,
                   disable=self.args.no_progress or not main)
        started, first = time.perf_counter(), self.step
        for step in bar:
            factor = schedule_factor(self.cfg, step)
            for group, peak in zip(self.optimizer.param_groups, self.peaks):
                group["lr"] = peak * factor
            with self.autocast:
                loss = self.loss(step, step_generator(self.args.seed, self.name, step))
            shown = self.processes.mean(loss.item())  # NaN in every process if it is in one
            if not math.isfinite(shown):
                saved = self.step or any(self.run_dir.glob("*-state.pt"))  # this stage's, or an earlier one's
                again = "continue with --resume" if saved else "run again"
                raise TrainingError(f"the {self.name} loss became {shown} at step {step}; {self.kept()}: "
                                    f"lower --lr and {again}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(list(self.flat().values()), self.cfg.grad_clip)
            self.optimizer.step()
            if self.ema:
                self.ema.update(self.flat(), step)
            self.losses.append((step, shown))
            done = step + 1
            rate = (done - first) * self.cfg.batch_size / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{shown:.4f}", samples_per_s=f"{rate:.3g}")
            if main and (done % self.args.save_every == 0 or done == self.cfg.steps):
                self.save_state(done)
            if main and (done % self.args.sample_every == 0 or done == self.cfg.steps):
                self.sample(done)
        if self.ema:
            with torch.no_grad():
                for name, p in self.flat().items():
                    p.copy_(self.ema.shadow[name])
        for net in NETWORKS:
            if getattr(self.models, net, None) is not None:
                getattr(self.models, net).requires_grad_(False).eval()
        self.objective.finish(self.models)
        return self.models

    @contextmanager
    def for_sampling(self) -> Iterator[None]:
        """The averaged weights (if any) in place and the trained modules in eval mode, while sampling."""
        modules = [m for m in self.objective.modules.values() if m.training]
        with swapped_in(self.flat(), self.ema.shadow) if self.ema else nullcontext():
            for m in modules:
                m.eval()
            try:
                yield
            finally:
                for m in modules:
                    m.train()

    # -- the objective -------------------------------------------------------------------------------

    def prepare(self) -> None:
        self.objective.prepare(self.models, self.data, self.cfg, self.device)

    def loss(self, step: int, gen: torch.Generator) -> torch.Tensor:
        return self.objective.loss(step, gen)

    def sample(self, step: int) -> None:
        path = self.run_dir / f"{self.name}-samples-{step:06d}.png"
        with saving(path, self.kept(), OSError), self.for_sampling():
            self.objective.sample(self.models, path)


# ---- the run folder and the memory a stage needs ---------------------------------------------------

class RunFolder:
    """The run folder's policy, before any model is built: every path the run writes can be written (the
    folders exist and take files, no name is a folder), a saved state or the --output is replaced only with
    --overwrite (continued with --resume), and one run at a time holds the folder (`hold`)."""

    def __init__(self, args: argparse.Namespace, stages: tuple[str, ...]):
        self.args, self.path = args, Path(args.run_dir)
        self.files = [self.path / f"{n}{end}" for n in stages for end in ("-state.pt", "-loss.csv", "-loss.png")]
        self.files += [self.path / "vae.safetensors"] if len(stages) > 1 else []

    def check(self) -> None:
        output = self.args.output
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"--run-dir {self.path} is a file, not a folder; give a folder for the run's state")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create --run-dir {self.path} ({e.strerror}); choose another folder") from None
        writable_folder(self.path, "--run-dir")
        writable_output(output, "--output", ".safetensors")
        self.refuse_to_replace([output], "--output")
        for path in self.files:
            if path.exists() and not path.is_file():
                raise InputError(f"{path} in --run-dir is not a file; remove it or use another --run-dir")
        self.refuse_to_replace([f for f in self.files if f.name.endswith("-state.pt")], "a training state")

    def refuse_to_replace(self, paths: list[Path], what: str) -> None:
        if self.args.resume or self.args.overwrite:
            return
        for path in paths:
            if path.exists():
                raise InputError(f"{what} {path} already exists; continue that run with --resume, replace it with "
                                 f"--overwrite, or use another {'--output' if what == '--output' else '--run-dir'}")

    @contextmanager
    def hold(self) -> Iterator[None]:
        """The run folder's lock file, held until the run ends (none where fcntl is missing)."""
        if fcntl is None:
            yield
            return
        try:  # never through a link planted at the name, and only a plain file
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise InputError(f"cannot open the lock file {self.path / LOCK_NAME} ({e.strerror}); remove what is at "
                             f"that name, or use another --run-dir") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InputError(f"{self.path / LOCK_NAME} is not a plain file; remove it, or use another --run-dir")
        with os.fdopen(fd, "r+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.seek(0)
                raise InputError(f"--run-dir {self.path} is in use by another training run (process "
                                 f"{lock.read().strip() or 'unknown'}); wait for it to end, or use another "
                                 f"--run-dir") from None
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
            yield


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
        check_trainable(args.init, read_family(args.init) if Path(args.init).is_file() else None)
        models = load_checkpoint(args.init, device="cpu")
        check_trainable(args.init, models.family)
        return models
    torch.manual_seed(args.seed)
    return StableDiffusionModels(clip=CLIPTextModel(preset.clip), vae=AutoencoderKL(preset.vae),
                                 unet=UNet(preset.unet), image_size=preset.image_size)


def check_trainable(path: Path, family: Family | None) -> None:
    """The objectives condition on one text encoder's hidden states: SDXL's two towers, pooled vector and
    micro-conditions are not trained here (yet). None: a family not known before loading."""
    if family is not None and (len(family.text_encoders) != 1 or family.micro_conditions):
        raise InputError(f"--init {path} is an {family.title} checkpoint; sd.train fine-tunes SD 1.x and 2.x models "
                         f"(one text encoder, no size conditioning): give an SD 1.x or 2.x checkpoint")


def dataset(args: argparse.Namespace, image_size: int):
    if args.data == "shapes":
        return CaptionedShapes(image_size, seed=args.seed)
    return CaptionFolder(args.data, image_size)


def words_of(data) -> tuple[str, ...]:
    if isinstance(data, CaptionedShapes):
        return tuple(vocabulary())
    return tuple(sorted({w for c in data.captions for w in words(c)}))


def stage_config(preset: Preset, name: str, args: argparse.Namespace) -> StageConfig:
    cfg = getattr(preset, f"{name}_stage")
    return dataclasses.replace(cfg, **{k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                                         ("lr", args.lr)) if v is not None})


def train(args: argparse.Namespace) -> None:
    preset = PRESETS[args.preset]
    if args.prediction is not None:
        prediction_name(args.prediction, "--prediction")
    stages = STAGES if args.stage == "all" else (args.stage,)
    folder = RunFolder(args, stages)
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
    if name == "diffusion" and args.stage == "all":  # the VAE stage's result, as a resumable hand-over
        models = load_checkpoint(run_dir / "vae.safetensors")
    models = Stage(name, models, data, cfg, args).run(args.resume)
    if args.init is None or models.vocabulary is not None:  # a model that knows only its training words
        models.vocabulary = tuple(sorted(set(models.vocabulary or ()) | set(words_of(data))))
    path = Path(args.output) if last else run_dir / "vae.safetensors"
    with saving(path, f"the training states in {run_dir} are kept"):
        save_checkpoint(models, path, torch.float16 if last and args.half else None)
    print(f"wrote {path}", file=sys.stderr)
    return models


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
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the training state in --run-dir (--lr, "
                                                             "--steps and --batch-size may differ from the saved run's)")
    again.add_argument("--overwrite", action="store_true", help="start over, replacing the training state in "
                                                                "--run-dir and --output (default: refuse)")
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
    for name, (low, high) in LIMITS.items():
        value = getattr(args, name)
        if value is not None and not (low <= value <= (high or value)):
            flag = f"--{name.replace('_', '-')}"
            raise InputError(f"{flag} must be {f'between {low} and {high}' if high else f'at least {low}'}, got {value}")
    if args.image_size is not None and args.image_size % 8:
        raise InputError(f"--image-size must be a multiple of 8, got {args.image_size}")
    if args.lr is not None and not (0 < args.lr < 1):
        raise InputError(f"--lr must be between 0 and 1 (exclusive), got {args.lr}")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: train(parse_args(argv)), out_of_memory="lower --batch-size",
                       interrupted="the last saved training state is intact: continue with --resume")


if __name__ == "__main__":
    sys.exit(main())
