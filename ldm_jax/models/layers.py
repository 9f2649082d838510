"""Shared building blocks of the first-stage autoencoder (and a template for the UNet).

Layout, semantics and submodule names follow the CompVis LDM reference
(`ldm/modules/diffusionmodules/model.py`) so that importing PyTorch weights is a renaming:
a torch path `down.0.block.1.norm1.weight` becomes `down_0_block_1/norm1/scale` here.

Every parameter initialiser is wrapped in `nn.with_logical_partitioning`; the sharding
names come from `ldm_jax.models.axes`, the rules that map them onto mesh axes live in
`ldm_jax.parallel`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax.models.axes import CONV_BIAS_AXES, CONV_KERNEL_AXES, MLP_IN_AXES, NORM_AXES

Dtype = Any

# PyTorch's default Conv/Linear init: kaiming_uniform(a=sqrt(5)) == U(+-sqrt(1/fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


_IM2COL_PIXELS = 256
_IM2COL_DEPTH = 8192


def _im2col_pays(shape: tuple[int, ...], kh: int, kw: int) -> bool:
    b, h, w, c = shape  # NHWC input
    pixels, depth = b * h * w, kh * kw * c  # matmul rows (stride 1) and contraction size
    if (h <= kh and w <= kw) or pixels <= _IM2COL_PIXELS:
        return True
    return pixels <= 4 * _IM2COL_PIXELS and depth >= _IM2COL_DEPTH


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """`lax.conv_general_dilated`, except that small feature maps use im2col + one matmul.

    XLA:CPU runs a 3x3 conv on a 2x2 (or 1x1) map 30-100x slower than the same work as a
    matmul (181 ms vs 1.7 ms for [32, 2, 2, 512] -> 512, bench/conv_small_maps.py): it hits
    LPIPS-VGG16's last stage and the deepest levels of f=16/32 autoencoders. It is also
    2-3x slower when few output pixels meet many channels, as in SD's UNet at 8x8 and 16x16
    latents: forward [1, 8, 8, 2560] -> 1280 84 vs 27 ms, [1, 16, 16, 1280] -> 1280 71 vs
    40 ms; forward + backward [1, 32, 32, 1280] -> 1280 0.72 vs 0.52 s (min of 5, one
    other process running; at [1, 32, 32, 640] -> 640 or [8, 8, 8, 256] -> 256 XLA is as
    fast or faster). Plain strided, undilated, ungrouped NHWC/HWIO convs on maps no larger
    than the kernel, on at most _IM2COL_PIXELS input pixels (B x H x W), or on at most
    4 x _IM2COL_PIXELS with at least _IM2COL_DEPTH inputs per output take the matmul path
    on the CPU backend; everything else, and every convolution on GPU or TPU, goes to XLA
    unchanged.
    """
    kh, kw = rhs.shape[0], rhs.shape[1]
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    plain = (
        lhs.ndim == 4
        and tuple(window_strides) == (1, 1)
        and not any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
        and feature_group_count == 1
        and batch_group_count == 1
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
    )
    # Measured for XLA:CPU only: cuDNN and the TPU's convolution units keep their own.
    on_cpu = jax.default_backend() == "cpu"
    if not on_cpu or not plain or not _im2col_pays(lhs.shape, kh, kw) or kh * kw == 1:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (1, 1), padding)
    (pt, pb), (pl, pr) = padding
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))  # [B, H', W', C]
    out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    cols = [x[:, i : i + out_h, j : j + out_w, :] for i in range(kh) for j in range(kw)]
    cols = jnp.concatenate(cols, axis=-1)  # [B, out_h, out_w, kh*kw*C], (i, j, c) order = HWIO
    out = jnp.einsum(
        "bhwk,ko->bhwo",
        cols,
        rhs.reshape(-1, rhs.shape[-1]),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return out


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


def conv(
    features: int,
    kernel_size: int = 3,
    *,
    strides: int = 1,
    padding: Any = None,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init=torch_default_init,
    name: str | None = None,
) -> nn.Conv:
    """NHWC conv with logical axes; `padding=None` means the reference's k // 2 symmetric pad."""
    if padding is None:
        p = kernel_size // 2
        padding = ((p, p), (p, p))
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, CONV_KERNEL_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), CONV_BIAS_AXES),
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


def dense(
    features: int,
    *,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(torch_default_init, MLP_IN_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), MLP_IN_AXES[-1:]),
        name=name,
    )


def _norm_inits() -> dict:
    return dict(
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), NORM_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), NORM_AXES),
    )


def group_norm(
    num_groups: int = 32,
    *,
    eps: float = 1e-6,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.GroupNorm:
    # eps 1e-6 as the autoencoder and SpatialTransformer references (the UNet's GroupNorm32
    # passes torch's 1e-5); two-pass variance because E[x^2]-E[x]^2 loses digits against
    # torch when activations have a large mean.
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        name=name,
        **_norm_inits(),
    )


def layer_norm(
    *,
    eps: float = 1e-5,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.LayerNorm:
    # torch.nn.LayerNorm's default eps 1e-5 (BERT passes 1e-12); two-pass variance as above.
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        name=name,
        **_norm_inits(),
    )


class Downsample(nn.Module):
    """Halves H and W: pad (0, 1, 0, 1) (right/bottom only), then 3x3 stride-2 VALID conv."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H/2, W/2, C]
        # The asymmetric pad is folded into the conv: lax pads with zeros like F.pad.
        return conv(
            self.channels,
            3,
            strides=2,
            padding=((0, 1), (0, 1)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour x2, then 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, 2H, 2W, C]
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
        return conv(self.channels, 3, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(
            x
        )


class ResnetBlock(nn.Module):
    """norm1 -> swish -> conv1 (+ temb_proj(swish(temb))) -> norm2 -> swish -> dropout -> conv2.

    The skip is a 1x1 `nin_shortcut` (or 3x3 `conv_shortcut`) when channel counts differ.
    """

    out_channels: int
    dropout: float = 0.0
    conv_shortcut: bool = False
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array | None = None, train: bool = False
    ) -> jax.Array:  # x [B, H, W, Cin], temb [B, T] -> [B, H, W, Cout]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm(self.norm_groups, name="norm1", **kw)(x)
        h = swish(h)
        h = conv(self.out_channels, 3, name="conv1", **kw)(h)  # [B, H, W, Cout]
        if temb is not None:
            t = dense(self.out_channels, name="temb_proj", **kw)(swish(temb))  # [B, Cout]
            h = h + t[:, None, None, :]
        h = group_norm(self.norm_groups, name="norm2", **kw)(h)
        h = swish(h)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            if self.conv_shortcut:
                x = conv(self.out_channels, 3, name="conv_shortcut", **kw)(x)
            else:
                x = conv(self.out_channels, 1, name="nin_shortcut", **kw)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over the H*W positions, with a residual."""

    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H, W, C]
        b, hh, ww, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm(self.norm_groups, name="norm", **kw)(x)
        q = conv(c, 1, name="q", **kw)(h).reshape(b, hh * ww, c)  # [B, N, C]
        k = conv(c, 1, name="k", **kw)(h).reshape(b, hh * ww, c)  # [B, N, C]
        v = conv(c, 1, name="v", **kw)(h).reshape(b, hh * ww, c)  # [B, N, C]
        logits = jnp.einsum("bic,bjc->bij", q, k) * (c**-0.5)  # [B, N, N]
        # Softmax in fp32: bf16 logits over thousands of positions lose the peak.
        w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bij,bjc->bic", w, v).reshape(b, hh, ww, c)  # [B, H, W, C]
        return x + conv(c, 1, name="proj_out", **kw)(out)
