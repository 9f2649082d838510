"""Attention kernels and the SpatialTransformer: equivalence, closed forms, names, init."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturb

from ldm_jax.models import attention as attn_lib
from ldm_jax.models.attention import (
    BasicTransformerBlock,
    CrossAttention,
    FeedForward,
    SpatialTransformer,
    attention,
)


def _qkv(b=2, lq=6, lk=5, h=3, d=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, lq, h, d))
    k = jax.random.normal(ks[1], (b, lk, h, d))
    v = jax.random.normal(ks[2], (b, lk, h, d))
    return q, k, v


def _np_attention(q, k, v, mask=None):  # float64 numpy closed form
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(np.broadcast_to(mask, logits.shape), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_impls_match_naive(impl):
    q, k, v = _qkv()  # Lq 6 != Lk 5
    rng = np.random.default_rng(0)
    pad = np.ones((2, 1, 1, 5), bool)
    pad[1, ..., 3:] = False  # second example: last two context tokens are padding
    full = rng.random((2, 3, 6, 5)) > 0.4
    full[..., 0] = True  # every query keeps at least one key
    for mask in (None, pad, full):
        ref = attention(q, k, v, impl="naive", mask=mask)
        out = attention(q, k, v, impl=impl, mask=mask)
        assert out.shape == (2, 6, 3, 8)
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(ref, _np_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_grads_match_and_dtypes():
    q, k, v = _qkv(lq=4, lk=7)
    loss = lambda impl: lambda *a: jnp.sum(jnp.sin(attention(*a, impl=impl)))
    g_naive = jax.jit(jax.grad(loss("naive"), argnums=(0, 1, 2)))(q, k, v)
    g_xla = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_naive, g_xla):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    # bf16 in, bf16 out; softmax in fp32 inside.
    qb, kb, vb = (a.astype(jnp.bfloat16) for a in (q, k, v))
    out = attention(qb, kb, vb, impl="naive")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), _np_attention(q, k, v), atol=0.05)


def _scaled_bhld(q, k, v):  # attention()'s [B, L, H, D] -> _blocked's [B, H, L, D], q scaled
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    return q * q.shape[-1] ** -0.5, k, v


def test_blocked_is_naive_per_block():
    # B2 x H3 = 6 groups, Lq 12: group blocks, row blocks, both, and one block.
    q, k, v = _qkv(lq=12, lk=5, d=4)
    rng = np.random.default_rng(0)
    pad = np.ones((2, 1, 1, 5), bool)
    pad[1, ..., 3:] = False
    full = rng.random((2, 3, 12, 5)) > 0.4
    full[..., 0] = True
    for mask in (None, pad, full):
        ref = lambda *a, m=mask: attn_lib._core(*_scaled_bhld(*a), m)
        g_ref = jax.grad(lambda *a, f=ref: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)
        for g, r in ((2, 12), (6, 4), (3, 3), (1, 1), (6, 12)):
            blocked = lambda *a, g=g, r=r, m=mask: attn_lib._blocked(*_scaled_bhld(*a), m, g, r)
            out = jax.jit(blocked)(q, k, v)
            np.testing.assert_allclose(out, ref(q, k, v), atol=1e-6, rtol=1e-6)
            loss = lambda *a, f=blocked: jnp.sum(jnp.sin(f(*a)))
            grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
            for got, want in zip(grads, g_ref):
                np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_chunked_block_shapes_and_dispatch(monkeypatch):
    # The measured shapes: SD's 64x64 level (B1, 4096 tokens, 8 x 40) and the small
    # training UNet's 32x32 level (B8, 1024 tokens, 8 heads of 8 channels).
    assert attn_lib._block_shape(8, 4096, 4096, 40, 4 << 20) == (1, 256)
    assert attn_lib._block_shape(64, 1024, 1024, 8, 4 << 20) == (16, 64)
    # A small budget makes attention(impl="chunked") block; its values stay naive's.
    q, k, v = _qkv(lq=12, lk=5, d=2)
    monkeypatch.setattr(attn_lib, "_MIN_CHUNK_KEYS", 1)
    monkeypatch.setattr(attn_lib, "CHUNK_BYTES", 12 * 5 * 4)  # 6 blocks of 1 group x 12 rows
    out = jax.jit(lambda *a: attention(*a, impl="chunked"))(q, k, v)
    assert "scan" in str(jax.make_jaxpr(lambda *a: attention(*a, impl="chunked"))(q, k, v))
    np.testing.assert_allclose(out, attention(q, k, v, impl="naive"), atol=1e-6, rtol=1e-6)
    # Short key sequences (cross-attention over context tokens) are never split.
    monkeypatch.setattr(attn_lib, "_MIN_CHUNK_KEYS", 256)
    assert "scan" not in str(jax.make_jaxpr(lambda *a: attention(*a, impl="chunked"))(q, k, v))


def test_auto_resolution_and_bad_impl():
    q = jnp.zeros((1, 2, 1, 8))
    assert attn_lib._resolve("auto", q) == "chunked"  # CPU: measured faster (see _resolve)
    assert attn_lib._resolve("xla", q) == "xla"
    with pytest.raises(ValueError, match="impl"):
        attention(q, q, q, impl="flash")


def test_cross_attention_self_and_closed_form():
    x = jax.random.normal(jax.random.key(0), (2, 5, 12))
    ctx = jax.random.normal(jax.random.key(1), (2, 3, 7))
    m = CrossAttention(heads=2, dim_head=4)
    init, apply = jax.jit(m.init), jax.jit(m.apply)
    p = nn.unbox(init(jax.random.key(2), x)["params"])
    assert set(p) == {"to_q", "to_k", "to_v", "to_out_0"}
    assert "bias" not in p["to_q"] and p["to_out_0"]["kernel"].shape == (8, 12)
    np.testing.assert_array_equal(apply({"params": p}, x), apply({"params": p}, x, x))

    pc = nn.unbox(init(jax.random.key(3), x, ctx)["params"])
    assert pc["to_k"]["kernel"].shape == (7, 8)  # context_dim -> inner
    split = lambda t: t.reshape(*t.shape[:2], 2, 4)
    q = split(np.asarray(x) @ pc["to_q"]["kernel"])
    k = split(np.asarray(ctx) @ pc["to_k"]["kernel"])
    v = split(np.asarray(ctx) @ pc["to_v"]["kernel"])
    o = _np_attention(q, k, v).reshape(2, 5, 8)
    ref = o @ np.asarray(pc["to_out_0"]["kernel"]) + np.asarray(pc["to_out_0"]["bias"])
    np.testing.assert_allclose(apply({"params": pc}, x, ctx), ref, atol=1e-5, rtol=1e-5)


def test_geglu_feed_forward_closed_form():
    x = jax.random.normal(jax.random.key(0), (2, 3, 6))
    m = FeedForward()
    p = perturb(nn.unbox(jax.jit(m.init)(jax.random.key(1), x)["params"]), scale=0.3, seed=1)
    assert p["net_0_proj"]["kernel"].shape == (6, 48) and p["net_2"]["kernel"].shape == (24, 6)
    h = np.asarray(x, np.float64) @ p["net_0_proj"]["kernel"] + p["net_0_proj"]["bias"]
    a, gate = h[..., :24], h[..., 24:]
    erf = np.vectorize(math.erf)
    ref = (a * 0.5 * gate * (1 + erf(gate / math.sqrt(2)))) @ p["net_2"]["kernel"]
    ref = ref + p["net_2"]["bias"]
    np.testing.assert_allclose(jax.jit(m.apply)({"params": p}, x), ref, atol=1e-5, rtol=1e-5)


def test_transformer_block_names_and_partitioning():
    x = jnp.ones((1, 4, 16))
    ctx = jnp.ones((1, 3, 10))
    v = jax.eval_shape(BasicTransformerBlock(heads=2, dim_head=8).init, jax.random.key(0), x, ctx)
    v = v["params"]
    assert set(v) == {"attn1", "attn2", "ff", "norm1", "norm2", "norm3"}
    assert v["attn1"]["to_q"]["kernel"].names == ("embed", "heads")
    assert v["attn2"]["to_out_0"]["kernel"].names == ("heads", "embed")
    assert v["ff"]["net_0_proj"]["kernel"].names == ("embed", "mlp")
    assert v["norm1"]["scale"].names == ("norm",)
    assert v["attn2"]["to_k"]["kernel"].value.shape == (10, 16)


@pytest.mark.parametrize("use_linear", [False, True])
def test_spatial_transformer_identity_at_init(use_linear):
    x = jax.random.normal(jax.random.key(0), (2, 4, 6, 32))  # [B, H, W, C], H != W
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 24))
    m = SpatialTransformer(heads=2, dim_head=8, depth=2, use_linear=use_linear)
    apply = jax.jit(m.apply)
    p = nn.unbox(jax.jit(m.init)(jax.random.key(2), x, ctx)["params"])
    assert {"norm", "proj_in", "transformer_blocks_0", "transformer_blocks_1", "proj_out"} == set(p)
    kernel_shape = (16, 32) if use_linear else (1, 1, 16, 32)
    assert p["proj_out"]["kernel"].shape == kernel_shape
    assert not np.any(p["proj_out"]["kernel"]) and not np.any(p["proj_out"]["bias"])
    np.testing.assert_array_equal(apply({"params": p}, x, ctx), x)
    # Once proj_out is non-zero the block does something and depends on the context.
    p2 = perturb(p, scale=0.3, seed=1)
    y1 = apply({"params": p2}, x, ctx)
    y2 = apply({"params": p2}, x, ctx + 1.0)
    assert y1.shape == x.shape
    assert float(jnp.max(jnp.abs(y1 - x))) > 1e-2 and float(jnp.max(jnp.abs(y1 - y2))) > 1e-3
    # A context mask hiding tokens equals dropping them.
    mask = jnp.array([[True] * 3 + [False] * 2] * 2)
    ym = apply({"params": p2}, x, ctx, context_mask=mask)
    np.testing.assert_allclose(ym, apply({"params": p2}, x, ctx[:, :3]), atol=1e-4, rtol=1e-5)
