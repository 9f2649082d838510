"""Batched PSNR and SSIM in jax.numpy, matching scikit-image's definitions.

SSIM follows `skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)`: an 11-tap Gaussian window (truncate 3.5), K1=0.01, K2=0.03,
SSIM map averaged over the valid region (skimage crops the filter's half-width) and channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def psnr(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Per-image PSNR in dB [B] over H, W, C for x, y [B, H, W, C] (default range [-1, 1])."""
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    mse = jnp.mean((x - y) ** 2, axis=(1, 2, 3))  # [B]
    return 10.0 * jnp.log10(data_range**2 / mse)


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    """1-D normalised Gaussian taps as scipy.ndimage builds them (radius int(t*s + 0.5))."""
    r = int(truncate * sigma + 0.5)
    t = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    return (w / w.sum()).astype(np.float32)  # [2r + 1]


def _filter_valid(img: jax.Array, w: jax.Array) -> jax.Array:
    """Separable VALID filtering of each channel: [B, H, W, C] -> [B, H-2r, W-2r, C]."""
    c = img.shape[-1]
    n = w.shape[0]
    # Depthwise convs (one group per channel) along H then W.
    kh = jnp.tile(w.reshape(n, 1, 1, 1), (1, 1, 1, c))  # [n, 1, 1, C] HWIO
    kw = jnp.tile(w.reshape(1, n, 1, 1), (1, 1, 1, c))  # [1, n, 1, C]
    dn = ("NHWC", "HWIO", "NHWC")
    hp = jax.lax.Precision.HIGHEST  # TPUs would otherwise filter in bf16
    out = jax.lax.conv_general_dilated(
        img, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c, precision=hp
    )
    return jax.lax.conv_general_dilated(
        out, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c, precision=hp
    )


def ssim(
    x: jax.Array,
    y: jax.Array,
    data_range: float = 2.0,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """Per-image mean SSIM [B] for x, y [B, H, W, C]; H and W must be >= the 11-tap window."""
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    w = jnp.asarray(gaussian_window(sigma))
    if min(x.shape[1], x.shape[2]) < w.shape[0]:
        raise ValueError(f"SSIM needs H, W >= {w.shape[0]}, got {x.shape}")
    # Filtering x, y, xx, yy, xy in one stacked call: [5B, H, W, C] -> valid region.
    stats = _filter_valid(jnp.concatenate([x, y, x * x, y * y, x * y], axis=0), w)
    ux, uy, uxx, uyy, uxy = jnp.split(stats, 5, axis=0)  # each [B, h, w, C]
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(1, 2, 3))  # [B]
