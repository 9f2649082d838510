"""The LDM diffusion UNet eps_theta(z_t, t, context), after openaimodel.UNetModel.

Layout and names follow the CompVis state dict with dots as underscores (`input_blocks.1.0
.in_layers.2` -> `input_blocks_1_0/in_layers_2`), so importing PyTorch weights is a
renaming (conv kernels OIHW -> HWIO, linear weights transposed). NHWC throughout.
`attention_resolutions` are downsampling factors (ds = 1, 2, 4, ...), as in the reference.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import attention as attn_lib
from ldm_jax.models import layers
from ldm_jax.models.attention import SpatialTransformer
from ldm_jax.models.axes import (
    CONV1D_KERNEL_AXES,
    CONV_BIAS_AXES,
    FEATURE_MAP_AXES,
    MLP_IN_AXES,
    MLP_OUT_AXES,
)
from ldm_jax.models.layers import swish

Dtype = Any
REMAT_POLICIES = ("none", "attention", "full")


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [B] -> [B, dim]: cos half first, then sin (the reference order)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)  # [half]
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # [B, 2*half]
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def attention_heads(
    ch: int, num_heads: int, num_head_channels: int, *, legacy: bool = True, spatial: bool = True
) -> tuple[int, int]:
    """(heads, dim_head) of the attention on `ch` channels, derived as openaimodel does.

    A head width (num_head_channels) wins over a head count. legacy=True then recomputes
    dim_head as ch // heads for SpatialTransformer and as num_head_channels for the
    AttentionBlock, which falls back to num_heads when that is -1.
    """
    if num_head_channels == -1:
        if num_heads == -1:
            raise ValueError("set num_heads or num_head_channels (both are -1)")
        heads, dim_head = num_heads, ch // num_heads
    else:
        heads, dim_head = ch // num_head_channels, num_head_channels
    if legacy:
        dim_head = ch // heads if spatial and heads > 0 else num_head_channels
    if not spatial and dim_head != -1:  # AttentionBlock(num_head_channels=dim_head)
        if ch % dim_head:
            raise ValueError(f"{ch} channels do not split into heads of {dim_head}")
        heads = ch // dim_head
    if heads < 1 or (not spatial and ch % heads):
        raise ValueError(f"{ch} channels do not split into {heads} attention heads")
    return (heads, dim_head) if spatial else (heads, ch // heads)


def group_norm(groups: int, **kw) -> nn.GroupNorm:
    # GroupNorm32 of openaimodel keeps torch's default eps 1e-5 (the autoencoder and the
    # SpatialTransformer use 1e-6); statistics in fp32 whatever the compute dtype.
    return layers.group_norm(groups, eps=1e-5, **kw)


def _avg_pool2(x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H/2, W/2, C]
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _nearest2(x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, 2H, 2W, C]
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class UNetDownsample(nn.Module):
    """3x3 stride-2 conv `op` with symmetric padding 1 (not the autoencoder's asymmetric pad)."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H/2, W/2, C]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return layers.conv(self.channels, 3, strides=2, padding=((1, 1), (1, 1)), name="op", **kw)(
            x
        )


