"""`python -m sd.train` under hostile input, family by family: bad flag values, output paths that cannot be
written, the run folder's lock and its refusal to replace, resume states that are not this run's, a disk
filling while saving, NaN losses, and captions too long. Each bad case: exit 2 (1 for a failed write),
exactly one `error:` line, no traceback, and no state or output written or replaced.

All on the "micro" preset, two or three steps of the diffusion stage from a micro checkpoint."""

import dataclasses
import errno
import fcntl
import io
import json
import math
import os
import random
import resource
from pathlib import Path

import pytest
import torch
from PIL import Image

from sd import devices, objectives, paths, train, training
from sd.errors import SettingError
from sd.families import FAMILIES
from tests.test_fuzz import flip
from tests.tiny import write_tiny_checkpoint

MICRO = ["--preset", "micro", "--no-progress", "--sample-every", "1000", "--batch-size", "2"]


def snapshot(folder) -> dict:
    """Every file under `folder` and its bytes (the run folder's lock file left out)."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != training.LOCK_NAME}


def one_error(capsys, code: int, status: int = 2) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == status and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def init(micro_init):
    return micro_init


REAL_SAMPLE = objectives.DiffusionObjective.sample


@pytest.fixture(scope="module", autouse=True)
def quick():
    """A pool of 4 images, and sample grids of blank images (the real grid: `test_a_caption_of_many_tokens...`)."""
    micro = train.PRESETS["micro"]
    stage = dataclasses.replace(micro.diffusion_stage, pool=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(train.PRESETS, "micro", dataclasses.replace(micro, diffusion_stage=stage))
        patch.setattr(objectives.DiffusionObjective, "sample",
                      lambda self, models, path: objectives.save_grid([Image.new("RGB", (8, 8))], 1, path))
        yield


def diffusion_args(init, run_dir, *extra) -> list[str]:
    return ["diffusion", *MICRO, "--init", str(init), "--steps", "2", "--run-dir", str(run_dir),
            "--output", str(run_dir / "out.safetensors"), *extra]


@pytest.fixture(scope="module")
def saved(init, tmp_path_factory):
    """A finished two-step run: its state file's bytes, for crafting bad states."""
    run_dir = tmp_path_factory.mktemp("saved")
    assert train.main(diffusion_args(init, run_dir)) == 0
    return (run_dir / "diffusion-state.pt").read_bytes()


def no_models(monkeypatch):
    """Fail the test if a run gets as far as building its networks."""
    monkeypatch.setattr(train, "initial_models", lambda *a: pytest.fail("built models despite bad input"))


# ---- bad flag values: refused in parse_args, before anything is built or written --------------------

BAD_FLAGS = [
    ("--seed", "-1"), ("--seed", str(2**70)), ("--seed", str(train.MAX_SEED + 1)), ("--seed", "1.5"),
    ("--steps", "0"), ("--steps", "-5"), ("--steps", str(train.MAX_STEPS + 1)), ("--steps", str(2**70)),
    ("--batch-size", "0"), ("--batch-size", "-1"), ("--batch-size", "1000000"),
    ("--lr", "0"), ("--lr", "-0.001"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-inf"), ("--lr", "1"),
    ("--lr", "1e308"), ("--lr", "abc"),
    ("--save-every", "0"), ("--save-every", "-1"), ("--sample-every", "0"),
    ("--image-size", "0"), ("--image-size", "4"), ("--image-size", "12"), ("--image-size", "-8"),
    ("--image-size", "33"),
]


@pytest.mark.parametrize("flag, value", BAD_FLAGS, ids=[f"{f}={v}" for f, v in BAD_FLAGS])
def test_bad_flag_values_are_refused_before_any_work(tmp_path, capsys, monkeypatch, flag, value):
    no_models(monkeypatch)
    run_dir = tmp_path / "run"
    code = train.main(["all", *MICRO, "--run-dir", str(run_dir), "--output", str(tmp_path / "o.safetensors"),
                       f"{flag}={value}"])
    assert flag in one_error(capsys, code)
    assert list(tmp_path.iterdir()) == []


def test_the_seed_and_step_limits_fit_every_step_generator():
    args = train.parse_args(["all", "--run-dir", "r", "--output", "o.safetensors", "--seed", str(train.MAX_SEED),
                             "--steps", str(train.MAX_STEPS)])
    for stage in training.STAGES:
        training.step_generator(args.seed, stage, args.steps - 1)


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys, monkeypatch):
    no_models(monkeypatch)
    code = train.main(["all", *MICRO, "--run-dir", str(tmp_path / "r"), "--output", str(tmp_path / "o.safetensors"),
                       "--resume", "--overwrite"])
    assert "not allowed with" in one_error(capsys, code) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("limit", ["rlimit", "cgroup", "size"])
