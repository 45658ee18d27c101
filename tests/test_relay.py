"""Block noise statistics (exact and sampled), the relay forward process and sampler, and bad input."""


import pytest
import torch

import samplers as S
from samplers import relay as R

D = torch.float64


def _noise(shape, s, seed=0, **kw):
    return R.block_noise(shape, s, generator=torch.Generator().manual_seed(seed), dtype=D, **kw)


@pytest.fixture(scope="module")
def many():
    return _noise((64, 1, 128, 128), 4)  # ~1M samples, s = 4


def test_block_noise_mean_variance_and_autocovariance_sampled(many):
    n = many
    assert abs(n.mean().item()) < 0.02
    assert abs(n.var().item() - 1) < 0.02
    lag = lambda dy, dx: (n * torch.roll(n, (dy, dx), (-2, -1))).mean().item()  # noqa: E731
    for (dy, dx), ref in {(0, 1): 0.75, (1, 1): 0.5625, (0, 2): 0.5, (0, 4): 0.0}.items():
        assert abs(lag(dy, dx) - ref) < 0.02, ((dy, dx), lag(dy, dx), ref)


def test_block_filter_autocovariance_exact():
    # Linear filter: the exact covariance is the autocorrelation of its impulse response.
    s, N = 4, 16
    delta = torch.zeros(N, N, dtype=D)
    delta[0, 0] = 1
    h = R.block_filter(delta, s)
    cov = lambda dy, dx: (h * torch.roll(h, (dy, dx), (0, 1))).sum().item()  # noqa: E731
    assert cov(0, 0) == pytest.approx(1.0, abs=1e-12)
    for (dy, dx), ref in {(0, 1): 0.75, (1, 1): 0.5625, (0, 2): 0.5, (0, 4): 0.0, (2, 3): 2 * 1 / 16}.items():
        assert cov(dy, dx) == pytest.approx(ref, abs=1e-12)


def test_block_noise_spectral_identity():
    # DFT of the box filter: zero at nonzero multiples of N / s, power s^2 at DC.
    N, s = 32, 4
    n = _noise((4, 3, N, N), s, seed=1)
    spec = torch.fft.fft2(n).abs() ** 2
    for k in range(N // s, N, N // s):
        assert spec[..., k, :].max() < 1e-18 and spec[..., :, k].max() < 1e-18
    delta = torch.zeros(N, N, dtype=D)
    delta[0, 0] = 1
    assert (torch.fft.fft2(R.block_filter(delta, s)).abs() ** 2)[0, 0].item() == pytest.approx(s**2)


@pytest.mark.parametrize("s,ref", [(4, 0.4727), (2, 0.5625)])
def test_average_pooled_block_noise_variance(s, ref):
    # exact: ((s^2 + (s - 1) s (2 s - 1) / 3) / s^3)^2 -> 0.47266 (s = 4), 0.5625 (s = 2)
    exact = ((s**2 + (s - 1) * s * (2 * s - 1) / 3) / s**3) ** 2
    assert exact == pytest.approx(ref, abs=1e-4)
    n = _noise((64, 1, 128, 128), s, seed=2)
    pooled = torch.nn.functional.avg_pool2d(n, s)
    assert abs(pooled.var().item() - exact) < 0.02
    white = torch.nn.functional.avg_pool2d(_noise((64, 1, 128, 128), 1, seed=3), s)
    assert abs(white.var().item() - 1 / s**2) < 0.01  # white noise loses its low-frequency power


def test_block_size_one_is_white_noise_and_seeded_is_deterministic():
    g = torch.Generator().manual_seed(5)
    torch.testing.assert_close(_noise((2, 3, 8, 8), 1, seed=5), torch.randn((2, 3, 8, 8), generator=g, dtype=D))
    torch.testing.assert_close(_noise((2, 3, 8, 8), 3, seed=9), _noise((2, 3, 8, 8), 3, seed=9), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 4, 10, 14), (1, 2, 5, 9, 11), (3, 7, 7)])
def test_block_noise_shapes_including_non_divisible(shape):
    n = _noise(shape, 3)
    assert n.shape == shape and n.dtype == D and torch.isfinite(n).all()


def test_temporal_block_noise_statistics():
    n = _noise((16, 33, 1, 32, 32), 2, temporal_block_size=3, time_dim=1)  # (B, F, C, H, W)
    assert n.shape == (16, 33, 1, 32, 32)
    assert abs(n.var().item() - 1) < 0.03
    lag_t = (n[:, 1:] * n[:, :-1]).mean().item()
    assert abs(lag_t - 2 / 3) < 0.03  # (k - |dt|) / k
    assert abs((n[:, 0] * n[:, -1]).mean().item()) < 0.03  # no wrap-around in time


def test_mixed_noise_is_unit_variance():
    n = R.mixed_noise((32, 1, 64, 64), 4, alpha=0.5, generator=torch.Generator().manual_seed(0), dtype=D)
    assert abs(n.var().item() - 1) < 0.02
    lag = (n * torch.roll(n, 1, -1)).mean().item()
    assert abs(lag - 0.25 * 0.75 / 1.25) < 0.02  # only the block part is correlated


# ---- relay forward process and sampler ---------------------------------------------------------------------------

def _paths():
    acp = S.rescale_zero_terminal_snr(S.snr_shift(S.alphas_cumprod_from_betas(S.ddpm_betas()), 4.0))
    return {"vp_zero_snr": S.TrainPath.vp(acp), "flow": S.TrainPath.flow(1000)}


