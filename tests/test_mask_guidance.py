"""Mask guidance (`samplers.Known`) against its closed form, for every sampler: at each
step the kept region of the model's input is x0 noised to that step's timestep, and the
sample's kept region is x0 exactly; the rest of x evolves as the sampler alone has it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import samplers
from ldm_jax.diffusion.schedules import make_schedule

SCHED = make_schedule({"timesteps": 1000, "linear_start": 0.0015, "linear_end": 0.0195})
OPTS = {"ddim": {"num_steps": 10}, "plms": {"num_steps": 10}, "dpm_solver_pp_2m": {"num_steps": 10},
        "ddpm": {}}  # fmt: skip


def _run(name, x0, keep, rng):
    """(the sample, [(t, model input)] in call order) with a model that predicts eps = 0.1 x."""
    seen = []

    def record(x, t):
        seen.append((int(t[0]), np.asarray(x)))

    def model_fn(x, t):
        jax.debug.callback(record, x, t, ordered=True)
        return 0.1 * x

    x_T = jax.random.normal(jax.random.PRNGKey(9), x0.shape)
    out = samplers.get_sampler(name)(
        model_fn, SCHED, x_T, rng, known=samplers.Known(keep, x0), **OPTS[name]
    )
    return np.asarray(out), seen


@pytest.mark.parametrize("name", sorted(OPTS))
def test_known_region_follows_the_closed_form(name):
    shape = (2, 8, 8, 3)
    keep = jnp.zeros(shape[:3] + (1,)).at[:, :, :4].set(1.0)  # left half known
    x0 = jax.random.normal(jax.random.PRNGKey(1), shape)
    rng = jax.random.PRNGKey(3)
    out, seen = _run(name, x0, keep, rng)
    zero_out, zero_seen = _run(name, jnp.zeros(shape), keep, rng)
    k = np.asarray(keep, bool)[..., 0]
    # The same noise either way, so the inputs differ by sqrt(abar_t) x0 in the kept region.
    imposed = {t for t, _ in seen}
    assert len(imposed) >= 10 and len(seen) == len(zero_seen)
    abar = np.asarray(SCHED.alphas_cumprod)
    # The last call at each grid point is its step's (PLMS's first step also calls the
    # model at the next grid point on an intermediate x, before that step imposes x0).
    last_call_at = {t: i for i, (t, _) in enumerate(seen)}
    for t, i in last_call_at.items():
        diff = seen[i][1] - zero_seen[i][1]
        np.testing.assert_allclose(diff[k], np.sqrt(abar[t]) * np.asarray(x0)[k], atol=2e-5)
    np.testing.assert_array_equal(out[k], np.asarray(x0)[k])  # exactly x0 at the end
    np.testing.assert_array_equal(zero_out[k], 0.0)
    assert np.all(np.isfinite(out)) and np.abs(out[~k]).max() > 0


def test_without_a_mask_the_sampler_is_unchanged():
    x_T = jax.random.normal(jax.random.PRNGKey(2), (1, 4, 4, 3))
    fn = lambda x, t: 0.1 * x  # noqa: E731
    plain = samplers.ddim(fn, SCHED, x_T, jax.random.PRNGKey(0), num_steps=5)
    none_kept = samplers.ddim(
        fn, SCHED, x_T, jax.random.PRNGKey(0), num_steps=5,
        known=samplers.Known(jnp.zeros((1, 4, 4, 1)), jnp.ones((1, 4, 4, 3))),
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(none_kept), np.asarray(plain), rtol=1e-6, atol=1e-6)