def test_a_stage_that_cannot_fit_in_the_process_memory_is_refused_before_the_first_step(init, tmp_path, capsys,
                                                                                        monkeypatch, limit):
    """The process's own limits (RLIMIT_AS, the cgroup's memory.max), not only the machine's free memory."""
    monkeypatch.setattr(training.Stage, "run", lambda *a: pytest.fail("trained despite too little memory"))
    extra = ["--image-size", "4096"] if limit == "size" else []
    if limit == "rlimit":
        monkeypatch.setattr(resource, "getrlimit", lambda which: (2**20, resource.RLIM_INFINITY))
    if limit == "cgroup":
        (tmp_path / "memory.max").write_text("1048576\n")
        (tmp_path / "memory.current").write_text("524288\n")
        monkeypatch.setattr(devices, "CGROUP_FILES", ((tmp_path / "memory.max", tmp_path / "memory.current"),))
    code = train.main(diffusion_args(init, tmp_path / "run", *extra))
    assert "lower --image-size or --batch-size" in one_error(capsys, code)
    assert snapshot(tmp_path / "run") == {}


# ---- output paths: every one checked before the first step -----------------------------------------

def deny_writes_in(monkeypatch, folder):
    """Creating files in `folder` fails as on a read-only folder (chmod does not stop root)."""
    create = paths.os.open

    def refusing(path, flags, *rest, **options):
        if Path(path).parent == folder and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied")
        return create(path, flags, *rest, **options)

    monkeypatch.setattr(paths.os, "open", refusing)


def output_problem(case, tmp_path, monkeypatch) -> tuple[list[str], str]:
    """The flags of one output-path problem, and a word of its message."""
    run_dir, out = tmp_path / "run", tmp_path / "out.safetensors"
    if case == "run-dir is a file":
        run_dir.write_text("x")
        return ["--run-dir", str(run_dir), "--output", str(out)], "is a file"
    if case == "run-dir under a file":
        (tmp_path / "file").write_text("x")
        return ["--run-dir", str(tmp_path / "file" / "run"), "--output", str(out)], "cannot create"
    if case == "output in a missing folder":
        return ["--run-dir", str(run_dir), "--output", str(tmp_path / "missing" / "o.safetensors")], "does not exist"
    if case == "output is a folder":
        (tmp_path / "dir.safetensors").mkdir()
        return ["--run-dir", str(run_dir), "--output", str(tmp_path / "dir.safetensors")], "is a folder"
    if case == "output folder unwritable":
        (tmp_path / "ro").mkdir()
        deny_writes_in(monkeypatch, tmp_path / "ro")
        return ["--run-dir", str(run_dir), "--output", str(tmp_path / "ro" / "o.safetensors")], "cannot write into"
    if case == "run-dir unwritable":
        run_dir.mkdir()
        deny_writes_in(monkeypatch, run_dir)
        return ["--run-dir", str(run_dir), "--output", str(out)], "cannot write into"
    if case == "a state path is a folder":
        (run_dir / "vae-state.pt").mkdir(parents=True)
        return ["--run-dir", str(run_dir), "--output", str(out)], "is not a file"
    if case == "a loss path is a folder":
        (run_dir / "diffusion-loss.csv").mkdir(parents=True)
        return ["--run-dir", str(run_dir), "--output", str(out)], "is not a file"
    if case == "output exists":
        out.write_bytes(b"the user's model")
        return ["--run-dir", str(run_dir), "--output", str(out)], "--overwrite"
    run_dir.mkdir()
    (run_dir / "diffusion-state.pt").write_bytes(b"an earlier run's state")
    return ["--run-dir", str(run_dir), "--output", str(out)], "continue that run with --resume"


