"""The fine-tuning commands as a user runs them (`python -m sd.train lora|dreambooth|textual-inversion`), on the
micro preset's checkpoint: what each writes loads with our loaders and changes what it should; bad input of
every kind is one line, exit 2, and leaves nothing behind (no run folder, no output); a refused rerun keeps the
finished run's files byte for byte."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sd import objectives, train, training
from sd.checkpoint import load_checkpoint
from sd.embeddings import read_embedding
from sd.pipeline import StableDiffusion

RUN = ["--resolution", "32", "--bucket-step", "8", "--steps", "2", "--lr", "1e-2", "--device", "cpu",
       "--no-progress"]
SUBJECT = ["--instance-prompt", "a photo of sks shape", "--class-prompt", "a photo of shape", "--num-class-images",
           "2"]
TOKEN = ["--token", "my-shape", "--init-word", "shape", "--vectors", "2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """kohya's folders: '2_sks shape' (three images, one with its own caption) and '2_a my-shape'."""
    root = tmp_path_factory.mktemp("data")
    for name, colours in [("subject/2_sks shape", ["red", "blue", "green"]), ("token/2_a my-shape", ["red", "blue"])]:
        (root / name).mkdir(parents=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (40, 32) if i else (32, 40), colour).save(root / name / f"{i}.png")
    (root / "subject/2_sks shape/2.txt").write_text("sks shape, green")
    (root / "token/2_a my-shape/1.txt").write_text("my-shape, blue")
    return root


COMMANDS = {  # name: the command's own flags, the --data folder
    "lora": (["lora", "--rank", "2", "--conv-dim", "2", "--save-peft"], "subject"),
    "dreambooth": (["dreambooth", *SUBJECT], "subject"),
    "dreambooth-lora": (["dreambooth", "--lora", "--rank", "2", *SUBJECT], "subject"),
    "textual-inversion": (["textual-inversion", *TOKEN], "token"),
}


def command(micro_init, folders, run_dir, name: str, *extra: str) -> list[str]:
    flags, data = COMMANDS[name]
    return [*flags, "--init", str(micro_init), "--data", str(folders / data), *RUN, "--run-dir", str(run_dir),
            "--output", str(run_dir / "out.safetensors"), *extra]


@pytest.fixture(scope="module")
def runs(micro_init, folders, tmp_path_factory):
    """Each command run once to the end: its run folder."""
    done = {}
    for name in COMMANDS:
        done[name] = tmp_path_factory.mktemp(name)
        assert train.main(command(micro_init, folders, done[name], name)) == 0, name
    return done


def weights(pipe: StableDiffusion) -> dict[str, torch.Tensor]:
    return {f"{net}.{k}": v.clone() for net in ("unet", "clip") for k, v in getattr(pipe.models, net).state_dict().items()}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("name", ["lora", "dreambooth-lora"])
def test_a_trained_lora_loads_merges_and_unloads(micro_init, runs, name):
    pipe = StableDiffusion.from_checkpoint(micro_init)
    base = weights(pipe)
    pipe.load_lora(runs[name] / "out.safetensors")
    merged = weights(pipe)
    touched = changed(base, merged)
    assert any(k.startswith("unet.") for k in touched) and any(k.startswith("clip.") for k in touched)
    if name == "lora":  # LoCon: the 3x3 convolutions too; the PEFT copy merges to the same weights
        assert "unet.input_blocks.1.0.in_layers.2.weight" in touched
        pipe.unload_lora()
        pipe.load_lora(runs[name] / "out.peft.safetensors")
        peft = weights(pipe)
        assert changed(base, peft) == touched
        for k in touched:
            torch.testing.assert_close(peft[k], merged[k], rtol=1e-5, atol=1e-6)
    pipe.unload_lora()
    assert not changed(base, weights(pipe))


def test_the_lora_file_says_how_it_was_trained(runs):
    with safe_open(runs["lora"] / "out.safetensors", "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora", "2", "1.0")
    assert (meta["ss_output_name"], meta["ss_max_train_steps"], meta["ss_steps"]) == ("out", "2", "2")
    assert meta["ss_num_train_images"] == "6" and meta["ss_resolution"] == "(32, 32)"
    assert meta["ss_tag_frequency"] == '{"2_sks shape": {"sks shape": 3, "green": 1}}'  # per image, as kohya counts
    assert meta["sshs_model_hash"] and meta["ss_base_model_version"] == "sd_v1"


