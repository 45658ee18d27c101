"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) with a corrector (UniC) that reuses the next model call.

Written, like the other solvers, over an x0-predicting denoiser and a `Schedule` in (alpha, sigma) form, so one
function covers variance-preserving and flow-matching paths. Step i (state i -> i + 1) runs in the "data" form
(predict_x0, the form diffusers defaults to and Wan uses) or the "noise" form, where the history holds the
implied noise eps = (x - alpha x0) / sigma instead of x0.

With m0 the current prediction, D_k = (m_k - m0) / r_k the divided differences against earlier states
(r_k = (lambda_k - lambda_0) / h, lambda = log(alpha / sigma), h = lambda' - lambda_0):
  data form:  x' = (sigma'/sigma) x + alpha' (1 - e^{-h}) m0 - alpha' B(-h) sum_k rho_k D_k
  noise form: x' = (alpha'/alpha) x - sigma' (e^{h} - 1) m0 - sigma' B(h) sum_k rho_k D_k
with B(z) = z (bh1) or e^z - 1 (bh2), and rho from the order conditions R rho = b (the paper's Theorem 3.1).
The corrector is the same update taken again from the previous state with the new prediction as one more
difference (r = 1). Coefficients are float64; tensors are updated in at least float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from samplers.paths import DenoiserFn
from samplers.schedules import Schedule
from samplers.solvers import SOLVERS, Callback, _after_step, _lambda, _require_chained

UNIPC_VARIANTS = ("bh1", "bh2")


def unipc_rhos(rks: Sequence[float], hh: float, variant: str, *, corrector: bool) -> tuple[list[float], float]:
    """The weights rho of the divided differences, and B(hh), for UniP (predictor) or UniC (corrector).

    `rks` are the ratios r_k of the earlier states (most recent first), without the corrector's r = 1; the order
    is len(rks) + 1. hh = -h in the data form, +h in the noise form. b_k = k! hh phi_{k+1}(hh) / B(hh), phi_k the
    exponential-integrator phi functions. As in the paper (and diffusers), the second-order predictor and the
    first-order corrector use rho = 1/2 (the h -> 0 limit of the solved weight) instead of solving.
    """
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"unknown UniPC variant {variant!r}; accepted: {', '.join(UNIPC_VARIANTS)}")
    order = len(rks) + 1
    B = hh if variant == "bh1" else math.expm1(hh)
    b, psi, fact = [], math.expm1(hh) / hh - 1, 1  # psi_k = hh phi_{k+1}(hh), by phi_{k+1} = (phi_k - 1/k!) / z
    for k in range(1, order + 1):
        b.append(psi * fact / B)
        fact *= k + 1
        psi = psi / hh - 1 / fact
    nodes = [*rks, 1.0]
    R = np.array([[r ** (k - 1) for r in nodes] for k in range(1, order + 1)], dtype=np.float64)
    if corrector:
        rhos = [0.5] if order == 1 else np.linalg.solve(R, np.array(b)).tolist()
    else:
        rhos = [] if order == 1 else [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], np.array(b[:-1])).tolist()
    return rhos, B


def unipc_update(
    x: Tensor, m0: Tensor, earlier: Sequence[tuple[Tensor, float]], state: tuple[float, float],
    target: tuple[float, float], *, variant: str = "bh2", predict_x0: bool = True, m_new: Tensor | None = None,
) -> Tensor:
    """One UniP step from `state` = (alpha, sigma) to `target`, or the UniC correction of it when `m_new`
    (the prediction at the target) is given.

    `earlier` holds (m_k, lambda_k) of earlier states with finite lambda, most recent first; its length + 1 is
    the order. A step of zero length returns x. Where h is infinite (a step to sigma' = 0, or from alpha = 0 under
    zero terminal SNR) the divided differences have no finite limit, so the step is the first-order one.
    """
    (a, s), (a_t, s_t) = state, target
    lam0, lam_t = _lambda(a, s), _lambda(a_t, s_t)
    h = lam_t - lam0
    if h == 0:
        return x
    if math.isinf(h):
        earlier, m_new = (), None
    dtype = x.dtype
    xc, m0c = _compute(x), _compute(m0)
    # The first-order part, written with e^{-h} = alpha sigma' / (sigma alpha') so it stays finite at sigma' = 0.
    if predict_x0:
        out = (s_t / s) * xc + (a_t - a * s_t / s) * m0c
    else:
        out = (a_t / a) * xc - (a_t * s / a - s_t) * m0c
    if not earlier and m_new is None:
        return out.to(dtype)
    rks = [(lam_k - lam0) / h for _, lam_k in earlier]
    hh = -h if predict_x0 else h
    rhos, B = unipc_rhos(rks, hh, variant, corrector=m_new is not None)
    diffs = [(_compute(m) - m0c) / r for (m, _), r in zip(earlier, rks)]
    if m_new is not None:
        diffs.append(_compute(m_new) - m0c)  # the new prediction, at r = 1
    res = sum(rho * d for rho, d in zip(rhos, diffs))
    return (out - ((a_t if predict_x0 else s_t) * B) * res).to(dtype)


