"""Parity with diffusers' schedulers: fed the same model outputs (random float64 tensors), the timesteps and
every step's output agree to 1e-6."""

import pytest
import torch
from diffusers import (CogVideoXDDIMScheduler, CogVideoXDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler,
                       FlowMatchEulerDiscreteScheduler)

from samplers import Denoiser, from_diffusers_config, get_solver

SHAPE = (2, 4, 3, 8, 8)
COGVIDEOX = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
                 rescale_betas_zero_snr=True, snr_shift_scale=3.0, timestep_spacing="trailing", set_alpha_to_one=True,
                 clip_sample=False, steps_offset=0)


def _outputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(n)]


def _ours(scheduler, num_steps, x, outputs, *, mu=None, seed=None, **solver_kwargs):
    """Run our solver for the scheduler's config; return (timesteps, per-step outputs)."""
    spec = from_diffusers_config(dict(scheduler.config, _class_name=type(scheduler).__name__), num_steps, mu=mu)
    calls = []

    def model_fn(xt, t):
        calls.append(t)
        return outputs[len(calls) - 1]

    denoiser = Denoiser(model_fn, spec.prediction)
    steps = []
    kwargs = dict(spec.options, **solver_kwargs)
    if seed is not None:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    get_solver(spec.solver)(denoiser, x, spec.schedule, callback=lambda i, xi, x0: steps.append(xi.clone()), **kwargs)
    return spec.schedule.timesteps, steps


def _diffusers(scheduler, num_steps, x, outputs, *, mu=None, seed=None, eta=0.0):
    if mu is not None:
        scheduler.set_timesteps(num_steps, mu=mu)
    else:
        scheduler.set_timesteps(num_steps)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    steps, old_x0 = [], None
    for i, t in enumerate(scheduler.timesteps):
        if isinstance(scheduler, CogVideoXDPMScheduler):
            back = scheduler.timesteps[i - 1] if i > 0 else None
            x, old_x0 = scheduler.step(outputs[i], old_x0, t, back, x, generator=gen, return_dict=False)
        elif isinstance(scheduler, DDIMScheduler) and eta > 0:
            x = scheduler.step(outputs[i], t, x, eta=eta, generator=gen, return_dict=False)[0]
        else:
            x = scheduler.step(outputs[i], t, x, return_dict=False)[0]
        steps.append(x.clone())
    return scheduler.timesteps, steps


def _compare(scheduler, num_steps, *, mu=None, seed=None, eta=0.0):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    outputs = _outputs(num_steps)
    ts_ref, ref = _diffusers(scheduler, num_steps, x.clone(), outputs, mu=mu, seed=seed, eta=eta)
    kwargs = {"eta": eta} if eta else {}
    ts, ours = _ours(scheduler, num_steps, x.clone(), outputs, mu=mu, seed=seed, **kwargs)
    torch.testing.assert_close(ts.double(), ts_ref.double(), rtol=0, atol=1e-6)
    assert len(ours) == len(ref) == num_steps
    for i, (a, b) in enumerate(zip(ours, ref)):
        err = (a - b).abs().max().item()
        assert err <= 1e-6 * max(1.0, b.abs().max().item()), f"step {i}: max abs diff {err:.3g}"


@pytest.mark.parametrize("num_steps", [50, 13, 1])
def test_cogvideox_ddim(num_steps):
    _compare(CogVideoXDDIMScheduler(**COGVIDEOX), num_steps)


@pytest.mark.parametrize("num_steps", [50, 13])
def test_cogvideox_dpm(num_steps):
    _compare(CogVideoXDPMScheduler(**COGVIDEOX), num_steps, seed=7)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim(prediction, spacing):
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=prediction, timestep_spacing=spacing)
    _compare(sched, 25)


def test_ddim_defaults_clip_and_eta():
    _compare(DDIMScheduler(), 20)  # linear betas, clip_sample=True, set_alpha_to_one=True
    _compare(DDIMScheduler(clip_sample=False), 20, eta=0.5, seed=3)


@pytest.mark.parametrize("num_steps", [28, 5])
def test_flow_match_euler_static_shift(num_steps):
    _compare(FlowMatchEulerDiscreteScheduler(shift=3.0), num_steps)


@pytest.mark.parametrize("mu", [0.5, 1.15])
def test_flow_match_euler_dynamic_shift(mu):
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    _compare(sched, 20, mu=mu)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [10, 20])
def test_dpmsolver_pp_2m(prediction, num_steps):
    sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        algorithm_type="dpmsolver++", solver_order=2, prediction_type=prediction)
    _compare(sched, num_steps)


def test_dpmsolver_pp_2m_sigma_min_final():
    sched = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="sigma_min",
                                        timestep_spacing="trailing")
    _compare(sched, 20)



def test_dpmsolver_pp_2m_zero_terminal_snr():
    sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        algorithm_type="dpmsolver++", solver_order=2, prediction_type="v_prediction",
                                        rescale_betas_zero_snr=True, timestep_spacing="trailing")
    _compare(sched, 20)
