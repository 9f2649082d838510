"""PatchGAN discriminator (pix2pix / taming `NLayerDiscriminator`) for the autoencoder GAN loss.

Layer names are the reference `nn.Sequential` indices, `main.{i}` -> `main_{i}`, so weight
import is a renaming. For n_layers = L the torch Sequential is:
  main.0 conv(s2, bias), main.1 LeakyReLU
  for n in 1..L-1: main.{3n-1} conv(s2, no bias), main.{3n} BatchNorm, main.{3n+1} LeakyReLU
  main.{3L-1} conv(s1, no bias), main.{3L} BatchNorm, main.{3L+1} LeakyReLU
  main.{3L+2} conv(s1, bias) -> 1 channel
Only conv and BatchNorm indices hold parameters (BatchNorm running stats go to `batch_stats`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import layers

Dtype = Any


def _bn_scale_init(key, shape, dtype=jnp.float32):
    # taming weights_init: BatchNorm weight ~ N(1, 0.02)
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class NLayerDiscriminator(nn.Module):
    input_nc: int = 3
    ndf: int = 64
    n_layers: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        # x [B, H, W, input_nc] -> patch logits [B, h, w, 1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, padding=((1, 1), (1, 1)))
        w_init = nn.initializers.normal(0.02)  # taming weights_init: Conv weight ~ N(0, 0.02)

        def conv_(features, stride, use_bias, idx):
            return layers.conv(
                features, 4, strides=stride, use_bias=use_bias, kernel_init=w_init,
                name=f"main_{idx}", **kw,
            )  # fmt: skip

        def bn(idx):
            # momentum 0.9 == torch momentum 0.1; flax normalises and tracks with the
            # biased batch variance (torch tracks the unbiased one).
            return nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                epsilon=1e-5,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                scale_init=nn.with_logical_partitioning(_bn_scale_init, layers.NORM_AXES),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                name=f"main_{idx}",
            )

        h = nn.leaky_relu(conv_(self.ndf, 2, True, 0)(x), 0.2)  # [B, H/2, W/2, ndf]
        mult = 1
        for n in range(1, self.n_layers):
            mult = min(2**n, 8)
            h = conv_(self.ndf * mult, 2, False, 3 * n - 1)(h)
            h = nn.leaky_relu(bn(3 * n)(h), 0.2)
        mult = min(2**self.n_layers, 8)
        n = self.n_layers
        h = conv_(self.ndf * mult, 1, False, 3 * n - 1)(h)  # stride 1: size - 1
        h = nn.leaky_relu(bn(3 * n)(h), 0.2)
        return conv_(1, 1, True, 3 * n + 2)(h)  # [B, h, w, 1]
