"""Conditioning encoders tau_theta: y -> a context sequence [B, M, d_tau] for cross-attention.

- `ClassEmbedder`: class label -> [B, 1, d] (the reference's ClassEmbedder), plus a learned
  null class for classifier-free guidance.
- `TransformerEncoder`: the paper's BERTEmbedder trunk (an x-transformers Encoder), trained
  jointly with the UNet from scratch.
- `BertEncoder`: the BERT architecture, a frozen text encoder with the pretrained
  all-MiniLM-L6-v2 weights that `ldm_jax.interop.bert_weights.load_minilm` reads.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import attention as attn
from ldm_jax.models import layers
from ldm_jax.models.axes import (
    EMBED_AXES,
    MLP_IN_AXES,
    MLP_OUT_AXES,
    OUT_KERNEL_AXES,
    QKV_KERNEL_AXES,
)

Dtype = Any


def _embed(num: int, features: int, stddev: float, param_dtype: Dtype, name: str) -> nn.Embed:
    init = nn.initializers.normal(stddev=stddev)
    return nn.Embed(
        num,
        features,
        param_dtype=param_dtype,
        embedding_init=nn.with_logical_partitioning(init, EMBED_AXES),
        name=name,
    )


def _self_attention(x, mask, heads: int, dim_head: int, names, use_bias: bool, impl: str, kw):
    """x [B, L, C] -> [B, L, heads * dim_head], called inside a compact module whose q/k/v
    projections get `names`. mask: bool [B, L] (True = real token) or None."""
    b, length, _ = x.shape
    q, k, v = (
        attn.dense(heads * dim_head, QKV_KERNEL_AXES, use_bias=use_bias, name=n, **kw)(x).reshape(
            b, length, heads, dim_head
        )
        for n in names
    )
    # [B, L] padding mask -> [B, 1, 1, L]: padded keys are hidden from every query.
    mask = None if mask is None else jnp.asarray(mask, bool)[:, None, None, :]
    return attn.attention(q, k, v, impl=impl, mask=mask).reshape(b, length, heads * dim_head)


# ----------------------------------------------------------------------------- classes


def check_class_ids(y, n_classes: int, *, allow_null: bool = False) -> np.ndarray:
    """Host-side check that labels lie in [0, n_classes) (or == n_classes, the null class,
    when allow_null). Returns y as a numpy int array; raises ValueError naming the bad id."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"class ids must be integers, got dtype {y.dtype}")
    hi = n_classes if allow_null else n_classes - 1
    bad = y[(y < 0) | (y > hi)]
    if bad.size:
        valid = f"[0, {n_classes - 1}]" + (
            f" or {n_classes} (the null class)" if allow_null else ""
        )
        raise ValueError(
            f"class id {int(bad.flat[0])} is out of range ({bad.size} bad ids): valid ids are "
            f"{valid} for n_classes={n_classes}"
        )
    return y


class ClassEmbedder(nn.Module):
    """y int [B] -> [B, 1, embed_dim]. Row n_classes of the table is the learned null class
    that classifier-free guidance substitutes for dropped labels."""

    n_classes: int
    embed_dim: int
    param_dtype: Dtype = jnp.float32

    @property
    def null_class(self) -> int:
        return self.n_classes

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        if not isinstance(y, jax.core.Tracer):
            check_class_ids(y, self.n_classes, allow_null=True)
        # Under jit ids cannot be checked; jnp.take's default "fill" mode turns an
        # out-of-range id into a NaN row, which at least does not pass silently.
        # N(0, 1) init as torch.nn.Embedding, the reference's table.
        table = _embed(self.n_classes + 1, self.embed_dim, 1.0, self.param_dtype, "embedding")
        return table(jnp.asarray(y)[:, None])  # [B, 1, embed_dim]


# ----------------------------------------------------------------- x-transformers trunk


class _EncoderBlock(nn.Module):
    """Pre-LN x-transformers block: x + Attn(LN(x)), then x + FF(LN(x)), FF = GELU MLP."""

    heads: int
    dim_head: int
    ff_mult: int
    impl: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:  # [B, L, C]
        c = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.layer_norm(eps=1e-5, name="attn_norm", **kw)(x)
        # x-transformers' to_q/to_k/to_v carry no bias; to_out does.
        names = ("to_q", "to_k", "to_v")
        out = _self_attention(h, mask, self.heads, self.dim_head, names, False, self.impl, kw)
        x = x + attn.dense(c, OUT_KERNEL_AXES, name="to_out", **kw)(out)
        h = layers.layer_norm(eps=1e-5, name="ff_norm", **kw)(x)
        h = attn.dense(c * self.ff_mult, MLP_IN_AXES, name="ff_in", **kw)(h)  # [B, L, C * ff_mult]
        h = jax.nn.gelu(h, approximate=False)  # torch nn.GELU() is the exact erf form
        return x + attn.dense(c, MLP_OUT_AXES, name="ff_out", **kw)(h)


