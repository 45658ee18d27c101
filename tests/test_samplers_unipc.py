"""UniPC: parity with diffusers' UniPCMultistepScheduler (Wan's sampler) step by step, closed forms, an oracle
denoiser, the convergence order, and refused settings.

Two kinds of parity. With a smooth deterministic model (a denoiser of the kind a trained model is), stock
diffusers and `sample_unipc` agree to 1e-6 at every step. diffusers computes UniPC's coefficients in float32
(its sigmas are float32 tensors); with its sigmas made float64, it is the same algorithm as ours to 1e-12 for any
model outputs, random ones included, which checks every branch (orders, corrector, bh1/bh2, noise form).
"""

import math

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

import samplers as S
from samplers import Denoiser, from_diffusers_config, get_solver

SHAPE = (2, 4, 3, 8, 8)
D = torch.float64

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json (flow_shift 3.0; 5.0 in the 14B / 720p / TI2V).
WAN = {
    "_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
    "disable_corrector": [], "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None,
    "solver_type": "bh2", "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
    "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False, "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}
FLOW = dict(prediction_type="flow_prediction", use_flow_sigmas=True)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _scheduler(config: dict) -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(**{k: v for k, v in config.items() if not k.startswith("_")})


def _smooth_model(scheduler: UniPCMultistepScheduler):
    """A deterministic model (x, t) -> output, smooth in x and t, whose implied x0 stays bounded (like a trained
    denoiser's): it aims at x0_hat = 0.6 tanh(x) + 0.1 sin(2x + t/T) and outputs what that means for its
    parameterisation at timestep t (read off the training path, flow: sigma = t / T)."""
    T, pred = scheduler.config.num_train_timesteps, scheduler.config.prediction_type
    acp = scheduler.alphas_cumprod.double()

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = 0.6 * torch.tanh(x) + 0.1 * torch.sin(2 * x + float(t) / T)
        if pred == "flow_prediction":
            s = float(t) / T
            return (x - x0) / s
        a, s = float(acp[int(t)].sqrt()), float((1 - acp[int(t)]).sqrt())
        eps = (x - a * x0) / s
        return eps if pred == "epsilon" else a * eps - s * x0 if pred == "v_prediction" else x0

    return model


def _random_model(n: int):
    outputs = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(s), dtype=D) for s in range(n)]
    calls = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t)
        return outputs[len(calls) - 1]

    return model


def _run_diffusers(scheduler, num_steps, x, model, *, float64: bool):
    scheduler.set_timesteps(num_steps)
    if float64:  # the coefficients follow the sigmas' dtype
        scheduler.sigmas = scheduler.sigmas.double()
    steps = []
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, return_dict=False)[0]
        steps.append(x.clone())
    return scheduler.timesteps, steps


def _run_ours(config, num_steps, x, model):
    spec = from_diffusers_config(config, num_steps)
    assert spec.solver == "unipc"
    steps = []
    get_solver(spec.solver)(Denoiser(model, spec.prediction), x, spec.schedule,
                            callback=lambda i, xi, x0: steps.append(xi.clone()), **spec.options)
    return spec.schedule.timesteps, steps


def _compare(config: dict, num_steps: int, *, random_outputs: bool = False, float64: bool = False, tol=1e-6):
    config = {"_class_name": "UniPCMultistepScheduler", **config}
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(123), dtype=D)
    sched = _scheduler(config)
    model = (lambda: _random_model(num_steps)) if random_outputs else (lambda: _smooth_model(sched))
    ts_ref, ref = _run_diffusers(sched, num_steps, x.clone(), model(), float64=float64)
    ts, ours = _run_ours(config, num_steps, x.clone(), model())
    assert ts.dtype == ts_ref.dtype == torch.int64 and torch.equal(ts, ts_ref)
    assert len(ours) == len(ref) == num_steps
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert torch.isfinite(b).all(), f"diffusers step {i} is not finite"
        err = (a - b).abs().max().item()
        assert err <= tol * max(1.0, b.abs().max().item()), f"step {i}: max abs diff {err:.3g}"


