"""Exact properties of the samplers: closed-form steps, an oracle denoiser lands on x0, bad input is refused."""

import math
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import samplers as S

D = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _vp(a_bar):
    return math.sqrt(a_bar), math.sqrt(1 - a_bar)


# ---- closed forms ------------------------------------------------------------------------------------------------

def test_ddim_step_closed_form_in_alpha_bar_notation():
    x, x0, n = _rand(3, 5), _rand(3, 5, seed=1), _rand(3, 5, seed=2)
    ab, ab_next = 0.3, 0.7
    (a, s), (a2, s2) = _vp(ab), _vp(ab_next)
    # CogVideoX's form: x' = sqrt((1-ab')/(1-ab)) x + (sqrt(ab') - sqrt(ab) sqrt((1-ab')/(1-ab))) x0
    c = math.sqrt((1 - ab_next) / (1 - ab))
    torch.testing.assert_close(S.ddim_step(x, x0, a, s, a2, s2), c * x + (math.sqrt(ab_next) - math.sqrt(ab) * c) * x0)
    # eta > 0: DDIM eq. 16 variance (1-ab')/(1-ab) (1 - ab/ab')
    eta = 0.6
    std = eta * math.sqrt((1 - ab_next) / (1 - ab) * (1 - ab / ab_next))
    eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
    ref = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next - std**2) * eps + std * n
    torch.testing.assert_close(S.ddim_step(x, x0, a, s, a2, s2, eta=eta, noise=n), ref)


def test_euler_on_flow_path_is_x_plus_dt_v():
    x, x0 = _rand(4, 3), _rand(4, 3, seed=1)
    s, s2 = 0.8, 0.55
    v = (x - x0) / s  # the velocity implied by x0
    torch.testing.assert_close(S.ddim_step(x, x0, 1 - s, s, 1 - s2, s2), x + (s2 - s) * v)


def test_heun_step_on_flow_path_matches_textbook_heun():
    x, x0 = _rand(4, 3), _rand(4, 3, seed=1)
    s, s2 = 0.8, 0.55
    w = _rand(3, 3, seed=5) * 0.1

    def denoise(y):
        return y @ w  # any function of the state

    v = (x - x0) / s
    x_e = x + (s2 - s) * v
    v2 = (x_e - denoise(x_e)) / s2
    ref = x + (s2 - s) * (v + v2) / 2
    torch.testing.assert_close(S.heun_step(x, x0, 1 - s, s, 1 - s2, s2, denoise), ref)


def test_dpmpp_2m_step_closed_form_in_log_snr():
    x, d0, d1 = _rand(3, 4), _rand(3, 4, seed=1), _rand(3, 4, seed=2)
    (ap, sp), (a, s), (a2, s2) = _vp(0.2), _vp(0.4), _vp(0.75)
    lam = lambda a_, s_: math.log(a_ / s_)  # noqa: E731
    h, h0 = lam(a2, s2) - lam(a, s), lam(a, s) - lam(ap, sp)
    D1 = (h / h0) * (d0 - d1)
    ref = (s2 / s) * x - a2 * (math.exp(-h) - 1) * (d0 + 0.5 * D1)
    torch.testing.assert_close(S.dpmpp_2m_step(x, d0, d1, a, s, a2, s2, ap, sp), ref)
    # first order equals DDIM
    torch.testing.assert_close(S.dpmpp_2m_step(x, d0, None, a, s, a2, s2), S.ddim_step(x, d0, a, s, a2, s2))


def test_cogvideox_dpm_step_closed_form():
    x, d0, d1, n = _rand(3, 4), _rand(3, 4, seed=1), _rand(3, 4, seed=2), _rand(3, 4, seed=3)
    abb, ab, ab2 = 0.2, 0.4, 0.75
    lam = lambda q: math.log(math.sqrt(q / (1 - q)))  # noqa: E731
    h, h_last = lam(ab2) - lam(ab), lam(ab) - lam(abb)
    r = h_last / h
    mult1 = math.sqrt((1 - ab2) / (1 - ab)) * math.exp(-h)
    mult2 = math.expm1(-2 * h) * math.sqrt(ab2)
    noise_scale = math.sqrt(1 - ab2) * math.sqrt(1 - math.exp(-2 * h))
    dd = (1 + 1 / (2 * r)) * d0 - 1 / (2 * r) * d1
    ref = mult1 * x - mult2 * dd + noise_scale * n
    out = S.cogvideox_dpm_step(x, d0, d1, *_vp(ab), *_vp(ab2), *_vp(abb), n)
    torch.testing.assert_close(out, ref)