OUTPUT_PROBLEMS = ["run-dir is a file", "run-dir under a file", "output in a missing folder", "output is a folder",
                   "output folder unwritable", "run-dir unwritable", "a state path is a folder",
                   "a loss path is a folder", "output exists", "a saved state exists"]


@pytest.mark.parametrize("case", OUTPUT_PROBLEMS)
def test_output_path_problems_are_refused_before_any_model_is_built(tmp_path, capsys, monkeypatch, case):
    no_models(monkeypatch)
    flags, word = output_problem(case, tmp_path, monkeypatch)
    before = snapshot(tmp_path)
    assert word in one_error(capsys, train.main(["all", *MICRO, "--steps", "2", *flags]))
    assert snapshot(tmp_path) == before


def test_overwrite_starts_over_replacing_the_state_and_the_output(init, tmp_path, capsys):
    run_dir = tmp_path
    (run_dir / "out.safetensors").write_bytes(b"old")
    (run_dir / "diffusion-state.pt").write_bytes(b"an earlier run's state, unreadable")
    assert train.main(diffusion_args(init, run_dir, "--overwrite")) == 0
    assert torch.load(run_dir / "diffusion-state.pt", weights_only=True)["step"] == 2
    assert (run_dir / "out.safetensors").read_bytes() != b"old"


# ---- the lock: one run at a time in a run folder ------------------------------------------------------

