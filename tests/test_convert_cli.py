"""`python -m weights_converter IN OUT`: exact copies, --half, --ema-only, no overwriting, and bad input
answered by one line on stderr with exit status 2, no traceback and no file left behind."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.bad_files import BAD_FILES, tiny_state
from tests.tiny import UNET_PREFIX, write_tiny_checkpoint
from weights_converter import __main__ as cli
from sd.checkpoint import ema_key, load_checkpoint, read_state_dict

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weights_converter", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def full_ckpt(tmp_path_factory) -> Path:
    """A tiny full checkpoint (.ckpt with model_ema.* beside decoy UNet weights)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("in") / "tiny-full.ckpt", ema=True)


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def assert_models_hold(path: Path, state: dict, **kw):
    """load_checkpoint(path) gives exactly the weights of `state` (the tiny model, without EMA)."""
    models = load_checkpoint(path, **kw)
    for prefix, model in (("model.diffusion_model.", models.unet), ("first_stage_model.", models.vae),
                          ("cond_stage_model.transformer.text_model.", models.clip)):
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[prefix + key]), prefix + key


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_copies_every_tensor_exactly(tmp_path, full_ckpt):
    out = tmp_path / "tiny.safetensors"
    result = run_cli(full_ckpt, out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out} (") and "MB" in result.stdout and "--ema-only" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left
    assert_same_tensors(read_state_dict(out), read_state_dict(full_ckpt))
    with safe_open(out, "pt") as f:
        assert f.metadata() == {"format": "pt", "sd": '{"prediction_type": "epsilon"}'}  # the decision, stored
    assert_models_hold(out, tiny_state())  # the EMA weights, as from the .ckpt


def test_half(tmp_path, full_ckpt):
    out = tmp_path / "tiny-fp16.safetensors"
    result = run_cli(full_ckpt, out, "--half")
    assert result.returncode == 0, result.stderr
    written, original = read_state_dict(out), read_state_dict(full_ckpt)
    assert_same_tensors(written, {k: v.half() if v.is_floating_point() else v for k, v in original.items()})
    assert written["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert out.stat().st_size < 0.55 * full_ckpt.stat().st_size
    assert_models_hold(out, tiny_state())  # the tiny weights are fp16-representable: nothing is lost


def test_ema_only(tmp_path, full_ckpt):
    out = tmp_path / "tiny-emaonly.safetensors"
    result = run_cli(full_ckpt, out, "--ema-only")
    assert result.returncode == 0, result.stderr
    written, original = read_state_dict(out), read_state_dict(full_ckpt)
    assert not any(k.startswith("model_ema.") for k in written)
    assert written.keys() == {k for k in original if not k.startswith("model_ema.")}
    for key, value in written.items():
        source = original[ema_key(key)] if key.startswith(UNET_PREFIX) else original[key]
        assert torch.equal(value, source), key
    assert_models_hold(out, tiny_state(), use_ema=False)  # no other UNet weights left


def test_ema_only_needs_ema_weights(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "tiny-emaonly.ckpt")
    result = run_cli(path, tmp_path / "out.safetensors", "--ema-only")
    assert_one_line_error(result, str(path), "has no EMA weights", "without --ema-only")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_refuses_to_overwrite(tmp_path, full_ckpt):
    out = tmp_path / "tiny.safetensors"
    out.write_bytes(b"precious")
    assert_one_line_error(run_cli(full_ckpt, out), str(out), "already exists", "--overwrite")
    assert out.read_bytes() == b"precious"
    result = run_cli(full_ckpt, out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert_same_tensors(read_state_dict(out), read_state_dict(full_ckpt))


def _incomplete(folder):
    path = folder / "incomplete.ckpt"
    torch.save({"state_dict": tiny_state(**{UNET_PREFIX + "input_blocks.1.1.proj_out.bias": None})}, path)
    return path


BAD_INPUTS = {name: (BAD_FILES[name][0], BAD_FILES[name][2])  # (maker, fragment of the message)
              for name in ("missing", "truncated_ckpt", "garbage_safetensors", "other_model", "sd2_tower_without_layer", "sd2_misshaped_in_proj", "sdxl",
                           "malicious")}
BAD_INPUTS["incomplete"] = (_incomplete, UNET_PREFIX + "input_blocks.1.1.proj_out.bias")


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input(tmp_path, name):
    make, fragment = BAD_INPUTS[name]
    folder = tmp_path / "in"
    folder.mkdir()
    path = make(folder)
    before = sorted(folder.iterdir())
    out = tmp_path / "out.safetensors"
    assert_one_line_error(run_cli(path, out), str(path), fragment)
    assert list(tmp_path.iterdir()) == [folder] and sorted(folder.iterdir()) == before  # nothing written
    assert not (folder / "pwned").exists()


@pytest.mark.parametrize("args, fragment", [
    (["{in}", "{tmp}/out.ckpt"], "OUT {tmp}/out.ckpt must end in .safetensors"),
    (["{in}", "{tmp}/no/such/folder/out.safetensors"], "folder {tmp}/no/such/folder does not exist"),
    (["{in}", "/proc/out.safetensors"], "cannot write into the folder of OUT /proc"),
    (["{in}", "{tmp}"], "is a folder"),
    (["{in}"], "the following arguments are required: OUT"),
    (["{in}", "{tmp}/out.safetensors", "--fp16"], "unrecognized arguments: --fp16"),
    (["{tmp}/same.safetensors", "{tmp}/same.safetensors", "--overwrite"], "input and output are the same file"),
])
def test_bad_arguments(tmp_path, capsys, full_ckpt, args, fragment):
    (tmp_path / "same.safetensors").write_bytes(b"x")
    assert cli.main([a.format(tmp=tmp_path, **{"in": full_ckpt}) for a in args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert fragment.format(tmp=tmp_path) in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.safetensors"]


@pytest.mark.parametrize("exception, status", [(KeyboardInterrupt, 130), (OSError(28, "No space left on device"), 1)])
def test_failed_write_leaves_old_file_and_no_partial_one(tmp_path, capsys, monkeypatch, full_ckpt, exception, status):
    def write_that_fails(filename, state, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise exception

    monkeypatch.setattr(cli, "write_safetensors", write_that_fails)
    out = tmp_path / "tiny.safetensors"
    out.write_bytes(b"previous version")
    assert cli.main([str(full_ckpt), str(out), "--overwrite"]) == status
    assert capsys.readouterr().err.startswith("error: ")
    assert [p.name for p in tmp_path.iterdir()] == [out.name] and out.read_bytes() == b"previous version"


def test_an_output_that_appears_during_the_conversion_is_kept(tmp_path, capsys, monkeypatch, full_ckpt):
    out = tmp_path / "tiny.safetensors"
    check_loadable = cli.check_loadable

    def another_program_writes_the_output(*args):
        out.write_bytes(b"written meanwhile")
        check_loadable(*args)

    monkeypatch.setattr(cli, "check_loadable", another_program_writes_the_output)
    assert cli.main([str(full_ckpt), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: output {out} appeared while converting") and err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == [out.name] and out.read_bytes() == b"written meanwhile"


def test_a_trained_model_keeps_its_scale_and_configurations(tmp_path):
    """The project's own model (metadata configs, a measured scale_factor) converts to a file that loads as
    the same model: the UNet's heads are not inferable from shapes, so the metadata must travel."""
    source = ROOT / "data" / "tiny-shapes.safetensors"
    out = tmp_path / "copy.safetensors"
    assert run_cli(source, out).returncode == 0
    a, b = load_checkpoint(source), load_checkpoint(out)
    assert (b.scale_factor, b.image_size, b.vocabulary) == (a.scale_factor, a.image_size, a.vocabulary)
    assert b.unet.config == a.unet.config and b.unet.config.num_heads != 8
    assert_same_tensors(read_state_dict(source), read_state_dict(out))
