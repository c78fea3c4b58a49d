"""The samplers against diffusers' schedulers configured as SD v1's, driven by a toy noise model.

Each run compares the whole trajectory (every intermediate x) as the pipelines drive them, with the
same timesteps, starting noise and generator seed, for full runs and for img2img runs that begin
part-way (set_begin_index + add_noise, and add_noise later on as inpainting does).
"""

import inspect

import pytest
import torch

from sd.errors import InputError
from sd.parameterization import noised, scales, target, to_epsilon
from sd.samplers import DEFAULT_SAMPLER, SAMPLERS, NoiseSchedule, make_sampler
from sd.samplers.ddim import DDIMInverseSampler
from sd.samplers import spacing
from sd.samplers.spacing import karras
from tests.conftest import rel_err
from tests.reference import reference_scheduler, set_reference_timesteps

TOL = 1e-5
SHAPE = (2, 4, 8, 8)

# (registry name, options): every sampler, the sigma-space ones with and without Karras sigmas.
CASES = [("ddpm", {}), ("ddim", {}), ("ddim", {"eta": 0.7}), ("plms", {}),
         ("euler", {}), ("euler", {"karras": True}), ("euler_a", {}), ("euler_a", {"karras": True}),
         ("heun", {}), ("heun", {"karras": True}), ("lms", {}), ("lms", {"karras": True}),
         ("dpmpp_2m", {}), ("dpmpp_2m_karras", {}), ("lcm", {})]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in options.items()) for name, options in CASES]

_weights = torch.Generator().manual_seed(1234)
W = torch.randn(SHAPE[1:], generator=_weights)  # (4, 8, 8)
B = torch.randn(SHAPE[1:], generator=_weights)  # (4, 8, 8)


def toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the UNet: nonlinear in x, smooth in (possibly fractional) t."""
    s = float(t) / 1000
    return torch.tanh(W.to(x.device) * x + B.to(x.device) * s) * (1 + s)


def run(step, scale, timesteps, x, seed=7):
    """The pipeline's loop; returns every intermediate x."""
    generator = torch.Generator().manual_seed(seed)
    trajectory = []
    for t in timesteps:
        x = step(toy_eps(scale(x, t), t), t, x, generator)
        trajectory.append(x)
    return trajectory


def reference_step(ref, step_kwargs):
    accepts_generator = "generator" in inspect.signature(ref.step).parameters

    def step(eps, t, x, generator):
        extra = {"generator": generator} if accepts_generator else {}
        return ref.step(eps, t, x, **step_kwargs, **extra, return_dict=False)[0]

    return step


def noise(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))  # (2, 4, 8, 8)


def assert_same_trajectory(ours, expected, order):
    assert len(ours) == len(expected)
    errors = [rel_err(a, b) for a, b in zip(ours, expected)]
    assert max(errors) < TOL, f"worst step {errors.index(max(errors))} of {len(errors)}: {max(errors):.2e}"
    # the comparison means something only if the reference moves at every step (of `order` calls)
    moves = [rel_err(b, a) for a, b in zip(expected, expected[order:])]
    assert min(moves) > 10 * TOL


@pytest.mark.parametrize("steps", [10, 25, 13])
@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_full_run_matches_diffusers(name, options, steps):
    ours = make_sampler(name, **options)
    ref, step_kwargs = reference_scheduler(name, options)
    ours.set_timesteps(steps)
    set_reference_timesteps(ref, name, options, steps)
    assert ours.order == ref.order
    assert ours.timesteps.dtype == ref.timesteps.dtype
    torch.testing.assert_close(ours.timesteps.double(), ref.timesteps.double(), rtol=0, atol=1e-4)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)

    x = noise(0) * ours.init_noise_sigma
    expected = run(reference_step(ref, step_kwargs), ref.scale_model_input, ref.timesteps,
                   noise(0) * ref.init_noise_sigma)
    assert_same_trajectory(run(ours.step, ours.scale_model_input, ours.timesteps, x), expected, ours.order)


# The samplers whose diffusers schedulers take a zero-terminal-SNR schedule (rescale_betas_zero_snr).
# (euler_a with Karras sigmas is left out: its reference borrows an SD-schedule Euler's sigmas.)
ZERO_SNR_CASES = [(name, options) for name, options in CASES if name in ("ddpm", "ddim", "euler", "euler_a",
                                                                         "dpmpp_2m", "dpmpp_2m_karras", "lcm")
                  and (name, options) != ("euler_a", {"karras": True})]