class UNetResBlock(nn.Module):
    """in_layers (norm, SiLU, [resample], conv) + emb_layers -> out_layers (zero conv) + skip.

    With `up`/`down` (resblock_updown) both branches are resampled without parameters:
    nearest x2 / 2x2 average pooling, between the SiLU and the conv as in the reference.
    """

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
        # x [B, H, W, Cin], emb [B, E] -> [B, H', W', Cout]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out = self.out_channels
        h = swish(group_norm(self.norm_groups, name="in_layers_0", **kw)(x))
        if self.up or self.down:
            resample = _nearest2 if self.up else _avg_pool2
            h, x = resample(h), resample(x)
        h = layers.conv(out, 3, name="in_layers_2", **kw)(h)  # [B, H', W', Cout]
        n_emb = 2 * out if self.use_scale_shift_norm else out
        e = attn_lib.dense(n_emb, MLP_IN_AXES, name="emb_layers_1", **kw)(swish(emb))
        e = e[:, None, None, :].astype(h.dtype)  # [B, 1, 1, n_emb]
        norm = group_norm(self.norm_groups, name="out_layers_0", **kw)
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = norm(h) * (1.0 + scale) + shift
        else:
            h = norm(h + e)
        h = nn.Dropout(self.dropout)(swish(h), deterministic=not train)
        zeros = nn.initializers.zeros_init()
        h = layers.conv(out, 3, kernel_init=zeros, name="out_layers_3", **kw)(h)
        if x.shape[-1] != out:
            x = layers.conv(out, 1, name="skip_connection", **kw)(x)
        return x + h


class AttentionBlock(nn.Module):
    """openaimodel's self-attention over H*W (no context), legacy QKV channel order.

    `qkv` and `proj_out` are 1x1 Conv1d over the flattened positions (kernels [1, Cin, Cout]
    like torch's [Cout, Cin, 1]); the 3C qkv channels are grouped per head as (head, q|k|v,
    d), the order QKVAttentionLegacy splits them in.
    """

    heads: int
    norm_groups: int = 32
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H, W, C]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hh, ww, c = x.shape
        d = c // self.heads
        conv1d = lambda n, init, name: nn.Conv(
            n,
            (1,),
            kernel_init=nn.with_logical_partitioning(init, CONV1D_KERNEL_AXES),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), CONV_BIAS_AXES),
            name=name,
            **kw,
        )
        h = group_norm(self.norm_groups, name="norm", **kw)(x).reshape(b, hh * ww, c)  # [B, N, C]
        qkv = conv1d(3 * c, layers.torch_default_init, "qkv")(h)  # [B, N, 3C]
        qkv = qkv.reshape(b, hh * ww, self.heads, 3, d)  # [B, N, heads, 3, d]
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # [B, N, heads, d]
        out = attn_lib.attention(q, k, v, impl=self.attention_impl).reshape(b, hh * ww, c)
        out = conv1d(c, nn.initializers.zeros_init(), "proj_out")(out)  # [B, N, C]
        return x + out.reshape(b, hh, ww, c)


class _Block(NamedTuple):
    """One TimestepEmbedSequential of the reference: its name and what it holds, in order."""

    name: str
    res_out: int | None  # output channels of its ResBlock (None: a lone Downsample)
    attn: tuple[int, int] | None  # (heads, dim_head) of its attention
    resample: str | None  # "down" | "up"


def _plan(m: UNetModel) -> tuple[list[_Block], _Block, list[_Block]]:
    """Input, middle and output blocks, walked exactly as openaimodel builds them."""
    if m.num_heads == -1 and m.num_head_channels == -1:
        raise ValueError("UNetModel: set num_heads or num_head_channels (both are -1)")
    heads = lambda ch: attention_heads(
        ch, m.num_heads, m.num_head_channels, legacy=m.legacy, spatial=m.use_spatial_transformer
    )
    mc, attn_ds = m.model_channels, tuple(m.attention_resolutions)
    inputs, ds, i = [], 1, 1  # input_blocks_0 is the stem conv
    for level, mult in enumerate(m.channel_mult):
        for _ in range(m.num_res_blocks):
            ch = mult * mc
            inputs.append(
                _Block(f"input_blocks_{i}", ch, heads(ch) if ds in attn_ds else None, None)
            )
            i += 1
        if level != len(m.channel_mult) - 1:
            inputs.append(_Block(f"input_blocks_{i}", None, None, "down"))
            i, ds = i + 1, ds * 2
    middle = _Block("middle_block", ch, heads(ch), None)
    outputs, i = [], 0
    for level, mult in reversed(list(enumerate(m.channel_mult))):
        for j in range(m.num_res_blocks + 1):
            ch = mult * mc
            up = "up" if level and j == m.num_res_blocks else None
            outputs.append(
                _Block(f"output_blocks_{i}", ch, heads(ch) if ds in attn_ds else None, up)
            )
            i, ds = i + 1, ds // 2 if up else ds
    return inputs, middle, outputs