# ---- parity with stock diffusers (float32 coefficients), smooth model ------------------------------------------

@pytest.mark.parametrize("flow_shift", [3.0, 5.0])
@pytest.mark.parametrize("num_steps", [50, 13, 1])
def test_wan_config_matches_diffusers(flow_shift, num_steps):
    _compare(dict(WAN, flow_shift=flow_shift), num_steps)


CONFIGS = {
    "flow_order1": dict(FLOW, flow_shift=5.0, solver_order=1),
    "flow_order3": dict(FLOW, flow_shift=5.0, solver_order=3),
    "flow_bh1_sigma_min": dict(FLOW, flow_shift=3.0, solver_type="bh1", final_sigmas_type="sigma_min"),
    "flow_order3_bh1_sigma_min": dict(FLOW, flow_shift=3.0, solver_order=3, solver_type="bh1",
                                      final_sigmas_type="sigma_min"),
    "flow_disable_corrector": dict(FLOW, flow_shift=3.0, disable_corrector=[0, 4]),
    "no_lower_order_final": dict(SD, solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"),
    "ddpm_eps": dict(),  # diffusers' defaults: linear betas, epsilon, linspace, order 2, bh2
    "ddpm_eps_leading_order3": dict(SD, timestep_spacing="leading", steps_offset=1, solver_order=3),
    "ddpm_eps_order1_bh1_sigma_min": dict(solver_order=1, solver_type="bh1", final_sigmas_type="sigma_min"),
    "v_trailing_order3": dict(SD, prediction_type="v_prediction", timestep_spacing="trailing", solver_order=3),
    "v_zero_snr": dict(SD, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
    "sample_prediction": dict(SD, prediction_type="sample"),
    "noise_form_sigma_min": dict(SD, predict_x0=False, final_sigmas_type="sigma_min", solver_order=3),
    "midpoint_is_bh2": dict(SD, solver_type="midpoint"),
}


# diffusers' float32 coefficients drift from exact arithmetic by more than 1e-6 here (the noise form's x / alpha
# terms; an order-3 last step over a large log-SNR step); the float64 test below holds them to 1e-12.
FLOAT32_SENSITIVE = {"noise_form_sigma_min": 1e-5, "no_lower_order_final": 1e-5}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("num_steps", [25, 6])
def test_unipc_options_match_diffusers(name, num_steps):
    _compare(CONFIGS[name], num_steps, tol=FLOAT32_SENSITIVE.get(name, 1e-6))


def test_dynamic_shift_matches_diffusers():
    config = dict(FLOW, use_dynamic_shifting=True, time_shift_type="exponential", _class_name="UniPCMultistepScheduler")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=D)
    sched = _scheduler(config)
    sched.set_timesteps(20, mu=0.8)
    ref = x.clone()
    model = _smooth_model(sched)
    for t in sched.timesteps:
        ref = sched.step(model(ref, t), t, ref, return_dict=False)[0]
    spec = from_diffusers_config(config, 20, mu=0.8)
    assert torch.equal(spec.schedule.timesteps, sched.timesteps)
    out = get_solver(spec.solver)(Denoiser(model, spec.prediction), x, spec.schedule, **spec.options)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["wan", "ddpm_eps", "v_zero_snr", "ddpm_eps_leading_order3"])
@pytest.mark.parametrize("num_steps", [1000, 50])
def test_schedule_equals_diffusers_sigmas_bitwise(name, num_steps):
    """Every state, in diffusers' own float32 sigmas (VE sigma / alpha, or the flow sigma): zero terminal SNR
    included, which diffusers applies to its float32 betas (1000 steps reach t = 998, where that matters)."""
    config = {"_class_name": "UniPCMultistepScheduler", **(WAN if name == "wan" else CONFIGS[name])}
    sched = _scheduler(config)
    sched.set_timesteps(num_steps)
    schedule = from_diffusers_config(config, num_steps).schedule
    alphas, sigmas = torch.cat([schedule.alphas, schedule.alphas_next[-1:]]), torch.cat(
        [schedule.sigmas, schedule.sigmas_next[-1:]])
    ours = sigmas if name == "wan" else sigmas / alphas
    assert torch.equal(ours.float(), sched.sigmas) and torch.equal(schedule.timesteps, sched.timesteps)