def test_dreambooth_writes_a_checkpoint_of_a_new_unet_on_the_base_vae_and_text_encoder(micro_init, runs):
    base, tuned = load_checkpoint(micro_init), load_checkpoint(runs["dreambooth"] / "out.safetensors")
    for net, trained in [("unet", True), ("vae", False), ("clip", False)]:
        a, b = getattr(base, net).state_dict(), getattr(tuned, net).state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a) == trained, net
    class_images = sorted(p.name for p in (runs["dreambooth"] / "class-images").iterdir())
    assert class_images == ["class-0000.png", "class-0000.txt", "class-0001.png", "class-0001.txt"]
    assert (runs["dreambooth"] / "class-images" / "class-0001.txt").read_text() == "a photo of shape"


def test_the_embedding_loads_from_both_files_as_the_same_two_vectors_trained_from_the_init_word(micro_init, runs):
    pipe = StableDiffusion.from_checkpoint(micro_init)
    pair = [pipe.load_embedding(runs["textual-inversion"] / "out.safetensors", "my-shape").vectors,
            read_embedding(runs["textual-inversion"] / "out.pt", "my-shape").vectors]
    torch.testing.assert_close(pair[0], pair[1], rtol=0, atol=0)
    init_row = pipe.models.clip.embeddings.token_embedding.weight[pipe.tokenizer.tokenize(["shape"])[0][0]]
    assert pair[0].shape == (2, init_row.shape[0])
    assert 0 < (pair[0] - init_row).abs().max() < 1  # moved from the init word by two steps of lr 1e-2
    image = pipe.text_to_image("a my-shape", seed=0, steps=2, width=32, height=32, progress=False)[0]
    assert image.size == (32, 32)


def test_dreambooths_loss_is_the_instance_mse_plus_the_weighted_prior_mse(micro_init, folders, tmp_path, monkeypatch):
    """Each step of a real run: the loss equals diffusers' DreamBooth formula, mse(instance) + w mse(class) over
    a batch of n instance and n class images, halved (our loss is sum_i w_i mse_i / B); the class images are
    known by their caption, the class prompt."""
    steps, weight = [], 0.3
    forward, mse = objectives.Denoiser.forward, objectives.mse

    def recording_forward(self, noisy, t, captions, micro=None):
        steps.append({"captions": captions})
        return forward(self, noisy, t, captions, micro)

    def recording_mse(prediction, wanted, weights=None):
        loss = mse(prediction, wanted, weights)
        steps[-1].update(prediction=prediction.detach(), wanted=wanted, loss=loss.detach())
        return loss

    monkeypatch.setattr(objectives.Denoiser, "forward", recording_forward)
    monkeypatch.setattr(objectives, "mse", recording_mse)
    argv = command(micro_init, folders, tmp_path / "run", "dreambooth", "--batch-size", "4", "--steps", "6",
                   "--prior-loss-weight", str(weight), "--no-buckets")
    assert train.main(argv) == 0
    balanced = 0
    for step in steps:
        is_class = torch.tensor([c == "a photo of shape" for c in step["captions"]])
        per_image = (step["prediction"] - step["wanted"]).square().flatten(1).mean(1)  # (B,)
        expected = (per_image[~is_class].sum() + weight * per_image[is_class].sum()) / len(per_image)
        torch.testing.assert_close(step["loss"], expected, rtol=1e-5, atol=0)
        if is_class.sum() * 2 == len(per_image):
            diffusers = (F.mse_loss(step["prediction"][~is_class], step["wanted"][~is_class])
                         + weight * F.mse_loss(step["prediction"][is_class], step["wanted"][is_class]))
            torch.testing.assert_close(step["loss"], diffusers / 2, rtol=1e-5, atol=0)
            balanced += 1
    assert len(steps) == 6 and balanced and any(0 < s["captions"].count("a photo of shape") for s in steps)


def test_every_command_removes_its_lock(runs):
    assert not any((run / training.LOCK_NAME).exists() for run in runs.values())


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", COMMANDS)
def test_a_rerun_without_resume_or_overwrite_keeps_every_file(micro_init, folders, runs, name, capsys):
    before = snapshot(runs[name])
    assert train.main(command(micro_init, folders, runs[name], name)) == 2
    assert "already exists; continue that run with --resume" in capsys.readouterr().err
    assert snapshot(runs[name]) == before


def test_a_finished_lora_run_extended_goes_on_from_its_state(micro_init, folders, runs, tmp_path):
    run = tmp_path / "run"
    assert train.main(command(micro_init, folders, run, "lora")) == 0
    assert train.main(command(micro_init, folders, run, "lora", "--resume", "--steps", "3")) == 0
    assert torch.load(run / "lora-state.pt", weights_only=True)["step"] == 3
    assert load_file(run / "out.safetensors").keys() == load_file(runs["lora"] / "out.safetensors").keys()