@pytest.mark.parametrize(("name", "options"), ZERO_SNR_CASES,
                         ids=[name + "".join(f"-{k}={v}" for k, v in o.items()) for name, o in ZERO_SNR_CASES])
def test_zero_terminal_snr_runs_match_diffusers(name, options):
    """A model marked `ztsnr` (Lin et al., 2024): the rescaled betas, a_bar_T held at 2**-24 (diffusers holds it
    there for its sigma schedulers; its DDIM, DDPM and LCM keep 0, where an epsilon model's x0 is inf, so theirs
    is held there too), and trailing integer timesteps, which start at 999."""
    from sd.checkpoint import ZERO_SNR_SCHEDULE
    ours = make_sampler(name, schedule=ZERO_SNR_SCHEDULE, **options)
    ref, step_kwargs = reference_scheduler(name, options)
    spacing = {"timestep_spacing": "trailing"} if name in ("ddpm", "ddim") else {}
    ref = type(ref).from_config(ref.config, rescale_betas_zero_snr=True, **spacing)
    ref.alphas_cumprod[-1] = 2.0**-24
    ours.set_timesteps(13)
    set_reference_timesteps(ref, name, options, 13)
    torch.testing.assert_close(ours.timesteps.double(), ref.timesteps.double(), rtol=0, atol=1e-4)
    assert float(ours.timesteps[0]) == 999 or name in ("lcm", "dpmpp_2m_karras")
    x = noise(0) * ours.init_noise_sigma
    expected = run(reference_step(ref, step_kwargs), ref.scale_model_input, ref.timesteps,
                   noise(0) * ref.init_noise_sigma)
    trajectory = run(ours.step, ours.scale_model_input, ours.timesteps, x)
    assert max(rel_err(a, b) for a, b in zip(trajectory, expected)) < TOL and len(trajectory) == len(expected)
    assert (expected[-1] - expected[0]).abs().max() > 1  # the run goes somewhere (from sigma 4096 few steps move much)


def test_trailing_timesteps_are_diffusers_at_every_step_count():
    """n trailing timesteps for every n of the schedule, as diffusers' DDIM with "trailing" spacing (numpy's arange,
    float step and all); where numpy's arange runs to n + 1 entries, ending at t = -1, the n kept are its first."""
    from sd.checkpoint import ZERO_SNR_SCHEDULE
    ref, _ = reference_scheduler("ddim", {})
    ref = type(ref).from_config(ref.config, timestep_spacing="trailing", rescale_betas_zero_snr=True)
    longer = []
    for n in range(1, ZERO_SNR_SCHEDULE.num_train_timesteps + 1):
        ref.set_timesteps(n)
        ours = ZERO_SNR_SCHEDULE.integer_timesteps(n)
        assert len(ours) == n and ours[0] == 999 and int(ours[-1]) >= 0 and torch.equal(ours, ref.timesteps[:n]), n
        longer += [n] * (len(ref.timesteps) > n)
    assert longer  # the step counts where numpy's arange overshoots (61, 103, ...) were among those tried


# The samplers whose diffusers step returns its estimate of the clean latents (pred_original_sample).
X0_CASES = [(name, options) for name, options in CASES if name in ("ddpm", "ddim", "euler", "euler_a", "lms")]


@pytest.mark.parametrize(("name", "options"), X0_CASES, ids=[name + "".join(f"-{k}={v}" for k, v in o.items()) for name, o in X0_CASES])
def test_predicted_original_matches_diffusers_at_every_step(name, options):
    """`predicted_original`, what the pipeline's step callback reports, against diffusers' pred_original_sample."""
    ours = make_sampler(name, **options)
    ref, step_kwargs = reference_scheduler(name, options)
    ours.set_timesteps(10)
    set_reference_timesteps(ref, name, options, 10)
    x, generators = noise(0) * ours.init_noise_sigma, [torch.Generator().manual_seed(7) for _ in range(2)]
    extra = {"generator": generators[1]} if "generator" in inspect.signature(ref.step).parameters else {}
    for t in ours.timesteps:
        eps = toy_eps(ours.scale_model_input(x, t), t)
        ref.scale_model_input(x, t)
        out = ref.step(eps, t, x, **step_kwargs, **extra)
        assert rel_err(ours.predicted_original(eps, t, x), out.pred_original_sample) < TOL
        x = ours.step(eps, t, x, generators[0])


