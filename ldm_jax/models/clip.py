"""CLIP text transformer, the frozen tau_theta of Stable Diffusion.

token ids [B, L] -> token embedding + learned positions -> pre-LN blocks (causal
self-attention, MLP) -> final LayerNorm -> [B, L, width], as transformers'
`CLIPTextModel.last_hidden_state` and OpenCLIP's `encode_text` before pooling.

- SD 1.x: OpenAI CLIP ViT-L/14 text tower (768 wide, 12 layers, quick_gelu), last layer.
- SD 2.x: OpenCLIP ViT-H/14 text tower (1024 wide, 24 layers, exact gelu), "penultimate":
  CompVis FrozenOpenCLIPEmbedder(layer="penultimate") runs all but the last resblock and
  then ln_final. The last block is never used, so this module does not build it: its
  parameters are those of diffusers' SD 2 `text_encoder` (23 layers, final_layer_norm).

Submodule names follow transformers' names with dots as underscores
(`encoder.layers.3.self_attn.q_proj` -> `layers_3/self_attn/q_proj`), so converting
weights (`ldm_jax.interop.clip_weights`) is a renaming.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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

ACTIVATIONS = ("quick_gelu", "gelu")
OUTPUTS = ("last", "penultimate")
# Full-size text towers of the Stable Diffusion releases (fields of CLIPTextEncoder).
SD1_TEXT = dict(width=768, num_layers=12, num_heads=12, activation="quick_gelu", output="last")
SD2_TEXT = dict(width=1024, num_layers=24, num_heads=16, activation="gelu", output="penultimate")
PRESETS = {"sd1": SD1_TEXT, "sd2": SD2_TEXT}


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "quick_gelu":  # OpenAI CLIP's sigmoid approximation of GELU
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=False)  # torch nn.GELU / HF "gelu": the erf form


def _embed(num: int, features: int, stddev: float, param_dtype: Dtype, name: str) -> nn.Embed:
    init = nn.with_logical_partitioning(nn.initializers.normal(stddev=stddev), EMBED_AXES)
    return nn.Embed(num, features, param_dtype=param_dtype, embedding_init=init, name=name)


class _CausalSelfAttention(nn.Module):
    """q/k/v/out projections with biases; each token attends to itself and earlier ones."""

    num_heads: int
    impl: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, C] -> [B, L, C]
        b, length, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = (
            attn.dense(c, QKV_KERNEL_AXES, name=n, **kw)(x).reshape(
                b, length, self.num_heads, c // self.num_heads
            )  # [B, L, H, D]
            for n in ("q_proj", "k_proj", "v_proj")
        )
        causal = jnp.tril(jnp.ones((length, length), bool))  # [Lq, Lk]
        out = attn.attention(q, k, v, impl=self.impl, mask=causal).reshape(b, length, c)
        return attn.dense(c, OUT_KERNEL_AXES, name="out_proj", **kw)(out)


class _MLP(nn.Module):
    hidden: int
    activation: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, C] -> [B, L, C]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = attn.dense(self.hidden, MLP_IN_AXES, name="fc1", **kw)(x)  # [B, L, hidden]
        h = _activation(self.activation, h)
        return attn.dense(x.shape[-1], MLP_OUT_AXES, name="fc2", **kw)(h)


class _Layer(nn.Module):
    """Pre-LN block: x + Attn(LN1(x)), then x + MLP(LN2(x))."""

    num_heads: int
    mlp_dim: int
    activation: str
    eps: float
    impl: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, C]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.layer_norm(eps=self.eps, name="layer_norm1", **kw)(x)
        x = x + _CausalSelfAttention(self.num_heads, self.impl, name="self_attn", **kw)(h)
        h = layers.layer_norm(eps=self.eps, name="layer_norm2", **kw)(x)
        return x + _MLP(self.mlp_dim, self.activation, name="mlp", **kw)(h)


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer: int ids [B, L] (L <= context_length) -> [B, L, width].

    output="last": final_layer_norm(last block's output) (SD 1.x, HF last_hidden_state);
    "penultimate": final_layer_norm(output of block num_layers - 1) (SD 2.x, HF
    final_layer_norm(hidden_states[-2])); only num_layers - 1 blocks are built then.
    Full-size: `clip_text_encoder("sd1")`; tiny ones: pass the fields directly.
    """

    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int | None = None  # None: 4 * width, as every CLIP text tower
    vocab_size: int = 49408
    context_length: int = 77
    activation: str = "quick_gelu"
    output: str = "last"
    layer_norm_eps: float = 1e-5
    attn_impl: str = "auto"  # see ldm_jax.models.attention.attention
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def num_built_layers(self) -> int:
        """Blocks this module holds parameters for (the penultimate output skips the last)."""
        return self.num_layers - (self.output == "penultimate")

    def _check_config(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.num_built_layers < 1:
            raise ValueError(f"output={self.output!r} needs more than {self.num_layers} layers")

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        self._check_config()
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed context_length={self.context_length}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # OpenAI CLIP's init: N(0, 0.02) tokens, N(0, 0.01) positions.
        tok = _embed(self.vocab_size, self.width, 0.02, self.param_dtype, "token_embedding")
        pos = _embed(self.context_length, self.width, 0.01, self.param_dtype, "position_embedding")
        x = (tok(tokens) + pos(jnp.arange(length))[None]).astype(self.dtype)  # [B, L, width]
        for i in range(self.num_built_layers):
            x = _Layer(
                self.num_heads,
                self.mlp_dim or 4 * self.width,
                self.activation,
                self.layer_norm_eps,
                self.attn_impl,
                name=f"layers_{i}",
                **kw,
            )(x)
        return layers.layer_norm(eps=self.layer_norm_eps, name="final_layer_norm", **kw)(x)


def clip_text_encoder(preset: str, **overrides) -> CLIPTextEncoder:
    """Full-size text tower of a Stable Diffusion release: "sd1" or "sd2"."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return CLIPTextEncoder(**{**PRESETS[preset], **overrides})
