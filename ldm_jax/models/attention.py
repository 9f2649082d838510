"""Attention for the diffusion UNet: one kernel entry point and the SpatialTransformer.

`attention()` is the only place that computes softmax(QK^T / sqrt(D)) V, so swapping a
kernel (cuDNN flash attention, a Pallas kernel) is a change here only. Submodule names
follow the CompVis state dict with dots as underscores (`transformer_blocks.0.attn1.to_q`
-> `transformer_blocks_0/attn1/to_q`), so importing PyTorch weights is a renaming.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import layers, splash
from ldm_jax.models.axes import MLP_IN_AXES, MLP_OUT_AXES, OUT_KERNEL_AXES, QKV_KERNEL_AXES
from ldm_jax.models.layers import torch_default_init

Dtype = Any

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "naive", "chunked")
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # masked logit: finite, so no NaN rows
# "chunked": blocks of (batch x head) groups and query rows whose fp32 logits fit in
# CHUNK_BYTES, for keys this many or more. XLA:CPU otherwise writes and rereads whole
# [B, H, Lq, Lk] tensors (256 MiB per layer at B8, 32x32 latents, 8 heads); cross-attention
# over a few context tokens gains nothing.
CHUNK_BYTES = 4 << 20
_MIN_CHUNK_KEYS = 256


def _weights(q, k, mask):
    # q [..., Lq, D] (already scaled), k [..., Lk, D], fp32 -> softmax weights [..., Lq, Lk]
    logits = jnp.einsum("...qd,...kd->...qk", q, k)
    if mask is not None:
        logits = jnp.where(mask, logits, _NEG)
    return jax.nn.softmax(logits, axis=-1)


def _core(q, k, v, mask):
    # q [..., Lq, D] (already scaled), k/v [..., Lk, D], fp32 -> [..., Lq, D]
    return jnp.einsum("...qk,...kd->...qd", _weights(q, k, mask), v)


@jax.custom_vjp
def _block_core(q, k, v, mask):
    return _core(q, k, v, mask)


def _block_core_fwd(q, k, v, mask):
    return _core(q, k, v, mask), (q, k, v, mask)  # the block's logits are recomputed


def _block_core_bwd(res, d_out):
    # Autodiff's formulas, except that dK and dV are computed transposed, [..., D, Lk]:
    # wide outputs where [..., Lk, D] ones are D narrow. The barrier keeps XLA from folding
    # the transposes back into the dots (grad B1 L4096 H8 D40: 0.68 vs 1.25 s; B8 L1024 H8
    # D8: 0.14 vs 0.26 s; the same for dQ or the forward was slower).
    q, k, v, mask = res
    w = _weights(q, k, mask)  # [..., Lq, Lk]
    dv_t = jax.lax.optimization_barrier(jnp.einsum("...qd,...qk->...dk", d_out, w))
    dw = jnp.einsum("...qd,...kd->...qk", d_out, v)
    ds = w * dw - w * jnp.sum(w * dw, axis=-1, keepdims=True)  # softmax's VJP
    if mask is not None:
        ds = jnp.where(mask, ds, 0.0)
    dq = jnp.einsum("...qk,...kd->...qd", ds, k)
    dk_t = jax.lax.optimization_barrier(jnp.einsum("...qd,...qk->...dk", q, ds))
    return dq, jnp.swapaxes(dk_t, -1, -2), jnp.swapaxes(dv_t, -1, -2), None


_block_core.defvjp(_block_core_fwd, _block_core_bwd)


def _divisor(n: int, at_most: int) -> int:
    """The largest divisor of n that is <= at_most (at least 1)."""
    d = max(1, min(n, at_most))
    while n % d:
        d -= 1
    return d


def _block_shape(groups: int, lq: int, lk: int, d: int, chunk_bytes: int) -> tuple[int, int]:
    """(groups, rows) per block. Rows first, at least max(64, 4 x D) of them, so that a
    block's logits outweigh the K and V it rereads and the dK/dV matmuls contract over
    enough rows; then as many (batch x head) groups as the budget holds. Measured (min of 5,
    interleaved): B1 L4096 H8 D40 forward 32 rows 0.33 s, 128 rows 0.19 s; B8 L1024 H8 D8
    grad 32 groups x 32 rows 0.18 s, 16 x 64 0.14 s."""
    rows = next(r for r in range(min(lq, max(64, 4 * d)), lq + 1) if lq % r == 0)
    return _divisor(groups, chunk_bytes // (rows * lk * 4)), rows


def _blocked(q, k, v, mask, g: int, r: int):
    """_core over blocks of g groups x r query rows, each softmax over all keys (the same
    per-row maths); the backward pass recomputes each block's logits instead of keeping them.

    q [B, H, Lq, D] (scaled), k/v [B, H, Lk, D], mask None or [B|1, H|1, Lq|1, Lk].
    """
    b, h, lq, d = q.shape
    lk = k.shape[2]
    no, ni = b * h // g, lq // r  # outer (group) and inner (row) blocks
    qs = q.reshape(no, g, ni, r, d).transpose(0, 2, 1, 3, 4)  # [no, ni, g, r, D]
    ks, vs = k.reshape(no, g, lk, d), v.reshape(no, g, lk, d)  # [no, g, Lk, D]
    ms = None
    if mask is not None:
        mq = mask.shape[2]
        m = jnp.broadcast_to(mask, (b, h, mq, lk)).reshape(no, g, mq // r or 1, min(r, mq), lk)
        ms = jnp.broadcast_to(m.transpose(0, 2, 1, 3, 4), (no, ni, g, min(r, mq), lk))

    def outer(a):  # one group block: its own K and V, so dK/dV add up over rows only
        qo, ko, vo, mo = a
        if ni == 1:
            return _block_core(qo[0], ko, vo, None if mo is None else mo[0])[None]
        return jax.lax.map(lambda c: _block_core(c[0], ko, vo, c[1]), (qo, mo))

    if no == 1:
        out = outer((qs[0], ks[0], vs[0], None if ms is None else ms[0]))[None]
    else:
        out = jax.lax.map(outer, (qs, ks, vs, ms))  # [no, ni, g, r, D]
    return out.transpose(0, 2, 1, 3, 4).reshape(b, h, lq, d)


def _naive(q, k, v, mask, chunk_bytes=None):
    # q [B, Lq, H, D], k/v [B, Lk, H, D]; everything in fp32 whatever the input dtype.
    # Heads are moved next to batch first: XLA:CPU then runs plain batched matmuls, 1.2-3x
    # faster than letting einsum place the transposes (see _resolve).
    dtype = q.dtype
    q, k, v = (a.astype(jnp.float32).transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, H, L, D]
    q = q * (q.shape[-1] ** -0.5)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if chunk_bytes is None or lk < _MIN_CHUNK_KEYS or b * h * lq * lk * 4 <= chunk_bytes:
        out = _core(q, k, v, mask)  # [B, H, Lq, D]
    else:
        out = _blocked(q, k, v, mask, *_block_shape(b * h, lq, lk, d, chunk_bytes))
    return out.transpose(0, 2, 1, 3).astype(dtype)  # [B, Lq, H, D]


def _cudnn_supported(q: jax.Array, k: jax.Array | None = None) -> bool:
    """Static check of cuDNN flash attention's limits, those of jax's check_layout and
    check_is_flash_attention (jax/_src/cudnn/fused_attention_stablehlo.py): bf16/fp16, a
    head dim that is a multiple of 8 and at most 128 (256 from compute capability 9.0),
    and even query and key lengths (k None: self-attention).

    The lengths: once differentiated, jax treats every call as having a bias (jax 0.10.2
    passes its zero-size placeholder as one) and refuses odd lengths, in the VJP's forward
    rule. That rule runs outside attention()'s try whenever the call is traced first and
    differentiated afterwards (nn.remat / jax.checkpoint, grad of a jit) and then raises
    out of the training step, so 77-token cross-attention (CLIP context) and CLIP's own
    self-attention are refused for inference too: XLA computes them.
    """
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    cap = str(getattr(jax.devices()[0], "compute_capability", "0.0"))
    try:
        major_minor = tuple(int(p) for p in cap.split("."))
    except ValueError:  # not an NVIDIA "major.minor" (ROCm's "gfx90a"): no cuDNN
        return False
    d = q.shape[-1]
    if d % 8 or d > (256 if major_minor >= (9, 0) else 128):
        return False
    return q.shape[1] % 2 == 0 and (q if k is None else k).shape[1] % 2 == 0


def _resolve(impl: str, q: jax.Array, k: jax.Array | None = None, mask=None) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    platform = jax.default_backend()
    if platform == "gpu":
        return "cudnn" if _cudnn_supported(q, k) else "xla"
    if platform == "tpu":
        return "splash" if splash.supported(q, q if k is None else k, mask) else "xla"
    if platform == "cpu":
        # Measured on this project's 2-core CPU (fp32, jit, min of 7 interleaved runs,
        # naive vs jax.nn.dot_product_attention): B16 L64 H4 D32 fwd 0.41 vs 0.48 ms, grad
        # 1.3 vs 1.8 ms; B16 L256 H4 D16 fwd 4.2 vs 18 ms, grad 28 vs 35 ms; B8 L1024 H8
        # D40 fwd 0.31 vs 0.38 s, grad 0.86 vs 1.15 s; Lk 77: fwd 13 vs 32 ms. Only Lk = 1
        # is a tie (~0.1 ms). The XLA form vmaps a grouped-query core and scales logits.
        # At the digits quickstart (B32, 8x8 latents) a whole UNet grad step is 368 vs 377 ms.
        # "chunked" is naive in blocks once the logits outgrow the cache (min of 5, vs
        # naive): B8 L1024 H8 D8 fwd 43 vs 197 ms, grad 0.13 vs 0.46 s; B1 L4096 H8 D40 fwd
        # 0.16 vs 0.40 s, grad 0.79 vs 2.79 s. Its forward values are naive's bit for bit;
        # below CHUNK_BYTES (or under _MIN_CHUNK_KEYS keys) it is naive exactly.
        return "chunked"
    return "xla"


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "auto", mask: jax.Array | None = None
) -> jax.Array:
    """Multi-head scaled dot-product attention.

    q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]. `mask` is boolean, broadcastable
    to [B, H, Lq, Lk], True where a query may attend. impl: "xla" (jax.nn.dot_product_attention,
    softmax in fp32), "cudnn" (its flash kernel; bf16/fp16 only), "naive" (fp32 einsums),
    "chunked" (naive over blocks of batch x head groups and query rows whose logits fit
    CHUNK_BYTES, recomputed in the backward pass), "splash" (the TPU's Pallas flash kernel,
    models/splash.py, interpreted elsewhere, for the self-attention it supports; XLA for
    the rest) or "auto" (cuDNN on GPU and splash on TPU
    where they apply, else the fastest per platform: "chunked" on CPU, XLA on TPU).
    """
    impl = _resolve(impl, q, k, mask)
    if impl == "splash":
        if splash.supported(q, k, mask):
            return splash.splash_attention(q, k, v)
        impl = "xla"  # cross-attention, masks, short sequences: a UNet-wide setting covers them
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # [B|1, H|1, Lq|1, Lk]
    if impl in ("naive", "chunked"):
        return _naive(q, k, v, mask, CHUNK_BYTES if impl == "chunked" else None)
    if impl == "cudnn" and _cudnn_supported(q, k):
        full = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        m = None if mask is None else jnp.broadcast_to(mask, full)  # cuDNN wants [B, H, Lq, Lk]
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=m, implementation="cudnn")
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # a shape or version cuDNN rejects at trace time: same maths in XLA
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def dense(
    features: int,
    axes: tuple[str, str] = MLP_IN_AXES,
    *,
    use_bias: bool = True,
    zero_init: bool = False,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Dense:
    """Dense with torch's default init (or zeros) and the given logical kernel axes."""
    kernel_init = nn.initializers.zeros_init() if zero_init else torch_default_init
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)),
        name=name,
    )


