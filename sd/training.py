"""The training loop every objective runs in (`Stage`), its saved states and the run folder's policy.

A stage runs one objective of `sd/objectives.py` or `sd/finetune.py`: AdamW (one group per learning rate of the
parts it trains) with a linear warm-up and a schedule after it (`SCHEDULES`: cosine or linear to a tenth of
the peak, or constant), gradient clipping and optionally an EMA of the trained weights, which is then what is
written. Every random draw of step k comes from a generator seeded with (seed, stage, k), and sample i of the
data is a pure function of i, so `--resume` continues a run exactly, in any number of processes. Each stage
keeps, in the run folder, its training state (`<stage>-state.pt`), its loss (`<stage>-loss.csv` and `.png`)
and sample grids (`<stage>-samples-<step>.png`).

A resume may change --lr, --steps and --batch-size (`RESUMABLE`: lower the learning rate after a NaN loss,
extend a finished run), nothing else. The schedule spans the first run's --steps: a run extended past them
(`--resume --steps MORE`) trains on at the schedule's last learning rate (a constant tail), so the steps it
already took keep their rates.

The run folder's policy (`RunFolder`), checked before any model is built: one run at a time holds it (a lock
file), a saved state or an existing output is replaced only with --overwrite (or continued with --resume), and
every path the run will write is checked first.
"""

import argparse
import csv
import dataclasses
import json
import math
import os
import stat
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

from sd.checkpoint import StableDiffusionModels
from sd.cli import note
from sd.distributed import Processes
from sd.errors import InputError, SDError
from sd.files import write_atomically
from sd.objectives import OBJECTIVES, Objective
from sd.paths import writable_folder, writable_output
from sd.safe_pickle import load_pickle_checkpoint
from sd.tensor_checks import structure_fault, value_fault

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

PROG = "python -m sd.train"
STAGES = ("vae", "diffusion", "lora", "dreambooth", "textual-inversion")  # every stage's own random numbers
NETWORKS = ("unet", "vae", "clip", "clip_g")  # the fields of StableDiffusionModels that are networks
SEED_FACTOR, STAGE_FACTOR = 1_000_003, 100_000_019  # of `step_generator`
MAX_STEPS = 10**9
MAX_SEED = (2**64 - 1 - STAGE_FACTOR * (len(STAGES) - 1) - MAX_STEPS) // SEED_FACTOR  # every step's seed fits
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
            every = self.args.sample_every  # None: no samples
            if main and every and (done % every == 0 or done == self.cfg.steps):
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

def same_file(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


class RunFolder:
    """The run folder's policy, before any model is built: every path the run writes can be written (the
    folders exist and take files, no name is a folder), a saved state or the --output is replaced only with
    --overwrite (continued with --resume), and one run at a time holds the folder (`hold`)."""

    def __init__(self, args: argparse.Namespace, stages: tuple[str, ...], outputs: list[Path], suffix: str):
        self.args, self.path, self.outputs, self.suffix = args, Path(args.run_dir), outputs, suffix
        self.files = [self.path / f"{n}{end}" for n in stages for end in ("-state.pt", "-loss.csv", "-loss.png")]
        self.files += [self.path / "vae.safetensors"] if len(stages) > 1 else []
        self.created = False  # whether `check` made the folder (a refused run then leaves none)

    def check(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"--run-dir {self.path} is a file, not a folder; give a folder for the run's state")
        try:
            self.created = self.created or not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create --run-dir {self.path} ({e.strerror}); choose another folder") from None
        writable_folder(self.path, "--run-dir")
        writable_output(self.args.output, "--output", self.suffix)
        self.refuse_to_replace(self.outputs, "--output")
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
        """The run folder's lock file, held until the run ends and then removed (none where fcntl is missing);
        a folder this run made and left empty (it was refused) is removed too."""
        try:
            with self.lock() if fcntl is not None else nullcontext():
                yield
        finally:
            if self.created and self.path.is_dir() and not any(self.path.iterdir()):
                self.path.rmdir()

    @contextmanager
    def lock(self) -> Iterator[None]:
        lock_path = self.path / LOCK_NAME
        try:  # never through a link planted at the name, and only a plain file
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise InputError(f"cannot open the lock file {lock_path} ({e.strerror}); remove what is at "
                             f"that name, or use another --run-dir") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InputError(f"{lock_path} is not a plain file; remove it, or use another --run-dir")
        with os.fdopen(fd, "r+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.seek(0)
                raise InputError(f"--run-dir {self.path} is in use by another training run (process "
                                 f"{lock.read().strip() or 'unknown'}); wait for it to end, or use another "
                                 f"--run-dir") from None
            if not same_file(lock_path, fd):  # removed by a run that ended while this one opened it
                raise InputError(f"--run-dir {self.path} was in use by another training run that has just ended; "
                                 f"run the command again")
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
            try:
                yield
            finally:
                lock_path.unlink(missing_ok=True)  # while held: a run that opened it before finds it gone (above)


