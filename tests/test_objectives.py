"""`sd.objectives`: the diffusion objective's input, target and min-SNR weights against diffusers (DDPMScheduler
and its training scripts' `compute_snr`), the KL term against torch.distributions, and a stage run with a
non-default objective, whose options are part of the run's identity."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sd import train, training
from sd.checkpoint import load_checkpoint, save_checkpoint
from sd.errors import InputError
from sd.objectives import OBJECTIVES, DiffusionObjective, DiffusionOptions, VAEObjective, kl_divergence, mse
from tests.reference import SD_BETAS, oracle

OPTIONS = [DiffusionOptions(), DiffusionOptions(min_snr_gamma=5.0), DiffusionOptions("v_prediction"),
           DiffusionOptions("v_prediction", min_snr_gamma=5.0), DiffusionOptions(min_snr_gamma=0.5)]


@pytest.fixture(scope="module")
def ddpm():
    return oracle("diffusers").DDPMScheduler(**SD_BETAS)


def diffusers_loss(scheduler, prediction, target, timesteps, options: DiffusionOptions) -> torch.Tensor:
    """The loss of diffusers' examples/text_to_image/train_text_to_image.py, --snr_gamma included."""
    if options.min_snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    snr = oracle("diffusers.training_utils").compute_snr(scheduler, timesteps)
    weights = torch.stack([snr, options.min_snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    weights = weights / (snr + 1 if options.prediction_type == "v_prediction" else snr)
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_diffusion_input_target_and_loss_match_diffusers(ddpm, options):
    gen = torch.Generator().manual_seed(0)
    x0, noise, prediction = (torch.randn(6, 4, 8, 8, generator=gen) for _ in range(3))
    t = torch.tensor([0, 1, 250, 500, 998, 999])  # SNR from about 1e4 down to 5e-3: both sides of gamma
    noisy, wanted, weights = DiffusionObjective(options=options).training_pair(x0, noise, t)
    assert torch.equal(noisy, ddpm.add_noise(x0, noise, t))
    expected = ddpm.get_velocity(x0, noise, t) if options.prediction_type == "v_prediction" else noise
    torch.testing.assert_close(wanted, expected, rtol=1e-6, atol=1e-6)
    assert (weights is None) == (options.min_snr_gamma is None)
    torch.testing.assert_close(mse(prediction, wanted, weights),
                               diffusers_loss(ddpm, prediction, expected, t, options), rtol=1e-6, atol=0)


def test_min_snr_weights_are_the_formula_of_hang_et_al(ddpm):
    """min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v, with SNR of diffusers' alphas."""
    t = torch.arange(0, 1000, 37)
    x0 = torch.zeros(len(t), 4, 2, 2)
    snr = (ddpm.alphas_cumprod / (1 - ddpm.alphas_cumprod))[t]
    for prediction_type, denominator in (("epsilon", snr), ("v_prediction", snr + 1)):
        objective = DiffusionObjective(options=DiffusionOptions(prediction_type, min_snr_gamma=5.0))
        _, _, weights = objective.training_pair(x0, x0, t)
        torch.testing.assert_close(weights, snr.clamp(max=5.0) / denominator, rtol=1e-5, atol=0)


@pytest.mark.parametrize("options", [{"prediction_type": "sample"}, {"min_snr_gamma": 0.0}, {"min_snr_gamma": -5}],
                         ids=str)
def test_bad_diffusion_options_are_refused_in_one_line(options):
    with pytest.raises(InputError) as e:
        DiffusionOptions(**options)
    assert "\n" not in str(e.value) and str(next(iter(options.values()))) in str(e.value)


def test_kl_term_matches_torch_distributions():
    gen = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    posterior = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(posterior, prior).flatten(1).sum(1)  # (3,)
    torch.testing.assert_close(kl_divergence(mean, logvar), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage, text_encoder, trains", [("vae", "train", ("vae",)),
                                                          ("diffusion", "train", ("unet", "clip")),
                                                          ("diffusion", "freeze", ("unet",))])
def test_each_stage_has_its_objective(stage, text_encoder, trains):
    objective = OBJECTIVES[stage].from_args(SimpleNamespace(text_encoder=text_encoder, prediction=None))
    assert isinstance(objective, {"vae": VAEObjective, "diffusion": DiffusionObjective}[stage])
    assert objective.trains == trains and objective.identity() == {}  # defaults: the identity of states before


def test_a_stage_trains_on_another_objective_whose_options_its_resume_checks(tmp_path):
    """v-prediction with min-SNR on the micro preset: finite losses and samples; a resume with the default
    objective is refused, naming both options."""
    args = train.parse_args(["all", "--preset", "micro", "--no-progress", "--run-dir", str(tmp_path),
                             "--output", str(tmp_path / "out.safetensors"), "--sample-every", "2"])
    init = tmp_path / "init.safetensors"
    save_checkpoint(train.initial_models(args, train.PRESETS["micro"]), init)
    cfg = training.StageConfig(steps=2, batch_size=2, lr=1e-3, warmup=1, pool=4)

    def stage(objective):
        return training.Stage("diffusion", load_checkpoint(init), train.dataset(args, 32), cfg, args, objective)

    run = stage(DiffusionObjective(options=DiffusionOptions("v_prediction", min_snr_gamma=5.0)))
    run.run(resume=False)
    assert [s for s, _ in run.losses] == [0, 1] and all(math.isfinite(loss) for _, loss in run.losses)
    assert (tmp_path / "diffusion-samples-000002.png").is_file()
    with pytest.raises(training.TrainingError, match=r"differs in: min_snr_gamma, prediction_type\)"):
        stage(None).run(resume=True)