class CrossAttention(nn.Module):
    """to_q/to_k/to_v (no bias) -> attention over `heads` x `dim_head` -> to_out_0 (bias).

    `context=None` attends over x itself (self-attention, the reference's attn1).
    """

    heads: int = 8
    dim_head: int = 64
    dropout: float = 0.0
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:  # x [B, Lq, C], context [B, Lk, Cc] -> [B, Lq, C]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        context = x if context is None else context
        inner = self.heads * self.dim_head
        split = lambda t: t.reshape(*t.shape[:2], self.heads, self.dim_head)  # [B, L, H, D]
        q = split(dense(inner, QKV_KERNEL_AXES, use_bias=False, name="to_q", **kw)(x))
        k = split(dense(inner, QKV_KERNEL_AXES, use_bias=False, name="to_k", **kw)(context))
        v = split(dense(inner, QKV_KERNEL_AXES, use_bias=False, name="to_v", **kw)(context))
        out = attention(q, k, v, impl=self.attention_impl, mask=mask)  # [B, Lq, H, D]
        out = out.reshape(*out.shape[:2], inner)  # [B, Lq, inner]
        out = dense(x.shape[-1], OUT_KERNEL_AXES, name="to_out_0", **kw)(out)  # [B, Lq, C]
        return nn.Dropout(self.dropout)(out, deterministic=not train)