# Bad input: (command, flags replacing or adding to its own, what the one line says)
BAD = {
    "no identifier": ("dreambooth", ["--instance-prompt", "a photo of shape"],
                      "--instance-prompt 'a photo of shape' has no word that --class-prompt 'a photo of shape' lacks"),
    "folder names the class only": ("dreambooth-folder", ["--class-prompt", "a photo of sks shape"],
                                    "the instance caption 'sks shape' has no word that --class-prompt"),
    "init word of two tokens": ("textual-inversion", ["--init-word", "new york"], "--init-word 'new york' is 2 tokens"),
    "token missing from a caption": ("textual-inversion-subject", [], "does not use the token 'my-shape'"),
    "rank above a width": ("lora", ["--rank", "33"], "--rank 33 is above the width of the layer"),
    "conv rank above a width": ("lora", ["--conv-dim", "1000"], "--conv-dim 1000 is above the width of the layer"),
    "folder not kohya's": ("lora-bad-folder", [], "folder 'x_dog' does not follow kohya's '<repeats>_<caption>' naming"),
    "caption dropout for a token": ("textual-inversion", ["--caption-dropout", "0.1"], "--caption-dropout does not go"),
    "dropout of one": ("lora", ["--network-dropout", "1"], "--network-dropout must be at least 0 and below 1"),
    "negative keep tokens": ("lora", ["--keep-tokens", "-1"], "--keep-tokens must be a whole number"),
    "resolution off the step": ("lora", ["--resolution", "36"], "--resolution 36 must be a multiple of --bucket-step 8"),
    "resolution off the buckets": ("lora", ["--min-bucket-side", "128"], "must lie between --min-bucket-side 128"),
    "negative class images": ("dreambooth", ["--num-class-images", "-1"], "--num-class-images must be a whole number"),
    "nan prior weight": ("dreambooth", ["--prior-loss-weight", "nan"], "--prior-loss-weight must be between"),
    "nothing trains": ("lora", ["--unet-lr", "0", "--text-encoder-lr", "0"], "trains nothing"),
    "no vectors": ("textual-inversion", ["--vectors", "0"], "--vectors"),
    "missing data": ("lora-missing-data", [], "is not a folder; give a folder of subfolders like '10_sks dog'"),
    "missing prompts file": ("lora", ["--sample-prompts", "/nonexistent/prompts.txt"], "--sample-prompts file not found"),
    "infinite noise offset": ("lora", ["--noise-offset", "inf"], "--noise-offset must be between"),
    "zero gamma": ("lora", ["--min-snr-gamma", "0"], "--min-snr-gamma must be above 0"),
    "a token of the vocabulary": ("textual-inversion", ["--token", "shape"], "--token"),
}
VARIANTS = {  # a command whose --data differs from its own: (command, folder)
    "dreambooth-folder": ("dreambooth", "subject"), "textual-inversion-subject": ("textual-inversion", "subject"),
    "lora-bad-folder": ("lora", "bad"), "lora-missing-data": ("lora", "missing"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_leaves_nothing(micro_init, folders, tmp_path, capsys, case):
    name, flags, says = BAD[case]
    name, data = VARIANTS.get(name, (name, None))
    argv = command(micro_init, folders, tmp_path / "run", name)
    if data is not None:
        (tmp_path / "bad" / "x_dog").mkdir(parents=True)
        Image.new("RGB", (32, 32), "red").save(tmp_path / "bad" / "x_dog" / "a.png")
        argv[argv.index("--data") + 1] = str(folders / data if data == "subject" else tmp_path / data)
        if name == "dreambooth":
            argv.remove("--instance-prompt"), argv.remove("a photo of sks shape")
    assert train.main([*argv, *flags]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", train.FINE_TUNES)
def test_help_explains_every_flag_and_shows_the_commands_numbers(name, capsys):
    parser = train.command_parser()
    sub = parser._subparsers._group_actions[0].choices[name]
    assert all(action.help for action in sub._actions), [a.dest for a in sub._actions if not a.help]
    with pytest.raises(SystemExit) as done:
        train.parse_args([name, "--help"])
    cfg = train.FINE_TUNES[name].cfg
    out = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and f"defaults: --steps {cfg.steps}, --batch-size {cfg.batch_size}, --lr {cfg.lr:g}" in out
