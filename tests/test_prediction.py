"""Deciding what a checkpoint's UNet predicts (`sd.prediction`), on tiny SD 2.x and SD v1 files: each rule on its
own, their order, the probe's input and threshold, the .yaml beside the file in its forms and its bad forms, the
override in the library, the command line (the note, the PNG field, --from-png) and the converter (the decision
stored); and the other families' LoRAs and embeddings refused on an SD 2.x model, and the reverse."""

import itertools
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import run_demo
from sd.checkpoint import load_checkpoint, save_checkpoint
from sd.embeddings import Embedding, check_width
from sd.errors import CheckpointError, InputError
from sd.lora import read_lora
from sd.prediction import PROBE_THRESHOLD, probe
from sd.unet import UNetConfig
from tests.compvis import save_checkpoint as write_state
from tests.tiny import tiny_compvis_state
from weights_converter.__main__ import main as convert_main

V_YAML = 'model:\n  base_learning_rate: 1.0e-4\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n' \
         '    parameterization: "v"\n    linear_start: 0.00085\n    channel_mult: [ 1, 2, 4, 4 ]\n    - 1\n'
YAMLS = {  # text of <checkpoint>.yaml: the prediction type it means
    "quoted v": (V_YAML, "v_prediction"),
    "bare v": ("model:\n  params:\n    parameterization: v  # SD 2.x 768-v\n", "v_prediction"),
    "single-quoted eps": ("model:\n  params:\n    parameterization: 'eps'\n", "epsilon"),
    "no parameterization (v2-inference.yaml)": (V_YAML.replace('    parameterization: "v"\n', ""), "epsilon"),
    "comments and blank lines": ("# config\n\nmodel:\n\n  params:   \n    parameterization: \"v\"\n", "v_prediction"),
}
BAD_YAMLS = {  # bytes of <checkpoint>.yaml: a fragment of the one-line error
    "names x0": (b"model:\n  params:\n    parameterization: x0\n", "names parameterization 'x0'"),
    "tab indented": (b"model:\n\tparams: 1\n", "is not YAML (line 2"),
    "prose": (b"this is my favourite model\n", "is not YAML (line 1"),
    "binary": (bytes(range(256)), "cannot read the model config"),
    "huge": (b"a: 1\n" * 300_000, "is over 1 MB"),
}


@pytest.fixture(scope="module")
def sd2_file(tmp_path_factory):
    return write_state(tiny_compvis_state(family="sd2"), tmp_path_factory.mktemp("sd2") / "tiny-sd2.safetensors")


