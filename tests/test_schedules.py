"""Noise schedules against closed forms; forward process, conversions and loss by hand."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldm_jax.diffusion import objectives as obj
from ldm_jax.diffusion.schedules import DiffusionSchedule, make_betas, make_schedule

LS, LE, T = 0.0015, 0.0195, 1000  # the LDM configs' linear_start / linear_end


def _cfg(**kw):
    base = dict(beta_schedule="linear", timesteps=T, linear_start=LS, linear_end=LE, cosine_s=8e-3)
    return ml_collections.ConfigDict({**base, **kw})


@pytest.fixture(scope="module")
def sched():
    return make_schedule(_cfg())


def test_linear_endpoints_and_cumprod(sched):
    betas = make_betas("linear", T, LS, LE)
    assert betas.dtype == np.float64
    np.testing.assert_allclose([betas[0], betas[-1]], [LS, LE], rtol=1e-12)
    # Scaled linear: the square roots are evenly spaced.
    np.testing.assert_allclose(np.diff(np.sqrt(betas)), (LE**0.5 - LS**0.5) / (T - 1), rtol=1e-9)
    abar = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(sched.alphas_cumprod, abar, rtol=1e-6)
    np.testing.assert_allclose(sched.alphas_cumprod_prev, np.append(1.0, abar[:-1]), rtol=1e-6)
    assert sched.num_timesteps == T and sched.betas.dtype == jnp.float32


def test_sqrt_linear_and_sqrt_endpoints():
    b = make_betas("sqrt_linear", 500, LS, LE)
    np.testing.assert_allclose([b[0], b[-1]], [LS, LE], rtol=1e-12)
    np.testing.assert_allclose(np.diff(b), (LE - LS) / 499, rtol=1e-9)
    b = make_betas("sqrt", 500, LS, LE)
    np.testing.assert_allclose([b[0], b[-1]], [LS**0.5, LE**0.5], rtol=1e-12)


def test_cosine_matches_formula():
    s, n = 8e-3, 1000
    betas = make_betas("cosine", n, cosine_s=s)
    f = np.cos((np.arange(n + 1) / n + s) / (1 + s) * np.pi / 2) ** 2
    abar = f[1:] / f[0]
    # Unclipped betas telescope to f(t+1)/f(0); only the last beta hits the 0.999 clip.
    np.testing.assert_allclose(np.cumprod(1 - betas)[:-1], abar[:-1], rtol=1e-9)
    assert betas.max() == pytest.approx(0.999) and np.sum(betas >= 0.999) == 1
    sched = make_schedule(_cfg(beta_schedule="cosine", cosine_s=s))
    np.testing.assert_allclose(sched.betas, betas, rtol=1e-6)


def test_unknown_schedule_lists_valid_ones():
    with pytest.raises(ValueError, match="linear.*sqrt_linear.*cosine"):
        make_betas("quadratic", 10)


def test_posterior_closed_form(sched):
    b = make_betas("linear", T, LS, LE)
    abar = np.cumprod(1 - b)
    abar_prev = np.append(1.0, abar[:-1])
    var = b * (1 - abar_prev) / (1 - abar)
    np.testing.assert_allclose(sched.posterior_variance, var, rtol=1e-5, atol=1e-12)
    assert float(sched.posterior_variance[0]) == 0.0
    np.testing.assert_allclose(sched.posterior_log_variance_clipped[0], np.log(1e-20), rtol=1e-6)
    np.testing.assert_allclose(sched.posterior_log_variance_clipped[1:], np.log(var[1:]), rtol=1e-5)
    np.testing.assert_allclose(
        sched.posterior_mean_coef1, b * np.sqrt(abar_prev) / (1 - abar), rtol=1e-5
    )
    np.testing.assert_allclose(
        sched.posterior_mean_coef2, (1 - abar_prev) * np.sqrt(1 - b) / (1 - abar), rtol=1e-5
    )
    # The posterior mean of x_t = sqrt(abar) x0 (no noise) is sqrt(abar_prev) x0.
    np.testing.assert_allclose(
        sched.posterior_mean_coef1 + sched.posterior_mean_coef2 * np.sqrt(abar),
        np.sqrt(abar_prev),
        rtol=1e-5,
    )
    np.testing.assert_allclose(sched.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / abar - 1), rtol=1e-5)
    np.testing.assert_allclose(sched.sqrt_recip_alphas_cumprod, np.sqrt(1 / abar), rtol=1e-6)


def test_v_posterior_blends_beta():
    b = make_betas("linear", 100, LS, LE)
    s = DiffusionSchedule.from_betas(b, v_posterior=1.0)
    np.testing.assert_allclose(s.posterior_variance, b, rtol=1e-6)


def test_schedule_is_a_jittable_pytree(sched):
    assert len(jax.tree.leaves(sched)) == 12
    out = jax.jit(lambda s, t: s.alphas_cumprod[t] * s.num_timesteps)(sched, 10)
    np.testing.assert_allclose(out, sched.alphas_cumprod[10] * T, rtol=1e-6)


# --------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("t0", [0, 1, 250, 999])
def test_conversions_round_trip(sched, t0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(t0))
    x0 = jax.random.normal(k1, (3, 4, 4, 2))
    eps = jax.random.normal(k2, x0.shape)
    t = jnp.full((3,), t0, jnp.int32)
    xt = obj.q_sample(sched, x0, t, eps)
    # eps -> x0 scales float32 rounding by 1/sqrt(abar) (82 at t=999), x0 -> eps by
    # 1/sqrt(1 - abar) (26 at t=0); elsewhere the round trip is exact to ~1e-6.
    abar = float(sched.alphas_cumprod[t0])
    cond = max(1.0, abar**-0.5, (1 - abar) ** -0.5)
    tol = dict(rtol=1e-5, atol=1e-6 * cond)
    np.testing.assert_allclose(obj.eps_to_x0(sched, xt, t, eps), x0, **tol)
    np.testing.assert_allclose(obj.x0_to_eps(sched, xt, t, x0), eps, **tol)
    v = obj.v_target(sched, x0, t, eps)
    np.testing.assert_allclose(obj.v_to_eps(sched, xt, t, v), eps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(obj.v_to_x0(sched, xt, t, v), x0, rtol=1e-5, atol=1e-5)
    for par, out in (("eps", eps), ("x0", x0), ("v", v)):
        e, x = obj.model_output_to_eps_x0(sched, out, xt, t, par)
        np.testing.assert_allclose(e, eps, **tol)
        np.testing.assert_allclose(x, x0, **tol)
    with pytest.raises(ValueError, match="eps, x0, v"):
        obj.model_output_to_eps_x0(sched, v, xt, t, "score")


def test_q_sample_statistics(sched):
    # One fixed x0, 200k noise draws per timestep: mean sqrt(abar) x0, std sqrt(1 - abar).
    n, ts = 200_000, jnp.array([0, 100, 500, 999], jnp.int32)
    x0 = jnp.full((4, 1), 0.7)
    noise = jax.random.normal(jax.random.PRNGKey(0), (4, n))
    xt = np.asarray(obj.q_sample(sched, x0, ts, noise))
    abar = np.asarray(sched.alphas_cumprod)[np.asarray(ts)]
    sd = np.sqrt(1 - abar)
    # 5 standard errors: sd / sqrt(n) for the mean, sd / sqrt(2n) for the std.
    np.testing.assert_array_less(np.abs(xt.mean(1) - np.sqrt(abar) * 0.7), 5 * sd / np.sqrt(n))
    np.testing.assert_array_less(np.abs(xt.std(1) - sd), 5 * sd / np.sqrt(2 * n))


@pytest.mark.parametrize("par", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_loss_by_hand(sched, par, loss_type):
    rng = np.random.default_rng(0)
    x0, noise, out = (rng.normal(size=(4, 3, 2, 2)).astype(np.float32) for _ in range(3))
    t = np.array([0, 10, 500, 999], np.int32)
    loss, per = obj.diffusion_loss(
        sched, out, x0, noise, t, parameterization=par, loss_type=loss_type
    )
    abar = np.asarray(sched.alphas_cumprod, np.float64)[t][:, None, None, None]
    target = {
        "eps": noise,
        "x0": x0,
        "v": np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0,
    }[par]
    err = np.abs(out - target) if loss_type == "l1" else (out - target) ** 2
    want = err.reshape(4, -1).mean(1)
    assert per.shape == (4,)
    np.testing.assert_allclose(per, want, rtol=1e-5)
    np.testing.assert_allclose(loss, want.mean(), rtol=1e-5)


@pytest.mark.parametrize("par", ["eps", "x0", "v"])
def test_min_snr_weights(sched, par):
    t = np.array([0, 50, 200, 999], np.int32)
    gamma = 5.0
    abar = np.asarray(sched.alphas_cumprod, np.float64)[t]
    snr = abar / (1 - abar)
    np.testing.assert_allclose(obj.snr(sched, t), snr, rtol=1e-5)
    clipped = np.minimum(snr, gamma)
    want = {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[par]
    np.testing.assert_allclose(obj.min_snr_weight(sched, t, gamma, par), want, rtol=1e-5)
    # Weighted loss = weight * plain per-example loss; the scalar stays their mean.
    rng = np.random.default_rng(1)
    x0, noise, out = (rng.normal(size=(4, 8)).astype(np.float32) for _ in range(3))
    _, plain = obj.diffusion_loss(sched, out, x0, noise, t, parameterization=par)
    loss, per = obj.diffusion_loss(
        sched, out, x0, noise, t, parameterization=par, min_snr_gamma=gamma
    )
    np.testing.assert_allclose(per, plain * want, rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(plain * want), rtol=1e-5)


def test_loss_rejects_unknown_type(sched):
    z = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="l2, l1"):
        obj.diffusion_loss(sched, z, z, z, jnp.zeros(2, jnp.int32), loss_type="huber")


def test_sample_timesteps_uniform():
    t = np.asarray(obj.sample_timesteps(jax.random.PRNGKey(0), 100_000, 10))
    assert t.dtype == np.int32 and t.min() == 0 and t.max() == 9
    # Each bin's count is Binomial(n, 0.1): std 95, so 5 sigma is 475.
    np.testing.assert_array_less(np.abs(np.bincount(t) - 10_000), 475)