# ---- oracle denoiser ---------------------------------------------------------------------------------------------

def _schedules():
    acp = S.alphas_cumprod_from_betas(S.ddpm_betas("scaled_linear"))
    ztsnr = S.rescale_zero_terminal_snr(S.snr_shift(acp, 3.0))
    ts = S.spaced_timesteps(20, 1000, "trailing")
    return {
        "vp": S.vp_schedule(acp, S.spaced_timesteps(20, 1000, "leading", steps_offset=1)),
        "vp_zero_snr": S.vp_schedule(ztsnr, ts),
        "flow": S.flow_schedule(S.flow_sigmas(20, shift=3.0)),
    }


@pytest.mark.parametrize("name", ["vp", "vp_zero_snr", "flow"])
@pytest.mark.parametrize("solver", ["ddim", "euler", "heun", "dpmpp_2m"])
def test_oracle_denoiser_reaches_x0_exactly(name, solver):
    schedule = _schedules()[name]
    x0, eps = _rand(2, 3, 4, 4, seed=10), _rand(2, 3, 4, 4, seed=11)
    states = []
    oracle = lambda x, t, a, s: x0  # noqa: E731
    x_start = float(schedule.alphas[0]) * x0 + float(schedule.sigmas[0]) * eps
    out = S.get_solver(solver)(oracle, x_start, schedule, callback=lambda i, x, _: states.append(x))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-10)
    for i, xi in enumerate(states):  # every intermediate state is on the path with the same noise
        ref = float(schedule.alphas_next[i]) * x0 + float(schedule.sigmas_next[i]) * eps
        torch.testing.assert_close(xi, ref, rtol=0, atol=1e-10)


def test_zero_terminal_snr_first_step_is_finite():
    schedule = _schedules()["vp_zero_snr"]
    assert float(schedule.alphas[0]) == 0.0 and float(schedule.sigmas[0]) == 1.0
    model = lambda x, t: _rand(*x.shape, seed=int(t))  # noqa: E731  a v-prediction model
    for solver in ("ddim", "heun", "dpmpp_2m", "cogvideox_dpm"):
        out = S.get_solver(solver)(S.Denoiser(model, "v"), _rand(1, 2, 4, 4), schedule)
        assert torch.isfinite(out).all(), solver


def test_parameterisations_round_trip_through_the_training_target():
    x0, eps = _rand(3, 4, seed=1), _rand(3, 4, seed=2)
    alpha, sigma = torch.tensor([0.0, 0.6, 0.9], dtype=D), torch.tensor([1.0, 0.8, math.sqrt(1 - 0.81)], dtype=D)
    x = S.add_noise(x0, eps, alpha, sigma)
    for pred in ("v", "x0"):
        torch.testing.assert_close(S.to_x0(S.training_target(x0, eps, alpha, sigma, pred), x, alpha, sigma, pred), x0)
    a, s = alpha[1:], sigma[1:]
    xe = S.add_noise(x0[1:], eps[1:], a, s)
    torch.testing.assert_close(S.to_x0(S.training_target(x0[1:], eps[1:], a, s, "eps"), xe, a, s, "eps"), x0[1:])
    sf = torch.tensor([0.3, 0.7, 1.0], dtype=D)
    xf = S.add_noise(x0, eps, 1 - sf, sf)
    torch.testing.assert_close(S.to_x0(S.training_target(x0, eps, 1 - sf, sf, "flow"), xf, 1 - sf, sf, "flow"), x0)


# ---- guidance ----------------------------------------------------------------------------------------------------

def test_cfg_mixes_uncond_and_cond():
    def model(x, t):  # first half of the doubled batch is "uncond" (outputs 1), second "cond" (outputs 3)
        b = x.shape[0] // 2
        return torch.cat([torch.ones_like(x[:b]), torch.full_like(x[b:], 3.0)])

    guided = S.classifier_free_guidance(model, 2.5)
    torch.testing.assert_close(guided(torch.zeros(2, 3), torch.tensor(10.0)), torch.full((2, 3), 1 + 2.5 * 2.0))