@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_img2img_run_matches_diffusers(name, options):
    """diffusers' img2img: skip the first steps, noise the image latents to the first timestep left,
    and (inpainting) noise them to the next timestep after every step."""
    steps, strength = 12, 0.6
    ours = make_sampler(name, **options)
    ref, step_kwargs = reference_scheduler(name, options)
    ours.set_timesteps(steps)
    set_reference_timesteps(ref, name, options, steps)
    begin = (steps - int(steps * strength)) * ours.order
    ours.set_begin_index(begin)
    if name == "lms":
        # diffusers' LMS takes its order from the absolute step index, so it would combine one slope with
        # 4th-order weights; ours, like k-diffusion, restarts the history: diffusers on the remaining sigmas
        ref.sigmas, ref.timesteps = ref.sigmas[begin:], ref.timesteps[begin:]
    elif hasattr(ref, "set_begin_index"):
        ref.set_begin_index(begin)
    timesteps = ours.timesteps[begin:]
    ref_timesteps = ref.timesteps[len(ref.timesteps) - len(timesteps):]
    torch.testing.assert_close(timesteps.double(), ref_timesteps.double(), rtol=0, atol=1e-4)
    image, fresh_noise = noise(1), noise(2)
    x = ours.add_noise(image, fresh_noise, timesteps[:1].repeat(SHAPE[0]))
    x_ref = ref.add_noise(image, fresh_noise, ref_timesteps[:1].repeat(SHAPE[0]))
    assert rel_err(x, x_ref) < TOL and rel_err(x, image) > 0.1

    def with_inpainting_noise(step, add_noise, timesteps):
        """After every step but the last, also noise the image to the next timestep (checked below)."""
        noised = []

        def step_and_noise(eps, t, x, generator):
            x = step(eps, t, x, generator)
            i = len(noised)
            if i + 1 < len(timesteps):
                noised.append(add_noise(image, fresh_noise, timesteps[i + 1:i + 2]))
            return x

        return step_and_noise, noised

    ours_step, ours_noised = with_inpainting_noise(ours.step, ours.add_noise, timesteps)
    ref_step, ref_noised = with_inpainting_noise(reference_step(ref, step_kwargs), ref.add_noise, ref_timesteps)
    expected = run(ref_step, ref.scale_model_input, ref_timesteps, x_ref)
    assert_same_trajectory(run(ours_step, ours.scale_model_input, timesteps, x), expected, ours.order)
    assert max(rel_err(a, b) for a, b in zip(ours_noised, ref_noised)) < TOL


@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_timesteps_and_sigmas_match_diffusers_for_every_step_count(name, options):
    """Rounding ties included (diffusers' DPM-Solver rounds 499.5 or a hair less at 26 and 30 steps)."""
    ours = make_sampler(name, **options)
    ref, _ = reference_scheduler(name, options)
    for steps in range(2, min(61, ours.max_steps + 1)):
        ours.set_timesteps(steps)
        set_reference_timesteps(ref, name, options, steps)
        if ours.timesteps.is_floating_point() and ours.spacing is karras:  # fractional timesteps of Karras sigmas
            torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=1e-4)
        else:
            assert torch.equal(ours.timesteps, ref.timesteps), steps
        if hasattr(ours, "sigmas"):
            assert torch.equal(ours.sigmas, ref.sigmas), steps


def test_samplers_differ_from_each_other():
    """Sanity check of the tolerance: any two samplers end more than 100 TOL apart after 10 steps."""
    finals = {}
    for name in SAMPLERS:
        sampler = make_sampler(name)
        sampler.set_timesteps(10)
        x = noise(0) * sampler.init_noise_sigma
        finals[name] = run(sampler.step, sampler.scale_model_input, sampler.timesteps, x)[-1]
    for a in finals:
        for b in finals:
            if a < b:
                assert rel_err(finals[a], finals[b]) > 100 * TOL, (a, b)


def test_stochastic_samplers_follow_the_generator():
    for name, options in [("ddpm", {}), ("ddim", {"eta": 1.0}), ("euler_a", {})]:
        finals = []
        for seed in (7, 7, 8):
            sampler = make_sampler(name, **options)
            sampler.set_timesteps(10)
            x = noise(0) * sampler.init_noise_sigma
            finals.append(run(sampler.step, sampler.scale_model_input, sampler.timesteps, x, seed)[-1])
        assert torch.equal(finals[0], finals[1]) and rel_err(finals[0], finals[2]) > 100 * TOL, name


