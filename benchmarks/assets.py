"""What the benchmark runs on: a full-size SD v1.5 checkpoint with seeded random weights, written once in
the four usual variants, and a local diffusers config folder so that diffusers loads it offline.

The checkpoint holds the reference models of `tests.reference` (the same seeds as the tests'
fixtures) in the CompVis layout with the training buffers real files carry, as fp32 and fp16,
`.safetensors` and `.ckpt` (nested under "state_dict"). Files are written under a temporary name and
renamed, so an interrupted run never leaves a half-written file that a later run would reuse.

diffusers' `StableDiffusionPipeline.from_single_file` reads the architecture from a diffusers model
folder, normally downloaded from the Hub. `write_diffusers_config` writes that folder here from the
configs of the same reference models (built on the meta device, so this costs no memory): model_index.json,
unet/vae/text_encoder configs, the tokenizer from data/vocab.json and data/merges.txt, and the scheduler
that matches our default sampler. Pass it as `config=` with `local_files_only=True`: no network is used.
"""

import json
import os
import platform
import re
from pathlib import Path

import torch

OUT_DIR = Path(__file__).resolve().parent / "out"
CHECKPOINT_DIR = OUT_DIR / "checkpoints"
CONFIG_DIR = OUT_DIR / "diffusers-config"
SAMPLER = "dpmpp_2m_karras"  # our default sampler; the diffusers scheduler in the config matches it
VARIANTS = ("fp32.safetensors", "fp32.ckpt", "fp16.safetensors", "fp16.ckpt")

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def quiet() -> None:
    """No progress bars, config dumps or deprecation notes from diffusers and transformers."""
    import warnings

    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def cpu_name() -> str:
    return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor() or "unknown CPU")


def rss_bytes() -> int:
    """The process's resident memory now (Linux)."""
    return int(re.search(r"^VmRSS:\s*(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1]) * 1024


def checkpoint_paths() -> dict[str, Path]:
    return {variant: CHECKPOINT_DIR / f"sd15-random.{variant}" for variant in VARIANTS}


def random_sd15_state() -> dict[str, torch.Tensor]:
    """The tests' reference weights (seeds 1, 2, 3) under CompVis keys, plus the training buffers."""
    from tests import compvis, reference
    state = compvis.training_buffers()
    for net, make, seed in (("unet", reference.sd15_unet, 1), ("vae", reference.sd15_vae, 2),
                            ("clip", reference.sd15_clip, 3)):
        state.update(reference.to_compvis(net, reference.randomize_(make(), seed=seed)))
    return state


def save(state: dict[str, torch.Tensor], path: Path) -> None:
    from tests.compvis import save_checkpoint
    partial = path.with_name(path.stem + ".partial" + path.suffix)
    save_checkpoint(state, partial).rename(path)


def ensure_checkpoints(log=print, variants: tuple[str, ...] = VARIANTS) -> dict[str, Path]:
    """The checkpoint files (all four: about 13 GB), built and written on the first call (a minute or two)."""
    paths = {variant: path for variant, path in checkpoint_paths().items() if variant in variants}
    missing = [variant for variant, path in paths.items() if not path.is_file()]
    if missing:
        log(f"writing the random SD v1.5 checkpoint ({', '.join(missing)}) to {CHECKPOINT_DIR} ...")
        CHECKPOINT_DIR.mkdir(parents=True, exist_ok=True)
        state = random_sd15_state()
        for variant in missing:
            cast = torch.float16 if variant.startswith("fp16") else torch.float32
            save({k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}, paths[variant])
        del state
    return paths


def write_diffusers_config(folder: Path = CONFIG_DIR) -> Path:
    """A diffusers model folder (configs and tokenizer, no weights) describing SD v1.5."""
    import transformers
    from sd.tokenizer import DATA_DIR
    from tests import reference
    from tests.reference import reference_scheduler

    if (folder / "model_index.json").is_file():
        return folder
    with torch.device("meta"):
        unet, vae, clip = reference.sd15_unet(), reference.sd15_vae(), reference.sd15_clip()
    unet.save_config(folder / "unet")
    vae.save_config(folder / "vae")
    clip.config.save_pretrained(folder / "text_encoder")
    tokenizer = transformers.CLIPTokenizer(vocab=str(DATA_DIR / "vocab.json"), merges=str(DATA_DIR / "merges.txt"),
                                           model_max_length=77)
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler, _ = reference_scheduler(SAMPLER, {})
    scheduler.save_config(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def tensor_bytes(path: Path) -> int:
    """Bytes of the tensors a checkpoint file holds, read without loading them."""
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        return sum(end - start for key, info in header.items() if key != "__metadata__"
                   for start, end in [info["data_offsets"]])
    from sd.safe_pickle import load_pickle_checkpoint
    state = load_pickle_checkpoint(path)  # memory-mapped: nothing is read but the pickle
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    return sum(v.nbytes for v in state.values() if isinstance(v, torch.Tensor))