def test_relay_blur_end_points():
    z0, zl = torch.randn(2, 3, 4, 4, dtype=D), torch.randn(2, 3, 4, 4, dtype=D)
    torch.testing.assert_close(R.relay_blur(z0, zl, 0.0), z0)
    torch.testing.assert_close(R.relay_blur(z0, zl, 1.0), zl)


@pytest.mark.parametrize("path", ["vp_zero_snr", "flow"])
@pytest.mark.parametrize("blur", ["time", "step"])
def test_relay_sampler_with_oracle_follows_the_forward_process(path, blur):
    rs = R.relay_schedule(_paths()[path], 500, 10, blur=blur)
    sched = rs.schedule
    z0, zl = torch.randn(2, 4, 8, 8, dtype=D), torch.randn(2, 4, 8, 8, dtype=D)
    n = torch.randn(2, 4, 8, 8, dtype=D)
    states = []
    out = R.sample_relay(lambda x, t, a, s: z0, zl, rs, noise=n, callback=lambda i, x, _: states.append(x))
    x_start = R.relay_start(zl, rs, n)
    torch.testing.assert_close(x_start, float(sched.alphas[0]) * zl + float(sched.sigmas[0]) * n)
    for i, x in enumerate(states):  # alpha_t F(z0, t) + sigma_t n with the same n throughout
        ref = float(sched.alphas_next[i]) * R.relay_blur(z0, zl, float(rs.blur_next[i])) + float(sched.sigmas_next[i]) * n
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)
    assert (out - z0).abs().max().item() <= 1e-6


def test_relay_coefficients_sum_to_one_and_constant_is_fixed_point():
    rs = R.relay_schedule(_paths()["vp_zero_snr"], 500, 10)
    sch = rs.schedule
    for i in range(len(sch)):
        args = (float(sch.alphas[i]), float(sch.sigmas[i]), float(rs.blur[i]),
                float(sch.alphas_next[i]), float(sch.sigmas_next[i]), float(rs.blur_next[i]))
        assert sum(R.relay_coefficients(*args)) == pytest.approx(1.0, abs=1e-12)
    # flow path (alpha + sigma = 1): x itself is the flow frame, so a constant latent is a fixed point of the step
    fs = R.relay_schedule(_paths()["flow"], 400, 8)
    c = torch.full((1, 2, 4, 4), 0.7, dtype=D)
    for i in range(len(fs.schedule)):
        f = fs.schedule
        out = R.relay_step(c, c, c, float(f.alphas[i]), float(f.sigmas[i]), float(fs.blur[i]),
                           float(f.alphas_next[i]), float(f.sigmas_next[i]), float(fs.blur_next[i]))
        torch.testing.assert_close(out, c)


def test_stochastic_relay_with_oracle_still_reaches_z0():
    rs = R.relay_schedule(_paths()["vp_zero_snr"], 500, 10)
    z0, zl = torch.randn(1, 2, 8, 8, dtype=D), torch.randn(1, 2, 8, 8, dtype=D)
    out = R.sample_relay(lambda x, t, a, s: z0.float(), zl.float(), rs, eta=1.0, block_size=2,
                         generator=torch.Generator().manual_seed(0))
    assert (out.double() - z0).abs().max().item() <= 1e-5


def test_relay_loss_is_zero_for_a_perfect_x0_model_and_positive_otherwise():
    path = _paths()["flow"]
    z0, zl = torch.randn(4, 2, 8, 8), torch.randn(4, 2, 8, 8)

    def perfect_v(x, t):  # a flow model that knows z0: v = (x - z0) / sigma
        sigma = (t / 1000.0).view(-1, 1, 1, 1).float()
        return (x - z0) / sigma

    g = torch.Generator().manual_seed(0)
    assert R.relay_loss(perfect_v, z0, zl, path, 500, "flow", block_size=2, generator=g).item() < 1e-8
    assert R.relay_loss(lambda x, t: torch.zeros_like(x), z0, zl, path, 500, "flow", generator=g).item() > 0.1


@pytest.mark.parametrize("call,match", [
    (lambda: R.block_noise((1, 1, 8, 8), 0), r"block size must be an integer >= 1, got 0"),
    (lambda: R.block_noise((1, 1, 8, 8), 9), r"block size 9 exceeds the spatial size \(8, 8\); use at most 8"),
    (lambda: R.block_noise((1, 4, 1, 8, 8), 2, temporal_block_size=2), r"needs time_dim"),
    (lambda: R.relay_schedule(S.TrainPath.flow(1000), 1000, 10), r"relay start T_r = 1000 is outside .*\[1, 999\]"),
    (lambda: R.relay_schedule(S.TrainPath.flow(1000), 0, 10), r"relay start T_r = 0 is outside"),
    (lambda: R.relay_schedule(S.TrainPath.flow(1000), 5, 10), r"number of relay steps 10 must be an integer in \[1, T_r = 5\]"),
    (lambda: R.upsample(torch.zeros(1, 1, 5, 6), 1.5), r"upscale factor 1.5 makes the size 5x6 -> 7.5x9.0"),
    (lambda: R.upsample(torch.zeros(1, 1, 4, 4), 2, mode="bicubic"), r"unknown upsampling mode 'bicubic'"),
    (lambda: R.mixed_noise((1, 1, 4, 4), 2, alpha=float("nan")), r"alpha must be a finite number >= 0"),
])
def test_relay_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_upsample_video_latent_and_modes():
    z = torch.randn(1, 3, 2, 4, 5)  # (B, F, C, H, W)
    up = R.upsample(z, 2)
    assert up.shape == (1, 3, 2, 8, 10)
    torch.testing.assert_close(up[..., ::2, ::2], z)  # nearest keeps the samples
    assert R.upsample(z, 2, mode="bilinear").shape == (1, 3, 2, 8, 10)
