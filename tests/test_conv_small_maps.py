"""The im2col path for tiny feature maps equals XLA's convolution, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ldm_jax.models import layers

DN = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize(
    "shape,kernel,padding",
    [
        ((3, 2, 2, 5), 3, ((1, 1), (1, 1))),
        ((2, 1, 1, 4), 3, ((1, 1), (1, 1))),
        ((2, 2, 2, 3), 3, "SAME"),
        ((2, 3, 3, 3), 3, "VALID"),
        ((2, 2, 3, 4), 3, ((0, 1), (1, 0))),
        ((1, 4, 4, 2), 4, ((1, 1), (1, 1))),  # PatchGAN's 4x4 kernels on a 4x4 map
        ((2, 8, 8, 3), 3, ((1, 1), (1, 1))),  # few pixels (<= _IM2COL_PIXELS)
    ],
)
def test_small_map_conv_matches_xla(shape, kernel, padding):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, shape[-1], 6))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, DN)

    def ours(x, w):
        return layers.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=dn)

    def ref(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=dn)

    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(lambda x, w: jnp.sum(ours(x, w) ** 2), argnums=(0, 1))(x, w)
    g_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) ** 2), argnums=(0, 1))(x, w)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_im2col_choice():
    pays = lambda shape, k=3: layers._im2col_pays(shape, k, k)
    # SD's UNet: 8x8 and 16x16 latents, and 32x32 with 1280 input channels, take im2col
    assert pays((1, 8, 8, 2560)) and pays((1, 16, 16, 1280)) and pays((1, 32, 32, 1280))
    # where XLA measured as fast or faster
    assert not pays((1, 32, 32, 640)) and not pays((8, 8, 8, 256)) and not pays((1, 64, 64, 320))
    assert pays((32, 2, 2, 512)) and pays((64, 1, 1, 8))  # maps no larger than the kernel


def test_large_maps_and_strided_convs_go_to_xla():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 17, 2))  # 544 pixels
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 3))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, DN)
    for strides in ((1, 1), (2, 2)):
        got = layers.conv_general_dilated(x, w, strides, "SAME", dimension_numbers=dn)
        want = lax.conv_general_dilated(x, w, strides, "SAME", dimension_numbers=dn)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_im2col_only_on_the_cpu_backend(backend, monkeypatch):
    """The matmul path was measured for XLA:CPU: on GPU and TPU the same small-map conv
    is traced as XLA's own convolution."""
    x = jnp.zeros((1, 2, 2, 8))
    w = jnp.zeros((3, 3, 8, 4))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, DN)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    jaxpr = str(jax.make_jaxpr(
        lambda x, w: layers.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
    )(x, w))  # fmt: skip
    assert ("conv_general_dilated" in jaxpr) == (backend != "cpu")
    assert ("dot_general" in jaxpr) == (backend == "cpu")