def final_sample(name: str, options: dict, steps: int) -> torch.Tensor:
    sampler = make_sampler(name, **options)
    sampler.set_timesteps(steps)
    return run(sampler.step, sampler.scale_model_input, sampler.timesteps, noise(0) * sampler.init_noise_sigma)[-1]


def repeating_step_counts(name: str, options: dict) -> list[int]:
    """The step counts from 1 to the most (1000) whose timesteps repeat a value (beyond Heun's and PLMS's own
    repeats)."""
    sampler = make_sampler(name, **options)
    counts = []
    for steps in range(1, sampler.max_steps + 1):
        sampler.set_timesteps(steps)
        if len(sampler.timesteps.unique()) < steps:
            counts.append(steps)
    return counts


@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_every_step_count_gives_a_finite_run(name, options):
    """Every step count from 1 to the most (1000; lcm: 50) builds its timesteps; the extremes, and step counts whose timesteps
    repeat (DPM-Solver++ rounds to integers: two 500s at 1000 steps), run to a finite end. A repeated
    timestep must not change the answer either: 1000 steps land next to 999."""
    repeating = repeating_step_counts(name, options)
    most = make_sampler(name, **options).max_steps
    finals = {steps: final_sample(name, options, steps)  # each run once: 999 and 1000 are compared below
              for steps in sorted({1, 2, 3, most - 1, most, *repeating[:2], *repeating[-1:]})}
    for steps, x in finals.items():
        assert torch.isfinite(x).all(), steps
    if 1000 in repeating and not options.get("karras") and name != "dpmpp_2m_karras":
        assert rel_err(finals[1000], finals[999]) < 1e-2


def test_make_sampler_rejects_unknown_names_and_options():
    with pytest.raises(InputError) as error:
        make_sampler("dpm++")
    message = str(error.value)
    assert "dpm++" in message and "\n" not in message
    assert all(name in message for name in SAMPLERS)
    with pytest.raises(InputError, match="karras"):
        make_sampler("ddim", karras=True)
    with pytest.raises(InputError, match="steps"):
        make_sampler("euler").set_timesteps(0)
    assert DEFAULT_SAMPLER in SAMPLERS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_cuda_run_matches_cpu_run_with_a_cpu_generator(name, options):
    trajectories = []
    for device in ("cpu", "cuda"):
        sampler = make_sampler(name, **options)
        sampler.set_timesteps(10, device)
        begin = 4 * sampler.order
        sampler.set_begin_index(begin)
        x = sampler.add_noise(noise(1).to(device), noise(0).to(device), sampler.timesteps[begin:begin + 1])
        trajectories.append(run(sampler.step, sampler.scale_model_input, sampler.timesteps[begin:], x))
    assert trajectories[1][-1].device.type == "cuda"
    assert max(rel_err(a.cpu(), b) for a, b in zip(trajectories[1], trajectories[0])) < 1e-4


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_inversion_matches_diffusers(steps):
    """DDIM inversion, step by step, against diffusers' DDIMInverseScheduler on SD's configuration."""
    ours = DDIMInverseSampler()
    ref, _ = reference_scheduler("ddim_inverse", {})
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.timesteps[0] < ours.timesteps[-1]
    expected = run(reference_step(ref, {}), ref.scale_model_input, ref.timesteps, noise(0))
    assert_same_trajectory(run(ours.step, ours.scale_model_input, ours.timesteps, noise(0)), expected, 1)


# diffusers' PNDM turns the combined multistep output into eps with the sample of the transfer, another method
V_CASES = [(name, options) for name, options in CASES if name != "plms"]


@pytest.mark.parametrize(("name", "options"), V_CASES, ids=[name + "".join(f"-{k}={v}" for k, v in o.items()) for name, o in V_CASES])
def test_v_prediction_matches_diffusers(name, options):
    """A v-predicting model through the pipeline's one conversion (`to_epsilon` at the sampler's `input_scales`)
    and our eps samplers, against diffusers' schedulers configured with prediction_type="v_prediction"."""
    ours = make_sampler(name, **options)
    ref, step_kwargs = reference_scheduler(name, options)
    ref = type(ref).from_config(ref.config, prediction_type="v_prediction")
    ours.set_timesteps(10)
    set_reference_timesteps(ref, name, options, 10)

    def step(v, t, x, generator):
        x_t = ours.scale_model_input(x, t)
        return ours.step(to_epsilon("v_prediction", v, x_t, *ours.input_scales(t, x_t)), t, x, generator)

    expected = run(reference_step(ref, step_kwargs), ref.scale_model_input, ref.timesteps,
                   noise(0) * ref.init_noise_sigma)
    assert_same_trajectory(run(step, ours.scale_model_input, ours.timesteps, noise(0) * ours.init_noise_sigma),
                           expected, ours.order)


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_inversion_of_a_v_prediction_model_matches_diffusers(steps):
    ours = DDIMInverseSampler()
    ref, _ = reference_scheduler("ddim_inverse", {})
    ref = type(ref).from_config(ref.config, prediction_type="v_prediction")
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)

    def step(v, t, x, generator):
        return ours.step(to_epsilon("v_prediction", v, x, *ours.input_scales(t, x)), t, x, generator)

    expected = run(reference_step(ref, {}), ref.scale_model_input, ref.timesteps, noise(0))
    assert_same_trajectory(run(step, ours.scale_model_input, ours.timesteps, noise(0)), expected, 1)