def test_a_run_folder_held_by_another_run_is_refused(init, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(training.Stage, "run", lambda *a: pytest.fail("trained in a folder another run holds"))
    with open(tmp_path / training.LOCK_NAME, "w") as other:  # another open file: flock conflicts as another process
        other.write("12345")
        other.flush()
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        error = one_error(capsys, train.main(diffusion_args(init, tmp_path)))
    assert "in use by another training run (process 12345)" in error and snapshot(tmp_path) == {}


def test_a_lock_its_holder_removed_while_this_run_opened_it_is_refused(init, tmp_path, capsys, monkeypatch):
    """A run ends by removing its lock file; a run that opened that file just before would lock a file no
    longer in the folder, beside a third run's new one: it is refused instead."""
    monkeypatch.setattr(training.Stage, "run", lambda *a: pytest.fail("trained on a removed lock"))
    monkeypatch.setattr(training, "same_file", lambda path, fd: False)
    error = one_error(capsys, train.main(diffusion_args(init, tmp_path / "run")))
    assert "was in use by another training run that has just ended; run the command again" in error
    assert [p.name for p in (tmp_path / "run").iterdir()] == [training.LOCK_NAME]  # the new holder's, kept


def test_a_finished_run_leaves_no_lock(init, tmp_path):
    assert train.main(diffusion_args(init, tmp_path)) == 0
    assert (tmp_path / "out.safetensors").exists() and not (tmp_path / training.LOCK_NAME).exists()


@pytest.mark.parametrize("planted", ["link", "folder", "fifo"])
def test_a_lock_name_that_is_no_plain_file_is_refused_and_nothing_is_written_through(init, tmp_path, capsys,
                                                                                       monkeypatch, planted):
    monkeypatch.setattr(training.Stage, "run", lambda *a: pytest.fail("trained without the lock"))
    run_dir, victim = tmp_path / "run", tmp_path / "victim.txt"
    run_dir.mkdir()
    victim.write_text("precious")
    lock = run_dir / training.LOCK_NAME
    {"link": lambda: lock.symlink_to(victim), "folder": lock.mkdir, "fifo": lambda: os.mkfifo(lock)}[planted]()
    error = one_error(capsys, train.main(diffusion_args(init, run_dir)))
    assert training.LOCK_NAME in error and victim.read_text() == "precious"


class Allocates:
    """A pickle that asks for a bytearray of 400 MB from a file of about a kilobyte."""

    def __reduce__(self):
        return bytearray, (400_000_000,)


def test_a_state_that_asks_for_more_memory_than_its_size_is_refused_in_bounded_memory(init, saved, tmp_path, capsys):
    state = tmp_path / "diffusion-state.pt"
    torch.save({"identity": Allocates()}, state)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    error = one_error(capsys, train.main(diffusion_args(init, tmp_path, "--resume")))
    assert str(state) in error and "bytearray" in error
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB: far below the 400 MB asked


# ---- resume states that are not this run's --------------------------------------------------------------

def edited(state_bytes: bytes, edit) -> bytes:
    state = torch.load(io.BytesIO(state_bytes), weights_only=True)
    state = edit(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def setting(key, value):
    return lambda s: {**s, key: value}


def identity_edit(edit):
    return lambda s: {**s, "identity": json.dumps(edit(json.loads(s["identity"])))}


def weight_edit(edit, part="models"):
    def apply(s):
        weights = dict(s[part]["unet"])
        edit(weights)
        return {**s, part: {**s[part], "unet": weights}}
    return apply


FIRST = "time_embed.0.weight"
BAD_STATES = {
    "empty file": lambda b: b"",
    "truncated": lambda b: b[: len(b) // 2],
    "random bytes": lambda b: bytes(range(256)) * 4,
    "a list": lambda b: edited(b, lambda s: [s]),
    "a tensor": lambda b: edited(b, lambda s: torch.zeros(3)),
    "no models": lambda b: edited(b, lambda s: {k: v for k, v in s.items() if k != "models"}),
    "models not a dict": lambda b: edited(b, setting("models", [1, 2])),
    "no unet in models": lambda b: edited(b, setting("models", {})),
    "no ema": lambda b: edited(b, setting("ema", {})),
    "identity not a string": lambda b: edited(b, setting("identity", 7)),
    "identity not JSON": lambda b: edited(b, setting("identity", "{not json")),
    "identity a JSON list": lambda b: edited(b, setting("identity", "[1]")),
    "step 0": lambda b: edited(b, setting("step", 0)),
    "step negative": lambda b: edited(b, setting("step", -3)),
    "step a bool": lambda b: edited(b, setting("step", True)),
    "step huge": lambda b: edited(b, setting("step", 2**70)),
    "step a float": lambda b: edited(b, setting("step", 1.5)),
    "scale factor nan": lambda b: edited(b, setting("scale_factor", math.nan)),
    "scale factor negative": lambda b: edited(b, setting("scale_factor", -1.0)),
    "optimizer empty": lambda b: edited(b, setting("optimizer", {})),
    "a weight missing": lambda b: edited(b, weight_edit(lambda w: w.pop(FIRST))),
    "an extra weight": lambda b: edited(b, weight_edit(lambda w: w.update(extra=torch.zeros(1)))),
    "a weight of another shape": lambda b: edited(b, weight_edit(lambda w: w.update({FIRST: torch.zeros(2, 2)}))),
    "a 0-d weight": lambda b: edited(b, weight_edit(lambda w: w.update({FIRST: torch.tensor(1.0)}))),
    "a float64 weight": lambda b: edited(b, weight_edit(lambda w: w.update({FIRST: w[FIRST].double()}))),
    "a complex weight": lambda b: edited(b, weight_edit(lambda w: w.update({FIRST: w[FIRST].to(torch.complex64)}))),
    "an int weight": lambda b: edited(b, weight_edit(lambda w: w.update({FIRST: w[FIRST].long()}))),
    "a NaN weight": lambda b: edited(b, weight_edit(lambda w: w.update({FIRST: w[FIRST] * math.nan}))),
    "an inf EMA weight": lambda b: edited(b, weight_edit(lambda w: w.update({FIRST: w[FIRST] + math.inf}), "ema")),
    "a sparse weight": lambda b: edited(b, weight_edit(lambda w: w.update({FIRST: w[FIRST].to_sparse()}))),
    "a weight not a tensor": lambda b: edited(b, weight_edit(lambda w: w.update({FIRST: [1.0]}))),
    "optimizer state of other shapes": lambda b: edited(b, lambda s: {**s, "optimizer": {
        **s["optimizer"], "state": {k: {**v, "exp_avg": torch.zeros(1, 1)} for k, v in s["optimizer"]["state"].items()}}}),
    "another stage's state": lambda b: edited(b, identity_edit(lambda i: {**i, "stage": "vae", "trained": ["vae"]})),
    "other network sizes": lambda b: edited(b, identity_edit(
        lambda i: {**i, "configs": {**i["configs"], "unet": {**i["configs"]["unet"], "model_channels": 64}}})),
    "another dataset": lambda b: edited(b, identity_edit(lambda i: {**i, "data": "elsewhere"})),
    "another seed": lambda b: edited(b, identity_edit(lambda i: {**i, "seed": 9})),
    "another warm-up": lambda b: edited(b, identity_edit(lambda i: {**i, "cfg": {**i["cfg"], "warmup": 1}})),
    "past --steps": lambda b: edited(b, setting("step", 5)),
}


@pytest.mark.parametrize("case", BAD_STATES)
def test_bad_resume_states_are_refused_naming_the_file(init, saved, tmp_path, capsys, case):
    state = tmp_path / "diffusion-state.pt"
    state.write_bytes(BAD_STATES[case](saved))
    before = snapshot(tmp_path)
    error = one_error(capsys, train.main(diffusion_args(init, tmp_path, "--resume")))
    assert error.startswith("error: --resume: ") and str(state) in error
    assert snapshot(tmp_path) == before  # the state kept, no output, no loss log


# ---- a full disk while saving ----------------------------------------------------------------------

def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def torch_full_disk(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file")


@pytest.mark.parametrize("writer, fails, kept", [
    ("state", full_disk, "no training state of this run was saved yet"),
    ("state", torch_full_disk, "no training state of this run was saved yet"),
    ("second state", full_disk, "the training state of step 1 is kept"),
    ("loss log", full_disk, "the training state of step 1 is kept"),
    ("sample grid", full_disk, "the training state of step 2 is kept"),
    ("output", full_disk, "the training states in"),
])
def test_a_full_disk_while_saving_is_one_line_saying_what_was_kept(init, tmp_path, capsys, monkeypatch, writer,
                                                                    fails, kept):
    if writer in ("state", "second state"):
        save = torch.save
        calls = iter(range(10))
        monkeypatch.setattr(training.torch, "save", lambda *a, **k: fails() if writer == "state" or next(calls) else
                            save(*a, **k))
    if writer == "loss log":
        monkeypatch.setattr(training.Stage, "write_csv", staticmethod(fails))
    if writer == "sample grid":
        monkeypatch.setattr(objectives, "save_grid", fails)
    if writer == "output":
        import sd.checkpoint
        monkeypatch.setattr(sd.checkpoint, "write_safetensors", fails)
    code = train.main(diffusion_args(init, tmp_path, "--save-every", "1", "--sample-every", "2"))
    error = one_error(capsys, code, status=1)
    assert kept in error and "free some space, then continue with --resume" in error
    assert not (tmp_path / "out.safetensors").exists()
    step = {"state": None, "second state": 1, "loss log": 1}.get(writer, 2)
    if step is None:
        assert not (tmp_path / "diffusion-state.pt").exists()
    else:
        assert torch.load(tmp_path / "diffusion-state.pt", weights_only=True)["step"] == step


# ---- NaN losses: the truth about what is kept, and the README's advice works ------------------------

def nan_at(monkeypatch, step: int):
    original = training.Stage.loss
    monkeypatch.setattr(training.Stage, "loss", lambda self, s, gen: original(self, s, gen) * (math.nan if s == step else 1))


def test_a_nan_before_the_first_save_says_no_state_is_kept(init, tmp_path, capsys, monkeypatch):
    nan_at(monkeypatch, 1)
    error = one_error(capsys, train.main(diffusion_args(init, tmp_path, "--save-every", "5")))
    assert "no training state of this run was saved yet" in error and "run again" in error
    assert not (tmp_path / "diffusion-state.pt").exists()


def test_after_a_nan_a_lower_lr_and_resume_continue(init, tmp_path, capsys, monkeypatch):
    nan_at(monkeypatch, 2)
    args = diffusion_args(init, tmp_path, "--save-every", "1")
    args[args.index("--steps") + 1] = "3"
    error = one_error(capsys, train.main(args))
    assert "state of step 2 is kept" in error and "lower --lr and continue with --resume" in error
    monkeypatch.undo()
    assert train.main([*args, "--resume", "--lr", "1e-4"]) == 0
    assert "with lr 0.0001 (was 0.001)" in capsys.readouterr().err
    assert torch.load(tmp_path / "diffusion-state.pt", weights_only=True)["step"] == 3


# ---- captions -----------------------------------------------------------------------------------------

def caption_folder(folder, caption: bytes | None = None, size: int | None = None):
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (90 * i, 100, 200)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a plain colour {i}", encoding="utf-8")
    if caption is not None:
        (folder / "img1.txt").write_bytes(caption)
    if size is not None:
        with open(folder / "img1.txt", "wb") as f:
            f.truncate(size)  # sparse: 100 MB without writing them
    return folder


@pytest.mark.parametrize("case, caption, size, word", [
    ("just over 64 kB", b"a" * (64 * 1024 + 1), None, "over 64 kB"),
    ("100 MB", None, 100 * 2**20, "over 64 kB"),
    ("a prompt the sample grid refuses", b"a (cat:1.2.3)", None, "img1.txt (a prompt of the sample grid)"),
])
def test_captions_that_cannot_be_read_or_drawn_are_refused_naming_the_file(init, tmp_path, capsys, monkeypatch,
                                                                           case, caption, size, word):
    monkeypatch.setattr(training.Stage, "loss", lambda *a: pytest.fail("trained on a bad caption"))
    parse = objectives.PromptParser.parse

    def refusing(self, prompt, what="prompt"):  # whatever the prompt parser refuses, (x:1.2.3) today
        if prompt == "a (cat:1.2.3)":
            raise SettingError(lambda n: f"{n(what)} has a weight that is not a number")
        return parse(self, prompt, what)

    monkeypatch.setattr(objectives.PromptParser, "parse", refusing)
    folder = caption_folder(tmp_path / "set", caption, size)
    error = one_error(capsys, train.main(diffusion_args(init, tmp_path / "run", "--data", str(folder))))
    assert word in error and str(folder) in error
    assert not (tmp_path / "run" / "diffusion-state.pt").exists()


def test_a_caption_of_many_tokens_is_cut_to_what_clip_reads_and_drawn(init, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(objectives.DiffusionObjective, "sample", REAL_SAMPLE)
    folder = caption_folder(tmp_path / "set", b"red square, " * 5000)  # 60 kB, 15000 tokens
    args = diffusion_args(init, tmp_path / "run", "--data", str(folder), "--sample-every", "2")
    assert train.main(args) == 0
    assert "1 caption(s) are longer than CLIP's 75 tokens (the longest: 15000)" in capsys.readouterr().err
    assert (tmp_path / "run" / "diffusion-samples-000002.png").is_file()


STATE_FUZZ_CASES = 60


def test_mutated_resume_states_resume_or_are_refused_in_one_line(init, saved, tmp_path, capsys):
    """Seeded random mutations of a real state file (flipped bits, cuts, inserted bytes): each resumes or is
    refused in one line naming the file, never a traceback; both outcomes happen."""
    rng, refused = random.Random("resume states"), 0
    for case in range(STATE_FUZZ_CASES):
        run_dir = tmp_path / str(case)
        run_dir.mkdir()
        state = run_dir / "diffusion-state.pt"
        state.write_bytes(flip(saved, rng))
        code = train.main(diffusion_args(init, run_dir, "--resume", "--steps", "3"))
        if code:
            assert str(state) in one_error(capsys, code), case
            refused += 1
        else:
            assert "Traceback" not in capsys.readouterr().err and (run_dir / "out.safetensors").is_file()
    assert 0 < refused < STATE_FUZZ_CASES, refused


@pytest.mark.parametrize("family, suffix", [("sdxl", ".safetensors"), ("sdxl-refiner", ".safetensors"),
                                            ("sdxl", ".ckpt")])
def test_an_sdxl_init_is_refused_in_one_line(tmp_path, capsys, family, suffix):
    """Training conditions on one text encoder: an SDXL file is refused before a step (a .safetensors before it
    loads, from its header), not at the first step with a traceback."""
    init = write_tiny_checkpoint(tmp_path / f"{family}{suffix}", family=family)
    code = train.main(diffusion_args(init, tmp_path))
    error = one_error(capsys, code)
    assert f"is an {FAMILIES[family].title} checkpoint; the vae and diffusion stages train SD 1.x and 2.x models" in error
    assert "fine-tune it with lora, dreambooth or textual-inversion" in error