class FeedForward(nn.Module):
    """GEGLU feed-forward: net_0_proj to 2*inner, x * gelu(gate), dropout, net_2 back to C."""

    mult: int = 4
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:  # [B, L, C]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        inner = dim * self.mult
        h = dense(2 * inner, MLP_IN_AXES, name="net_0_proj", **kw)(x)  # [B, L, 2*inner]
        h, gate = jnp.split(h, 2, axis=-1)
        h = h * jax.nn.gelu(gate, approximate=False)  # torch F.gelu is the erf form
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        return dense(dim, MLP_OUT_AXES, name="net_2", **kw)(h)  # [B, L, C]


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm: x += attn1(norm1 x); x += attn2(norm2 x, context); x += ff(norm3 x)."""

    heads: int
    dim_head: int
    dropout: float = 0.0
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        context_mask: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:  # x [B, L, C], context [B, M, Cc], context_mask [B, M] -> [B, L, C]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        akw = dict(
            heads=self.heads,
            dim_head=self.dim_head,
            dropout=self.dropout,
            attention_impl=self.attention_impl,
            **kw,
        )
        mask = None
        if context_mask is not None and context is not None:
            mask = context_mask[:, None, None, :]  # [B, 1, 1, M]
        x = x + CrossAttention(name="attn1", **akw)(
            layers.layer_norm(name="norm1", **kw)(x), train=train
        )
        h = layers.layer_norm(name="norm2", **kw)(x)
        x = x + CrossAttention(name="attn2", **akw)(h, context, mask=mask, train=train)
        h = layers.layer_norm(name="norm3", **kw)(x)
        return x + FeedForward(dropout=self.dropout, name="ff", **kw)(h, train=train)


class SpatialTransformer(nn.Module):
    """GroupNorm -> proj_in -> depth x BasicTransformerBlock -> proj_out (zero init) -> + x.

    proj_in/proj_out are 1x1 convs (latent-diffusion, SD v1) or Dense layers applied to
    the token sequence (`use_linear`, SD v2). The zero proj_out makes the block the
    identity at initialisation.
    """

    heads: int
    dim_head: int
    depth: int = 1
    use_linear: bool = False
    norm_groups: int = 32
    dropout: float = 0.0
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:  # x [B, H, W, C], context [B, M, Cc] -> [B, H, W, C]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hh, ww, c = x.shape
        inner = self.heads * self.dim_head
        h = layers.group_norm(self.norm_groups, name="norm", **kw)(x)  # eps 1e-6 as reference
        if self.use_linear:
            h = h.reshape(b, hh * ww, c)
            h = dense(inner, MLP_IN_AXES, name="proj_in", **kw)(h)  # [B, N, inner]
        else:
            h = layers.conv(inner, 1, name="proj_in", **kw)(h)  # [B, H, W, inner]
            h = h.reshape(b, hh * ww, inner)  # [B, N, inner]
        for d in range(self.depth):
            h = BasicTransformerBlock(
                self.heads,
                self.dim_head,
                self.dropout,
                self.attention_impl,
                name=f"transformer_blocks_{d}",
                **kw,
            )(h, context, context_mask=context_mask, train=train)
        if self.use_linear:
            h = dense(c, MLP_OUT_AXES, zero_init=True, name="proj_out", **kw)(h)  # [B, N, C]
            h = h.reshape(b, hh, ww, c)
        else:
            h = h.reshape(b, hh, ww, inner)
            zeros = nn.initializers.zeros_init()
            h = layers.conv(c, 1, kernel_init=zeros, name="proj_out", **kw)(h)  # [B, H, W, C]
        return x + h