def test_training_target_and_forward_process_match_diffusers():
    """`noised` and `target` (what training uses) against diffusers' add_noise and get_velocity; eps comes back."""
    ref, _ = reference_scheduler("ddpm", {})
    x0, eps, t = noise(1), noise(2), torch.tensor([3, 990])
    alpha, s = scales(NoiseSchedule().alphas_cumprod, t, x0)  # (2, 1, 1, 1) each
    x_t = noised(x0, eps, alpha, s)
    assert torch.equal(x_t, ref.add_noise(x0, eps, t))
    assert torch.equal(target("epsilon", x0, eps, alpha, s), eps)
    v = target("v_prediction", x0, eps, alpha, s)
    assert rel_err(v, ref.get_velocity(x0, eps, t)) < TOL
    assert rel_err(to_epsilon("v_prediction", v, x_t, alpha, s), eps) < TOL
    with pytest.raises(InputError, match="sample"):
        target("sample", x0, eps, alpha, s)


@pytest.mark.parametrize("name", ["euler", "heun", "lms", "dpmpp_2m"])
def test_exponential_spacing_matches_diffusers(name):
    """spacing="exponential" against diffusers' use_exponential_sigmas=True: timesteps, sigmas and a run.
    Deviation: DPM-Solver++ rounds the timesteps of these sigmas as it does those of Karras sigmas, where
    diffusers truncates them (and rounds Karras ones); the run is compared on our timesteps."""
    ours = make_sampler(name, spacing="exponential")
    ref, step_kwargs = reference_scheduler(name, {})
    ref = type(ref).from_config(ref.config, use_exponential_sigmas=True)
    for steps in (10, 25, 13):
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        assert ours.timesteps.dtype == ref.timesteps.dtype
        torch.testing.assert_close(ours.timesteps.double(), ref.timesteps.double(), rtol=0,
                                   atol=1 if ours.integer_timesteps else 1e-4)
        torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=1e-6, atol=0)
    ref.timesteps = ours.timesteps.clone()
    expected = run(reference_step(ref, step_kwargs), ref.scale_model_input, ref.timesteps,
                   noise(0) * ref.init_noise_sigma)
    assert_same_trajectory(run(ours.step, ours.scale_model_input, ours.timesteps, noise(0) * ours.init_noise_sigma),
                           expected, ours.order)


def test_spacings_are_functions_any_sigma_sampler_takes():
    """A spacing is a function (schedule, n) -> (timesteps, sigmas); `karras=True` is the Karras one; making a run
    changes nothing but what set_timesteps keeps."""
    def halves(schedule, n):
        return spacing.at_sigmas(schedule, schedule.sigmas[-1].double() / 2 ** torch.arange(n, dtype=torch.float64))

    sampler = make_sampler("euler", spacing=halves)
    sampler.set_timesteps(4)
    assert torch.equal(sampler.sigmas[1:4] / sampler.sigmas[:3], torch.full((3,), 0.5)) and sampler.sigmas[-1] == 0
    before = sampler.sigmas.clone()
    timesteps, sigmas = sampler._make_timesteps(7)
    assert len(timesteps) == 7 and len(sigmas) == 8 and torch.equal(sampler.sigmas, before)
    assert make_sampler("heun", karras=True).spacing is karras is make_sampler("dpmpp_2m_karras").spacing
    with pytest.raises(InputError, match="spacing 'cosine'"):
        make_sampler("euler", spacing="cosine")
    with pytest.raises(InputError, match="not both"):
        make_sampler("euler", spacing="exponential", karras=True)
