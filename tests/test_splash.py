"""The TPU's Pallas splash attention (models/splash.py), run here in interpret mode:
values and gradients equal the plain form for SD's head dims, per device shard under an
8-device mesh, inside a transformer block; and "auto" picks it on TPU only where it
applies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.models import attention as attn_lib
from ldm_jax.models import splash
from ldm_jax.models.attention import BasicTransformerBlock, attention
from ldm_jax.parallel import mesh as mesh_lib


def _qkv(b, length, h, d, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((b, length, h, d)), jnp.float32) for _ in "qkv")


def _loss(impl, d):
    weights = jnp.cos(jnp.arange(d, dtype=jnp.float32))  # a gradient that is not all ones
    return lambda q, k, v: jnp.sum(attention(q, k, v, impl=impl) * weights)


@pytest.fixture
def short_sequences(monkeypatch):
    """Sequences from 256 tokens take the kernel, so that interpret mode stays quick."""
    monkeypatch.setattr(splash, "SPLASH_MIN_TOKENS", 256)


# SD's head dims, padded to 128 (40, 64, 80) or 256 (160); lengths giving 2 x 2 blocks of
# 512, 1 block of 256, 3 x 3 blocks of 128 and 2 x 2 blocks of 256.
@pytest.mark.parametrize("d,length", [(40, 1024), (64, 256), (80, 384), (160, 512)])
def test_values_and_gradients_equal_the_plain_form(short_sequences, d, length):
    q, k, v = _qkv(1, length, 2, d)
    assert attn_lib._resolve("splash", q, k) == "splash" and splash.supported(q, k, None)
    got = jax.jit(lambda *a: attention(*a, impl="splash"))(q, k, v)
    want = attention(q, k, v, impl="naive")
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    grads = jax.jit(jax.grad(_loss("splash", d), argnums=(0, 1, 2)))(q, k, v)
    wants = jax.grad(_loss("naive", d), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(grads, wants):
        np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.abs(w).max()), rtol=1e-4)


def test_block_sizes_for_sd_head_dims():
    assert [splash.padded_head_dim(d) for d in (40, 64, 80, 160)] == [128, 128, 128, 256]
    assert splash.block_size(4096, 128) == 512 and splash.block_size(4096, 256) == 256
    assert splash.block_size(1280, 128) == 256 and splash.block_size(1152, 128) == 128


def test_each_device_runs_its_shard_under_a_mesh(short_sequences):
    """Batch 4 over data x fsdp = 4, 2 heads over tensor = 2: the kernel runs in a
    shard_map, and the sharded values and gradients equal the plain form."""
    q, k, v = _qkv(4, 256, 2, 64, seed=1)
    mesh = mesh_lib.mesh_of(data=2, fsdp=2, tensor=2)  # Auto axes, as training uses
    place = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q, k, v = (jax.device_put(x, place) for x in (q, k, v))
    with jax.set_mesh(mesh):
        f = jax.jit(lambda *a: attention(*a, impl="splash"))
        assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v))
        got = f(q, k, v)
        grads = jax.jit(jax.grad(_loss("splash", 64), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(got, attention(q, k, v, impl="naive"), atol=2e-6, rtol=1e-5)
    for g, w in zip(grads, jax.grad(_loss("naive", 64), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.abs(w).max()), rtol=1e-4)


def test_a_transformer_block_with_splash_equals_naive(short_sequences):
    """16 x 16 latent tokens through a BasicTransformerBlock with a 7-token context: the
    self-attention takes the kernel, the cross-attention XLA's form."""
    x = jax.random.normal(jax.random.key(0), (2, 256, 32))
    ctx = jax.random.normal(jax.random.key(1), (2, 7, 16))
    blocks = {
        impl: BasicTransformerBlock(heads=2, dim_head=16, attention_impl=impl)
        for impl in ("splash", "naive")
    }
    params = blocks["naive"].init(jax.random.key(2), x, ctx)
    params = jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
    got = jax.jit(blocks["splash"].apply)(params, x, ctx)
    want = jax.jit(blocks["naive"].apply)(params, x, ctx)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_auto_takes_splash_on_tpu_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    q = jnp.zeros((1, 4096, 5, 64))  # SD 1.5 at 512²: 64 x 64 latents
    assert attn_lib._resolve("auto", q, q) == "splash"
    assert attn_lib._resolve("auto", q, jnp.zeros((1, 77, 5, 64))) == "xla"  # cross-attention
    assert attn_lib._resolve("auto", q, q, mask=jnp.ones((1, 1, 1, 4096), bool)) == "xla"
    short = jnp.zeros((1, 256, 5, 64))  # 16 x 16 latents: XLA's dense form
    assert attn_lib._resolve("auto", short, short) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert attn_lib._resolve("auto", q, q) == "chunked"