# ---- same algorithm: diffusers with float64 coefficients, random model outputs ------------------------------------

@pytest.mark.parametrize("name", ["wan", *sorted(CONFIGS)])
def test_same_algorithm_as_diffusers_in_float64(name):
    _compare(WAN if name == "wan" else CONFIGS[name], 20, random_outputs=True, float64=True, tol=1e-12)


# ---- closed forms and properties --------------------------------------------------------------------------------

def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


@pytest.mark.parametrize("predict_x0", [True, False])
def test_first_order_unip_is_ddim(predict_x0):
    """UniP-1 with a constant prediction is the exact exponential integrator: DDIM, in either form."""
    x, x0 = _rand(3, 5), _rand(3, 5, seed=1)
    (a, s), (a2, s2) = (math.sqrt(0.3), math.sqrt(0.7)), (math.sqrt(0.8), math.sqrt(0.2))
    m = x0 if predict_x0 else (x - a * x0) / s
    torch.testing.assert_close(S.unipc_update(x, m, [], (a, s), (a2, s2), predict_x0=predict_x0),
                               S.ddim_step(x, x0, a, s, a2, s2))


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_first_order_unic_closed_form(variant):
    """UniC-1 (rho = 1/2): x' = (s'/s) x - a' (e^{-h} - 1) m0 - a' B(-h) (m1 - m0) / 2."""
    x, m0, m1 = _rand(3, 5), _rand(3, 5, seed=1), _rand(3, 5, seed=2)
    (a, s), (a2, s2) = (0.6, 0.8), (0.9, math.sqrt(1 - 0.81))
    h = math.log(a2 / s2) - math.log(a / s)
    B = -h if variant == "bh1" else math.expm1(-h)
    ref = (s2 / s) * x - a2 * math.expm1(-h) * m0 - a2 * B * 0.5 * (m1 - m0)
    torch.testing.assert_close(S.unipc_update(x, m0, [], (a, s), (a2, s2), variant=variant, m_new=m1), ref)


def test_rhos_satisfy_the_order_conditions():
    """Solved weights satisfy R rho = b; b_1 tends to 1/2 as h -> 0 (why rho = 1/2 may replace it)."""
    rks, hh = [-0.8, -1.7], -0.3
    rhos, B = S.unipc_rhos(rks, hh, "bh2", corrector=True)
    phi = [math.expm1(hh) / hh]  # phi_1, then phi_{k+1} = (phi_k - 1/k!) / hh
    for k in range(1, 4):
        phi.append((phi[-1] - 1 / math.factorial(k)) / hh)
    b = [math.factorial(k) * hh * phi[k] / B for k in (1, 2, 3)]
    R = np.array([[r ** k for r in (*rks, 1.0)] for k in range(3)])
    np.testing.assert_allclose(R @ np.array(rhos), b, rtol=1e-12)
    assert S.unipc_rhos([], -1e-4, "bh2", corrector=False) == ([], math.expm1(-1e-4))
    assert S.unipc_rhos([], -1e-4, "bh1", corrector=True)[0] == [0.5]


def _schedules():
    acp = S.alphas_cumprod_from_betas(S.ddpm_betas("scaled_linear"))
    ztsnr = S.rescale_zero_terminal_snr(S.snr_shift(acp, 3.0))
    return {
        "vp": S.vp_schedule(acp, S.spaced_timesteps(20, 1000, "leading", steps_offset=1)),
        "vp_zero_snr": S.vp_schedule(ztsnr, S.spaced_timesteps(20, 1000, "trailing")),
        "flow": from_diffusers_config(WAN, 20).schedule,
    }