def test_cogvideox_dynamic_scale_matches_pipeline_formula():
    w = S.cogvideox_dynamic_scale(6.0, 50)
    for t in (999, 500, 19):
        ref = 1 + 6.0 * ((1 - math.cos(math.pi * ((50 - t) / 50) ** 5.0)) / 2)
        assert w(torch.tensor(t)) == pytest.approx(ref, abs=0)


# ---- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,match", [
    (lambda: S.ddpm_betas("cosine"), r"unknown beta schedule 'cosine'; accepted: 'linear', 'scaled_linear'"),
    (lambda: S.spaced_timesteps(10, 1000, "uniform"), r"unknown timestep spacing 'uniform'; accepted"),
    (lambda: S.spaced_timesteps(0, 1000), r"number of steps 0 is outside \[1, 1000\].*nearest valid: 1"),
    (lambda: S.spaced_timesteps(1001, 1000), r"number of steps 1001 is outside \[1, 1000\].*nearest valid: 1000"),
    (lambda: S.flow_sigmas(0), r"number of steps 0 is outside"),
    (lambda: S.check_prediction("score"), r"unknown prediction type 'score'; accepted: epsilon"),
    (lambda: S.get_solver("lms"), r"unknown solver 'lms'; accepted: ddim, euler"),
    (lambda: S.classifier_free_guidance(lambda x, t: x, float("nan")), r"guidance scale must be a finite number, got nan"),
    (lambda: S.classifier_free_guidance(lambda x, t: x, float("inf")), r"guidance scale must be a finite number, got inf"),
    (lambda: S.cogvideox_dynamic_scale(float("inf"), 50), r"guidance scale must be a finite number"),
    (lambda: S.from_diffusers_config({"_class_name": "LMSDiscreteScheduler"}, 10), r"unsupported scheduler class"),
    (lambda: S.from_diffusers_config({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, 10),
     r"use_karras_sigmas=True is not supported"),
    (lambda: S.from_diffusers_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True},
                                     10), r"mu is required"),
    (lambda: S.from_diffusers_config({"_class_name": "DDIMScheduler"}, 2000), r"number of steps 2000 is outside"),
    (lambda: S.snr_shift(torch.ones(3), -1.0), r"snr_shift_scale must be a positive finite number, got -1.0"),
    (lambda: S.to_x0(torch.ones(2), torch.ones(2), 0.0, 1.0, "eps"), r"epsilon-prediction model cannot give x0 at alpha = 0"),
    (lambda: S.sample_ddim(lambda *a: a[0], torch.ones(2), _schedules()["vp"], eta=-1), r"eta must be a finite number >= 0"),
    (lambda: S.sample_dpmpp_2m(lambda *a: a[0], torch.ones(2), S.vp_schedule(
        S.alphas_cumprod_from_betas(S.ddpm_betas()), S.spaced_timesteps(13, 1000, "trailing"), target="offset")),
     r"dpmpp_2m solver needs a schedule whose step targets"),
])
def test_bad_input_raises_value_error_naming_it(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_samplers_imports_neither_dit_nor_vae3d():
    code = "import sys, samplers\nbad = sorted(m for m in sys.modules if m.split('.')[0] in ('dit', 'vae3d'))\nassert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
    pattern = re.compile(r"^\s*(from|import)\s+(dit|vae3d)\b", re.MULTILINE)
    for path in pathlib.Path(S.__file__).parent.glob("*.py"):
        assert not pattern.search(path.read_text()), f"{path} imports dit or vae3d"


def test_randn_with_one_generator_per_batch_element_matches_separate_draws():
    from samplers.solvers import randn

    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    both = randn((2, 3, 4), generator=gens, device=torch.device("cpu"), dtype=torch.float32)
    for i, s in enumerate((3, 4)):
        alone = randn((1, 3, 4), generator=torch.Generator().manual_seed(s), device=torch.device("cpu"),
                      dtype=torch.float32)
        assert torch.equal(both[i:i + 1], alone)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn((3, 4), generator=gens, device=torch.device("cpu"), dtype=torch.float32)