def _compute(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def sample_unipc(
    denoiser: DenoiserFn, x: Tensor, schedule: Schedule, *, order: int = 2, variant: str = "bh2",
    predict_x0: bool = True, lower_order_final: bool = True, disable_corrector: Sequence[int] = (),
    callback: Callback | None = None,
) -> Tensor:
    """UniPC multistep sampling: one denoiser call per step, UniP-`order` predictor and UniC corrector.

    The prediction at the state a step lands on corrects that state before the next step starts from it (the
    corrected state is what the next step and its corrector use; the callback sees the uncorrected one, as
    diffusers returns it). The order ramps up over the first steps (no history yet) and, with
    `lower_order_final`, down to first order at the last step. `disable_corrector` lists steps whose result is
    not corrected (diffusers' option of the same name; indices count from this schedule's first step, diffusers'
    from its full schedule's, which differ after `Schedule.truncate`).
    """
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"unknown UniPC variant {variant!r}; accepted: {', '.join(UNIPC_VARIANTS)}")
    _require_chained(schedule, "unipc")
    if not predict_x0 and bool((schedule.alphas == 0).any()):
        raise ValueError("UniPC with predict_x0=False divides by alpha, which this schedule has at 0 (zero terminal "
                         "SNR); use predict_x0=True")
    n, skip = len(schedule), set(disable_corrector)
    history: list[tuple[Tensor, float]] = []  # (prediction, lambda) of the last `order` states, oldest first
    x_last, p_last = None, 0
    for i in range(n):
        a, s = float(schedule.alphas[i]), float(schedule.sigmas[i])
        x0 = denoiser(x, schedule.timesteps[i], schedule.alphas[i], schedule.sigmas[i])
        m = x0 if predict_x0 else (_compute(x) - a * _compute(x0)) / s
        if x_last is not None and i - 1 not in skip:
            prev = (float(schedule.alphas[i - 1]), float(schedule.sigmas[i - 1]))
            x = unipc_update(x_last, history[-1][0], _earlier(history[:-1], p_last - 1), prev, (a, s),
                             variant=variant, predict_x0=predict_x0, m_new=m)
        history = [*history, (m, _lambda(a, s))][-order:]
        p = min(order, n - i) if lower_order_final else order
        p_last = min(p, len(history))  # warm-up: no more history than steps taken
        x_last = x
        target = (float(schedule.alphas_next[i]), float(schedule.sigmas_next[i]))
        x_new = unipc_update(x, m, _earlier(history[:-1], p_last - 1), (a, s), target, variant=variant,
                             predict_x0=predict_x0)
        x = _after_step(callback, i, x_new, x0)
    return x


def _earlier(history: list[tuple[Tensor, float]], count: int) -> list[tuple[Tensor, float]]:
    """The `count` most recent entries, most recent first, leaving out states at lambda = -inf (alpha = 0):
    their r would be infinite."""
    picked = history[::-1][:count] if count > 0 else []
    return [(m, lam) for m, lam in picked if math.isfinite(lam)]


# Registered here (samplers/__init__ imports this module, so get_solver always sees it): solvers.py cannot import
# this module back without a cycle.
SOLVERS["unipc"] = sample_unipc