@pytest.mark.parametrize("name", ["vp", "vp_zero_snr", "flow"])
@pytest.mark.parametrize("order,variant,predict_x0", [(1, "bh2", True), (2, "bh1", True), (2, "bh2", True),
                                                      (3, "bh2", True), (3, "bh1", False)])
def test_oracle_denoiser_reaches_x0_exactly(name, order, variant, predict_x0):
    """With the exact x0 every state stays on the path of the same noise, and the end is x0 itself."""
    if name == "vp_zero_snr" and not predict_x0:
        pytest.skip("the noise form cannot start at alpha = 0 (tested as refused below)")
    schedule = _schedules()[name]
    x0, eps = _rand(2, 3, 4, 4, seed=10), _rand(2, 3, 4, 4, seed=11)
    states = []
    x_start = float(schedule.alphas[0]) * x0 + float(schedule.sigmas[0]) * eps
    out = S.sample_unipc(lambda x, t, a, s: x0, x_start, schedule, order=order, variant=variant,
                         predict_x0=predict_x0, callback=lambda i, x, _: states.append(x))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-10)
    for i, xi in enumerate(states):
        ref = float(schedule.alphas_next[i]) * x0 + float(schedule.sigmas_next[i]) * eps
        torch.testing.assert_close(xi, ref, rtol=0, atol=1e-9)


def test_zero_terminal_snr_v_model_stays_finite():
    model = lambda x, t: _rand(*x.shape, seed=int(t))  # a v-prediction model
    for order in (1, 2, 3):
        out = S.sample_unipc(Denoiser(model, "v"), _rand(1, 2, 4, 4), _schedules()["vp_zero_snr"], order=order)
        assert torch.isfinite(out).all(), order


def _linear_ode_error(num_steps: int, order: int, *, corrector: bool = True) -> float:
    """With the linear denoiser D(x) = c x on the flow path, the probability-flow ODE dx/ds = (x - D(x)) / s has the
    solution x(s) = x(s0) (s / s0)^(1 - c). The sampler's signed error over steps uniform in log-SNR."""
    c = -0.5
    lam = torch.linspace(-2.0, 2.0, num_steps + 1, dtype=D)
    alphas, sigmas = torch.sigmoid(lam), torch.sigmoid(-lam)  # alpha + sigma = 1, log(alpha / sigma) = lam
    schedule = S.Schedule.from_states(sigmas[:-1] * 1000, alphas, sigmas)
    out = S.sample_unipc(lambda x, t, a, s: c * x, torch.ones(1, dtype=D), schedule, order=order,
                         lower_order_final=False, disable_corrector=() if corrector else range(num_steps))
    return float(out) - (float(sigmas[-1]) / float(sigmas[0])) ** (1 - c)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_convergence_order(order):
    """UniPC-p converges at order p + 1; the corrector supplies the extra order (UniP-p alone: order p, tested
    for p = 1, 2; UniP-3's first-order warm-up step masks its order at these step counts)."""
    rate = math.log2(_linear_ode_error(40, order) / _linear_ode_error(80, order))
    assert abs(rate - (order + 1)) < 0.25, rate
    if order < 3:
        rate = math.log2(_linear_ode_error(40, order, corrector=False) / _linear_ode_error(80, order, corrector=False))
        assert abs(rate - order) < 0.25, rate


# ---- config and bad input ---------------------------------------------------------------------------------------

