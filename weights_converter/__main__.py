"""Convert a Stable Diffusion 1.x, 2.x or SDXL checkpoint (.ckpt or .safetensors) to .safetensors.

    python -m weights_converter IN.ckpt OUT.safetensors [--ema-only] [--half] [--prediction v|epsilon] [--overwrite]

The input is read without executing any pickled code, and must be a complete SD 1.x, 2.x or SDXL checkpoint
(the output is checked to load with `load_checkpoint`). What its UNet predicts (epsilon or v) is decided
as `sd.prediction` says, or by `--prediction`, printed, and stored in the output's metadata, so the
output no longer needs a .yaml beside it. By default every tensor is written as it
is; `--ema-only` stores the EMA weights as the UNet and drops `model_ema.*` (what the official
"emaonly" files are), `--half` stores floating-point tensors as fp16. The output appears only when
complete (written to a temporary file in the same folder, then renamed). Exit status: 0 on
success, 2 for a bad argument or input file (one line `error: ...` on stderr), 1 if writing fails.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from sd.checkpoint import (EMA_PREFIX, METADATA_KEY, apply_ema, build_network, detect_family, has_ema, read_metadata,
                           read_state_dict, split_checkpoint)
from sd.cli import CommandParser, run_command
from sd.errors import CheckpointError, InputError
from sd.families import Family
from sd.files import write_atomically, write_safetensors
from sd.paths import writable_output
from sd.prediction import CHOICES, SHORT, V_PRED_KEY, decide, family_rule, prediction_name

PROG = "python -m weights_converter"


def parse_args(argv):
    parser = CommandParser(prog=PROG, description="Convert a Stable Diffusion 1.x, 2.x or SDXL checkpoint to .safetensors without "
                                            "running any code from it.")
    parser.add_argument("input", type=Path, metavar="IN", help="the checkpoint: .ckpt or .safetensors")
    parser.add_argument("output", type=Path, metavar="OUT", help="the file to write, ending in .safetensors")
    parser.add_argument("--ema-only", action="store_true",
                        help="store the EMA weights as the UNet and drop the model_ema.* copies (like the official "
                             "*-emaonly files: about half the size of a full checkpoint)")
    parser.add_argument("--half", action="store_true", help="store floating-point tensors as fp16 (half the size)")
    parser.add_argument("--prediction", metavar="|".join(CHOICES),
                        help="what the UNet predicts, stored in OUT (default: as the input says: its v_pred key, a "
                             ".yaml beside it, else a test of the UNet for SD 2.x)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser.parse_args(argv)


def check_output(args) -> None:
    out = args.output
    writable_output(out, "OUT", ".safetensors")
    if out.exists():
        if args.input.exists() and os.path.samefile(args.input, out):
            raise InputError(f"input and output are the same file ({out}); write to a new file")
        if not args.overwrite:
            raise InputError(f"output {out} already exists; pass --overwrite to replace it")


def convert(path: Path, state: dict[str, torch.Tensor], ema_only: bool, half: bool) -> dict[str, torch.Tensor]:
    """The tensors to write: EMA baked in / fp16 as asked, each taken out of `state` as it is converted, so that
    the input's copy and the output's are not held whole together."""
    if ema_only:
        if not has_ema(state):
            raise CheckpointError(f"{path} has no EMA weights (model_ema.*) for its UNet: it is already an "
                                  f"EMA-only file; convert it without --ema-only.")
        state = {k: v for k, v in apply_ema(state).items() if not k.startswith(EMA_PREFIX)}
    out = {}
    for key in list(state):
        tensor = state.pop(key)
        out[key] = tensor.half() if half and tensor.is_floating_point() else tensor
    return out


def check_loadable(path: Path, family: Family, state: dict[str, torch.Tensor], configs: dict) -> None:
    """What `load_checkpoint` does with these tensors after `detect_family`, on the meta device (no memory,
    no compute): they must load, with the configurations the file's metadata stores (if any)."""
    for net, weights in split_checkpoint(path, state, family).items():
        build_network(path, family, net, weights, "meta", None, configs.get(net))


def probe_unet(path: Path, family: Family, state: dict[str, torch.Tensor], configs: dict):
    """The file's UNet in float32 on the CPU, for `sd.prediction` to test."""
    unet_weights = split_checkpoint(path, state, family)["unet"]
    return build_network(path, family, "unet", unet_weights, "cpu", torch.float32, configs.get("unet"))


def human_size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.2f} {unit}"
        n /= 1000


def convert_file(args: argparse.Namespace) -> None:
    check_output(args)
    if args.prediction is not None:
        prediction_name(args.prediction, "--prediction")
    state = read_state_dict(args.input)
    family = detect_family(args.input, state)
    ema_copies = any(k.startswith(EMA_PREFIX + "diffusion_model") for k in state)
    stored = read_metadata(args.input)
    check_loadable(args.input, family, state, stored.get("configs", {}))  # before any tensor is converted
    state = convert(args.input, state, args.ema_only, args.half)
    decision = decide(args.input, family, lambda: probe_unet(args.input, family, state, stored.get("configs", {})),
                      requested=args.prediction, marked=V_PRED_KEY in state, stored=stored.get("prediction_type"))
    if decision.rule != family_rule(family):  # said where the family alone did not decide
        print(f"note: {SHORT[decision.prediction_type]}-prediction model ({decision.rule})", file=sys.stderr)
    stored = {**stored, "prediction_type": decision.prediction_type}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(stored)}
    try:
        write_atomically(args.output, lambda tmp: write_safetensors(tmp, state, metadata), args.overwrite)
    except FileExistsError:
        raise InputError(f"output {args.output} appeared while converting (another program wrote it); it was "
                         f"not replaced: pass --overwrite to replace it") from None
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()})
    print(f"wrote {args.output} ({human_size(args.output.stat().st_size)}, {len(state)} tensors, "
          f"{'/'.join(dtypes)}{', EMA weights as the UNet' if args.ema_only else ''})")
    if ema_copies and not args.ema_only:
        print("note: the file keeps the EMA copies of the UNet (model_ema.*), which are the weights used for "
              "images; --ema-only writes only those, in about half the size")


def main(argv: list[str] | None = None) -> int:
    args = argparse.Namespace(output=None)

    def body() -> None:
        args.__dict__.update(vars(parse_args(argv)))
        convert_file(args)

    return run_command(body, interrupted="nothing was written", out_of_memory="convert on the CPU",
                       write_error=lambda e: f"could not write {args.output}: {e.strerror or e}")


if __name__ == "__main__":
    sys.exit(main())