class UNetModel(nn.Module):
    """openaimodel.UNetModel: __call__(x [B, H, W, in], t [B], context, y) -> [B, H, W, out].

    context [B, L, context_dim] feeds every SpatialTransformer's cross-attention; y [B]
    are class ids for `label_emb` (added to the time embedding). Defaults are the
    reference constructor's; H and W must be divisible by 2**(len(channel_mult) - 1).
    """

    in_channels: int
    out_channels: int
    model_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_heads: int = -1
    num_head_channels: int = -1
    transformer_depth: int = 1
    context_dim: int | None = None
    use_spatial_transformer: bool = False
    use_linear_in_transformer: bool = False
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    dropout: float = 0.0
    num_classes: int | None = None
    legacy: bool = True
    norm_groups: int = 32
    attention_impl: str = "auto"
    # Rematerialisation: recompute activations in the backward pass instead of storing
    # them, for "attention" blocks only or for every ResBlock and attention block ("full").
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def attention_layout(self) -> dict[str, tuple[int, int]]:
        """{block name: (heads, dim_head)} of every attention module, e.g. input_blocks_1_1."""
        inputs, middle, outputs = _plan(self)
        out = {f"{b.name}_1": b.attn for b in inputs + outputs if b.attn}
        return {**out, f"{middle.name}_1": middle.attn}

    def _check(self, x, context, y) -> None:
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat {self.remat!r}; valid: {list(REMAT_POLICIES)}")
        if self.use_spatial_transformer != (self.context_dim is not None):
            raise ValueError(
                "UNetModel: use_spatial_transformer=True needs context_dim and context_dim "
                "needs use_spatial_transformer=True (as the reference asserts); got "
                f"{self.use_spatial_transformer=}, {self.context_dim=}"
            )
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must be [B, H, W, {self.in_channels}] (NHWC), got {x.shape}")
        f = 2 ** (len(self.channel_mult) - 1)
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"H and W ({x.shape[1]}x{x.shape[2]}) must be divisible by {f} "
                f"= 2**(len(channel_mult) - 1) for {len(self.channel_mult)} levels"
            )
        if self.context_dim is None and context is not None:
            raise ValueError("context given but the UNet has no cross-attention (context_dim None)")
        if self.context_dim is not None:
            if context is None:
                raise ValueError(f"this UNet needs context [B, L, {self.context_dim}]; got None")
            if context.ndim != 3 or context.shape[-1] != self.context_dim:
                raise ValueError(f"context must be [B, L, {self.context_dim}], got {context.shape}")
        if self.num_classes is None and y is not None:
            raise ValueError("class labels y given but num_classes is None")
        if self.num_classes is not None and (y is None or jnp.shape(y) != (x.shape[0],)):
            raise ValueError(
                f"num_classes={self.num_classes}: y must be int class ids of shape "
                f"[{x.shape[0]}], got {None if y is None else jnp.shape(y)}"
            )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        timesteps: jax.Array,
        context: jax.Array | None = None,
        y: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> jax.Array:  # x [B, H, W, in], t [B], context [B, L, Dc], y [B] -> [B, H, W, out]
        self._check(x, context, y)
        inputs, middle, outputs = _plan(self)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mc, ted = self.model_channels, 4 * self.model_channels
        t = jnp.broadcast_to(jnp.asarray(timesteps), (x.shape[0],))
        emb = timestep_embedding(t, mc).astype(self.dtype)  # [B, mc]
        emb = attn_lib.dense(ted, MLP_IN_AXES, name="time_embed_0", **kw)(emb)
        emb = attn_lib.dense(ted, MLP_OUT_AXES, name="time_embed_2", **kw)(swish(emb))  # [B, E]
        if self.num_classes is not None:
            init = nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed"))
            label = nn.Embed(self.num_classes, ted, embedding_init=init, name="label_emb", **kw)
            emb = emb + label(y)  # torch Embedding init N(0, 1)
        if context is not None:
            context = context.astype(self.dtype)

        h = layers.conv(mc, 3, name="input_blocks_0_0", **kw)(x.astype(self.dtype))
        hs = [nn.with_logical_constraint(h, FEATURE_MAP_AXES)]  # skips, [B, H, W, mc] first
        for block in inputs:
            h = self._block(block, h, emb, context, train)
            hs.append(h)
        h = self._resblock(middle.res_out, "middle_block_0", h, emb, train)
        h = self._attention(middle.attn, "middle_block_1", h, context, train)
        h = self._resblock(middle.res_out, "middle_block_2", h, emb, train)
        h = nn.with_logical_constraint(h, FEATURE_MAP_AXES)
        for block in outputs:
            h = jnp.concatenate([h, hs.pop()], axis=-1)  # [B, h, w, C + C_skip]
            h = self._block(block, h, emb, context, train)

        # The reference runs the head in x's dtype (fp32 under fp16 training).
        hkw = dict(dtype=jnp.promote_types(self.dtype, x.dtype), param_dtype=self.param_dtype)
        h = swish(group_norm(self.norm_groups, name="out_0", **hkw)(h.astype(hkw["dtype"])))
        zeros = nn.initializers.zeros_init()
        return layers.conv(self.out_channels, 3, kernel_init=zeros, name="out_2", **hkw)(h)

    def _resblock(self, out, name, h, emb, train, **updown):
        # static_argnums count self: (self, x, emb, train)
        cls = nn.remat(UNetResBlock, static_argnums=(3,)) if self.remat == "full" else UNetResBlock
        return cls(
            out,
            self.dropout,
            self.use_scale_shift_norm,
            norm_groups=self.norm_groups,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
            **updown,
        )(h, emb, train)

    def _attention(self, heads_dim, name, h, context, train):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        heads, dim_head = heads_dim
        remat = self.remat in ("attention", "full")
        if not self.use_spatial_transformer:
            cls = nn.remat(AttentionBlock) if remat else AttentionBlock
            return cls(heads, self.norm_groups, self.attention_impl, **kw)(h)
        # static_argnums count self: (self, x, context, context_mask, train)
        cls = nn.remat(SpatialTransformer, static_argnums=(4,)) if remat else SpatialTransformer
        return cls(
            heads,
            dim_head,
            depth=self.transformer_depth,
            use_linear=self.use_linear_in_transformer,
            norm_groups=self.norm_groups,
            attention_impl=self.attention_impl,
            **kw,
        )(h, context, None, train)

    def _block(self, block: _Block, h, emb, context, train):
        """One TimestepEmbedSequential: [ResBlock] [attention] [Downsample | Upsample]."""
        j = 0
        if block.res_out is not None:
            h = self._resblock(block.res_out, f"{block.name}_{j}", h, emb, train)
            j += 1
        if block.attn is not None:
            h = self._attention(block.attn, f"{block.name}_{j}", h, context, train)
            j += 1
        if block.resample is not None:
            name, ch = f"{block.name}_{j}", h.shape[-1]
            kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
            if self.resblock_updown:  # parameter-free resampling inside a ResBlock
                updown = dict(up=True) if block.resample == "up" else dict(down=True)
                h = self._resblock(ch, name, h, emb, train, **updown)
            elif block.resample == "up":
                h = layers.Upsample(ch, **kw)(h)
            else:
                h = UNetDownsample(ch, **kw)(h)
        return nn.with_logical_constraint(h, FEATURE_MAP_AXES)