def copy_with(tmp_path, source, name="model.safetensors", yaml: bytes | None = None, **extra):
    """`source`'s tensors (plus `extra`) as `name` in tmp_path, with a .yaml beside it when given."""
    path = tmp_path / name
    with safe_open(source, "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    write_state({**state, **extra}, path)
    if yaml is not None:
        path.with_suffix(".yaml").write_bytes(yaml)
    return path


@pytest.mark.parametrize("case", YAMLS)
def test_a_yaml_beside_the_file_decides(tmp_path, sd2_file, case):
    text, expected = YAMLS[case]
    models = load_checkpoint(copy_with(tmp_path, sd2_file, yaml=text.encode()))
    assert (models.prediction_type, models.prediction_rule) == (expected, "model.yaml beside the checkpoint")
    assert models.image_size == (768 if expected == "v_prediction" else 512)


@pytest.mark.parametrize("case", BAD_YAMLS)
def test_a_bad_yaml_is_one_line(tmp_path, sd2_file, case):
    data, fragment = BAD_YAMLS[case]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(copy_with(tmp_path, sd2_file, yaml=data))
    message = str(info.value)
    assert fragment in message and "\n" not in message and "model.yaml" in message, message


def test_a_yaml_beside_an_sd1_file_decides_too(tmp_path):
    path = write_state(tiny_compvis_state(), tmp_path / "sd1-v.ckpt")
    path.with_suffix(".yaml").write_text(V_YAML)
    models = load_checkpoint(path)
    assert (models.prediction_type, models.image_size) == ("v_prediction", 512)


def rules(tmp_path, sd2_file, override, v_pred, metadata, yaml):
    """A file holding the rules switched on (each pointing another way than the next), loaded."""
    path = copy_with(tmp_path, sd2_file, v_pred=torch.tensor([]), ztsnr=torch.tensor([])) if v_pred else \
        copy_with(tmp_path, sd2_file)
    if metadata:
        models = load_checkpoint(path, prediction="epsilon")
        save_checkpoint(models, path)  # stores epsilon (and keeps no v_pred key)
        if v_pred:
            path = copy_with(tmp_path, path, name="again.safetensors", v_pred=torch.tensor([]))
    if yaml:
        path.with_suffix(".yaml").write_text(V_YAML)
    return load_checkpoint(path, prediction=override)


CHOICES = list(itertools.product([None, "epsilon"], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("override, v_pred, metadata, yaml", CHOICES)
def test_the_first_rule_that_speaks_decides(tmp_path, sd2_file, monkeypatch, override, v_pred, metadata, yaml):
    monkeypatch.setattr("sd.prediction.probe", lambda unet: "v_prediction")
    models = rules(tmp_path, sd2_file, override, v_pred, metadata, yaml)
    expected = (("epsilon", "as asked") if override else ("v_prediction", "the file's 'v_pred' key") if v_pred
                else ("epsilon", "the file's metadata") if metadata
                else ("v_prediction", "model.yaml beside the checkpoint") if yaml
                else ("v_prediction", "the UNet's answer to AUTOMATIC1111's test input"))
    assert (models.prediction_type, models.prediction_rule) == expected


def test_sd2_inpainting_and_sd1_are_not_probed(tmp_path, monkeypatch):
    monkeypatch.setattr("sd.prediction.probe", lambda unet: pytest.fail("probed"))
    for family, in_channels, rule in (("sd2", 9, "every SD 2.x inpainting model"), ("sd1", 4, "every SD v1 model")):
        path = write_state(tiny_compvis_state(family=family, in_channels=in_channels), tmp_path / f"{family}.ckpt")
        models = load_checkpoint(path)
        assert (models.prediction_type, models.prediction_rule, models.image_size) == ("epsilon", rule, 512)


class Answering(torch.nn.Module):
    """A stand-in UNet that records its input and answers x + `offset`."""

    def __init__(self, offset: float):
        super().__init__()
        self.offset, self.calls = offset, []
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = UNetConfig(context_dim=1024)

    def forward(self, x, t, cond):
        self.calls.append((x, t, cond.context))
        return x + self.offset


@pytest.mark.parametrize("offset, expected", [(0.0, "epsilon"), (-0.5, "epsilon"), (PROBE_THRESHOLD - 0.01, "v_prediction"),
                                              (-3.0, "v_prediction"), (2.0, "epsilon")])
def test_the_probe_is_automatic1111_s(offset, expected):
    unet = Answering(offset)
    assert probe(unet) == expected
    [(x, t, context)] = unet.calls
    assert torch.equal(x, torch.full((1, 4, 8, 8), 0.5)) and t.tolist() == [999.0]
    assert torch.equal(context, torch.full((1, 2, 1024), 0.5))


@pytest.mark.parametrize("value", ["x0", "V", "", 1, 1.5])
def test_a_bad_override_is_refused_before_reading(tmp_path, value):
    with pytest.raises(InputError, match="prediction must be one of v, epsilon"):
        load_checkpoint(tmp_path / "missing.safetensors", prediction=value)


@pytest.mark.parametrize("value, expected", [("v", "v_prediction"), ("v_prediction", "v_prediction"),
                                             ("epsilon", "epsilon"), ("eps", "epsilon")])
def test_the_override_names(sd2_file, value, expected):
    assert load_checkpoint(sd2_file, prediction=value).prediction_type == expected


def test_damaged_metadata_is_refused(tmp_path, sd2_file):
    path = tmp_path / "damaged.safetensors"
    with safe_open(sd2_file, "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, path, metadata={"sd": json.dumps({"prediction_type": "x0"})})
    with pytest.raises(CheckpointError, match="its metadata names prediction type 'x0'"):
        load_checkpoint(path)


# ---- the command line and the converter ------------------------------------------------------------

def test_the_command_line_says_what_decided_and_the_png_remembers(tmp_path, sd2_file, capsys):
    path = copy_with(tmp_path, sd2_file, yaml=V_YAML.encode())
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    common = ["--checkpoint", str(path), "--no-progress", "--steps", "2", "--width", "64", "--height", "48"]
    assert run_demo.main([*common, "--prompt", "a cat", "--seed", "3", "--output", str(first)]) == 0
    err = capsys.readouterr().err
    assert "note: v-prediction model (model.yaml beside the checkpoint); --prediction overrides" in err
    assert run_demo.read_parameters(first)["prediction"] == "v"
    path.with_suffix(".yaml").unlink()  # --from-png alone now decides: the PNG says v
    assert run_demo.main([*common, "--from-png", str(first), "--output", str(again)]) == 0
    assert "(as asked)" in capsys.readouterr().err and again.read_bytes() == first.read_bytes()


def test_the_default_size_of_a_v_model_is_768(tmp_path, sd2_file, capsys):
    out = tmp_path / "big.png"
    assert run_demo.main(["--checkpoint", str(sd2_file), "--prediction", "v", "--prompt", "a cat", "--steps", "1",
                          "--guidance-scale", "1", "--no-progress", "--output", str(out)]) == 0
    assert "text-to-image, 768x768" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--prediction", "x0"], ["--prediction", "V"]])
def test_a_bad_prediction_flag_is_one_line(tmp_path, sd2_file, capsys, argv):
    out = tmp_path / "bad.png"
    assert run_demo.main(["--checkpoint", str(sd2_file), "--prompt", "a cat", *argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --prediction must be one of v, epsilon, got {argv[1]!r}\n" and not out.exists()


def test_the_converter_stores_the_decision(tmp_path, sd2_file, capsys):
    out = tmp_path / "converted.safetensors"
    assert convert_main([str(sd2_file), str(out), "--prediction", "v"]) == 0
    assert "note: v-prediction model (as asked)" in capsys.readouterr().err
    models = load_checkpoint(out)
    assert (models.prediction_type, models.prediction_rule, models.image_size) == (
        "v_prediction", "the file's metadata", 768)
    assert convert_main([str(sd2_file), str(tmp_path / "bad.safetensors"), "--prediction", "sample"]) == 2
    assert capsys.readouterr().err == "error: --prediction must be one of v, epsilon, got 'sample'\n"


# ---- other families' LoRAs and embeddings ----------------------------------------------------------

def to_k_lora(path, block: int, width: int):
    """A kohya LoRA of the cross-attention key projection (width, 64) of the first transformer of down block
    `block`."""
    name = f"lora_unet_down_blocks_{block}_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{name}.lora_down.weight": torch.ones(2, 64), f"{name}.lora_up.weight": torch.ones(width, 2)}, path)
    return path


def test_an_sd1_lora_on_sd2_and_the_reverse_are_refused(tmp_path, sd2_file):
    sd1 = load_checkpoint(write_state(tiny_compvis_state(), tmp_path / "sd1.ckpt"))
    sd2 = load_checkpoint(sd2_file)
    for lora, fits, other in ((to_k_lora(tmp_path / "sd1.safetensors", 0, 32), sd1, sd2),
                              (to_k_lora(tmp_path / "sd2.safetensors", 1, 128), sd2, sd1)):
        assert read_lora(lora, fits).layers  # a LoRA of that tiny model
        title = other.family.title
        with pytest.raises(InputError, match=f"for another model than this {title} one: use a LoRA made for {title}"):
            read_lora(lora, other)


@pytest.mark.parametrize("width, family", [(768, "SD v1"), (1024, "SD 2.x"), (1280, "SDXL")])
def test_an_embedding_of_another_width_is_refused(tmp_path, width, family):
    embedding = Embedding(name="style", vectors=torch.zeros(2, width), path=tmp_path / "style.pt", sha256="0" * 64)
    other = 1024 if width != 1024 else 768
    with pytest.raises(InputError, match=f"of width {width} \\(for {family}\\); this model's text encoder is {other}"):
        check_width(embedding, {None: other})


# ---- training --------------------------------------------------------------------------------------

MICRO = ["--preset", "micro", "--no-progress", "--sample-every", "1000", "--steps", "2"]


@pytest.fixture(scope="module")
def micro_vae(tmp_path_factory):
    from sd import train
    run_dir = tmp_path_factory.mktemp("micro")
    assert train.main(["vae", *MICRO, "--run-dir", str(run_dir), "--output", str(run_dir / "vae.safetensors")]) == 0
    return run_dir / "vae.safetensors"


def test_training_with_v_prediction_writes_a_v_model_and_fine_tuning_keeps_it(micro_vae, tmp_path, monkeypatch):
    from sd import objectives, train
    targets = []
    pair = objectives.DiffusionObjective.training_pair
    monkeypatch.setattr(objectives.DiffusionObjective, "training_pair",
                        lambda self, x0, noise, t: targets.append(self.options.prediction_type) or pair(self, x0, noise, t))
    v_model = tmp_path / "v.safetensors"
    assert train.main(["diffusion", *MICRO, "--init", str(micro_vae), "--prediction", "v", "--run-dir",
                       str(tmp_path / "a"), "--output", str(v_model)]) == 0
    assert load_checkpoint(v_model).prediction_type == "v_prediction" and set(targets) == {"v_prediction"}
    targets.clear()
    again = tmp_path / "again.safetensors"
    assert train.main(["diffusion", *MICRO, "--init", str(v_model), "--run-dir", str(tmp_path / "b"), "--output",
                       str(again)]) == 0
    assert load_checkpoint(again).prediction_type == "v_prediction" and set(targets) == {"v_prediction"}


def test_a_bad_training_prediction_is_one_line(tmp_path, capsys):
    from sd import train
    assert train.main(["vae", *MICRO, "--prediction", "x0", "--run-dir", str(tmp_path), "--output",
                       str(tmp_path / "out.safetensors")]) == 2
    assert capsys.readouterr().err == "error: --prediction must be one of v, epsilon, got 'x0'\n"