class TransformerEncoder(nn.Module):
    """The paper's BERTEmbedder trunk: token ids [B, L] -> context [B, L, n_embed].

    token embedding + learned absolute positions -> n_layer pre-LN blocks -> final LayerNorm
    (x-transformers TransformerWrapper(Encoder), return_embeddings=True; embedding dropout is
    0 in every reference config and is left out). The reference attends over padding too;
    passing `mask` (bool [B, L], True = real token) hides padded keys instead.
    """

    n_embed: int
    n_layer: int
    vocab_size: int = 30522
    max_seq_len: int = 77
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    attn_impl: str = "auto"  # see ldm_jax.models.attention.attention
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        length = tokens.shape[1]
        if length > self.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds max_seq_len={self.max_seq_len}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tok = _embed(self.vocab_size, self.n_embed, 0.02, self.param_dtype, "token_emb")
        pos = _embed(self.max_seq_len, self.n_embed, 0.02, self.param_dtype, "pos_emb")
        x = tok(tokens) + pos(jnp.arange(length))[None]  # [B, L, n_embed]
        x = x.astype(self.dtype)
        for i in range(self.n_layer):
            block = _EncoderBlock(
                self.heads, self.dim_head, self.ff_mult, self.attn_impl, name=f"layers_{i}", **kw
            )
            x = block(x, mask)
        return layers.layer_norm(eps=1e-5, name="norm", **kw)(x)


# ------------------------------------------------------------------------ BERT (MiniLM)


class _BertLayer(nn.Module):
    """Post-LN BERT layer: LN(x + Attn(x)), then LN(h + Out(GELU(Inter(h))))."""

    num_heads: int
    intermediate_size: int
    eps: float
    impl: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:  # [B, L, C]
        c = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        names = ("query", "key", "value")
        d = c // self.num_heads
        a = _self_attention(x, mask, self.num_heads, d, names, True, self.impl, kw)
        x = layers.layer_norm(eps=self.eps, name="attention_norm", **kw)(
            x + attn.dense(c, OUT_KERNEL_AXES, name="attention_out", **kw)(a)
        )
        h = attn.dense(self.intermediate_size, MLP_IN_AXES, name="intermediate", **kw)(x)
        h = jax.nn.gelu(h, approximate=False)  # BERT's "gelu" is the exact erf form
        return layers.layer_norm(eps=self.eps, name="output_norm", **kw)(
            x + attn.dense(c, MLP_OUT_AXES, name="output", **kw)(h)
        )


class BertEncoder(nn.Module):
    """BERT (HF BertModel without the pooler): ids [B, L] -> last_hidden_state [B, L, hidden].

    `attention_mask` (bool/int [B, L], 1 = real token) hides padded keys, as in HF.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    attn_impl: str = "auto"  # see ldm_jax.models.attention.attention
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        length = input_ids.shape[1]
        if length > self.max_position_embeddings:
            raise ValueError(
                f"length {length} > max_position_embeddings {self.max_position_embeddings}"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)

        def emb(num, name):  # BERT's N(0, 0.02) init
            return _embed(num, self.hidden_size, 0.02, self.param_dtype, name)

        x = emb(self.vocab_size, "word_embeddings")(input_ids)  # [B, L, hidden]
        x = x + emb(self.max_position_embeddings, "position_embeddings")(jnp.arange(length))
        x = x + emb(self.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = layers.layer_norm(eps=self.layer_norm_eps, name="embeddings_norm", **kw)(
            x.astype(self.dtype)
        )
        for i in range(self.num_layers):
            layer = _BertLayer(
                self.num_heads,
                self.intermediate_size,
                self.layer_norm_eps,
                self.attn_impl,
                name=f"layer_{i}",
                **kw,
            )
            x = layer(x, attention_mask)
        return x


def mean_pooled(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Sentence embedding: mean of hidden [B, L, C] over real tokens (mask [B, L]) -> [B, C]."""
    m = jnp.asarray(mask, hidden.dtype)[..., None]  # [B, L, 1]
    # Clamp as sentence-transformers does, so an all-padding row gives 0, not NaN.
    return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


# --------------------------------------------------------------- semantic class maps


class SpatialRescaler(nn.Module):
    """The reference's SpatialRescaler on a one-hot class map: `n_stages` bilinear resizes
    by `multiplier`, then a 1x1 convolution without bias from the classes to
    `out_channels`. ids int [B, H, W] -> [B, H * m^n, W * m^n, out_channels].

    A 1x1 convolution of a one-hot map is a lookup of the kernel's rows, and resizing is
    linear per channel, so the module looks up first and resizes the `out_channels`
    result: equal to the reference's order, without a [B, H, W, n_classes] tensor. Each
    stage is torch's bilinear interpolate (half-pixel centres, no antialiasing); at
    multiplier 0.5 that is the mean of 2 x 2 blocks. The kernel is [n_classes, out_channels] (torch's Conv2d weight
    [out, in, 1, 1] transposed).
    """

    n_classes: int
    out_channels: int = 3
    n_stages: int = 2
    multiplier: float = 0.5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        # torch Conv2d's default init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)).
        bound = 1.0 / np.sqrt(self.n_classes)
        init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
        kernel = self.param(
            "channel_mapper", init, (self.n_classes, self.out_channels), self.param_dtype
        )
        x = jnp.take(kernel, jnp.asarray(ids, jnp.int32), axis=0)  # [B, H, W, out]
        for _ in range(self.n_stages):
            b, h, w, c = x.shape
            size = (b, int(h * self.multiplier), int(w * self.multiplier), c)  # torch floors
            # scale = multiplier, not out/in size: torch's scale_factor mapping, which
            # differs from jax.image.resize's where a side is odd (31 -> 15).
            m = jnp.full((2,), self.multiplier, jnp.float32)
            x = jax.image.scale_and_translate(
                x, size, (1, 2), m, jnp.zeros((2,), jnp.float32), "linear", antialias=False
            )
        return x