def test_spec_of_the_wan_config():
    spec = from_diffusers_config(WAN, 50)
    full = dict(_scheduler(WAN).config, _class_name="UniPCMultistepScheduler")  # every key diffusers writes
    assert from_diffusers_config(full, 50).options == spec.options
    assert (spec.solver, spec.prediction) == ("unipc", "flow")
    assert spec.options == {"order": 2, "variant": "bh2", "predict_x0": True, "lower_order_final": True,
                            "disable_corrector": ()}
    assert float(spec.schedule.sigmas_next[-1]) == 0.0 and int(spec.schedule.timesteps[0]) == 999
    path = S.train_path_from_config(WAN)
    assert torch.equal(path.sigmas, S.TrainPath.flow(1000).sigmas)
    vp = S.train_path_from_config({"_class_name": "UniPCMultistepScheduler"})
    assert torch.allclose(vp.alphas**2, S.alphas_cumprod_from_betas(S.ddpm_betas("linear", 1000, 0.0001, 0.02)))


def _cfg(**kw):
    return dict(WAN, **kw)


@pytest.mark.parametrize("config,match", [
    (_cfg(use_karras_sigmas=True), r"use_karras_sigmas=True is not supported \(supported: use_karras_sigmas=False\)"),
    (_cfg(use_exponential_sigmas=True), r"use_exponential_sigmas=True is not supported"),
    (_cfg(use_beta_sigmas=True), r"use_beta_sigmas=True is not supported"),
    (_cfg(thresholding=True), r"thresholding=True is not supported"),
    (_cfg(shift_terminal=0.1), r"shift_terminal=0.1 is not supported"),
    (_cfg(solver_order=4), r"solver_order=4 is not supported \(supported: 1, 2, 3\)"),
    (_cfg(solver_type="bh3"), r"solver_type='bh3' is not supported \(supported: bh1, bh2"),
    (_cfg(final_sigmas_type="max"), r"final_sigmas_type='max' is not supported \(supported: 'zero', 'sigma_min'\)"),
    (_cfg(solver_type="bh1"), r"solver_type='bh1' is not supported with final_sigmas_type='zero'.*NaN"),
    (_cfg(lower_order_final=False), r"lower_order_final=False is not supported with solver_order > 1"),
    (_cfg(lower_order_final=False, final_sigmas_type="sigma_min"), r"to sigma = 0 or has zero length"),
    (_cfg(use_flow_sigmas=False), r"prediction_type='flow_prediction' is supported only with use_flow_sigmas=True"),
    (_cfg(predict_x0=False, final_sigmas_type="sigma_min"), r"predict_x0=False is not supported with prediction_type"),
    ({"_class_name": "UniPCMultistepScheduler", "predict_x0": False}, r"predict_x0=False is not supported with final"),
    (_cfg(use_dynamic_shifting=True), r"use_dynamic_shifting is set, so mu is required"),
    ({"_class_name": "UniPCMultistepScheduler", "use_dynamic_shifting": True}, r"use_dynamic_shifting=True is not sup"),
    (_cfg(prediction_type="score"), r"unknown prediction type 'score'"),
])
def test_unsupported_options_raise_value_error_naming_them(config, match):
    with pytest.raises(ValueError, match=match):
        from_diffusers_config(config, 20, mu=0.5 if "mu is" not in match else None)


@pytest.mark.parametrize("kwargs,match", [
    (dict(order=4), r"UniPC order must be 1, 2 or 3, got 4"),
    (dict(variant="bh3"), r"unknown UniPC variant 'bh3'; accepted: bh1, bh2"),
])
def test_sampler_refuses_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.sample_unipc(lambda x, *a: x, torch.ones(2), _schedules()["vp"], **kwargs)


def test_noise_form_refuses_alpha_zero_and_solver_needs_a_chained_schedule():
    with pytest.raises(ValueError, match="predict_x0=False divides by alpha"):
        S.sample_unipc(lambda x, *a: x, torch.ones(2), _schedules()["vp_zero_snr"], predict_x0=False)
    offset = S.vp_schedule(S.alphas_cumprod_from_betas(S.ddpm_betas()), S.spaced_timesteps(13, 1000, "trailing"),
                           target="offset")
    with pytest.raises(ValueError, match="unipc solver needs a schedule whose step targets"):
        S.sample_unipc(lambda x, *a: x, torch.ones(2), offset)
