"""Low-resolution conditions for super-resolution, made on the host from a uint8 image
and a numpy Generator (seeded per example, as the crops are).

`bicubic`: plain bicubic down-scaling (the paper's ablation). `bsr_light`: the light BSR
degradation of the paper's super-resolution model, with the reference's order,
probabilities and parameter ranges:

    [p 1/4, f=4 only] halve first (OpenCV linear/cubic/area, or antialiased bicubic); f -> 2
    then, in a random order that keeps down-scaling before the final resize:
      blur          p 1/2 anisotropic Gaussian (size 5..14, eigenvalues U(0, (4 + f) / 4),
                    angle U(0, pi)), else isotropic (size 5..7, sigma U(0, (2 + 0.2 f) / 4))
      down-scale    p 0.8 resize by 1 / U(1, 2 f) (linear/cubic/area), else a 25 px
                    Gaussian (sigma U(0.1, 0.6 f)) shifted by (f - 1) / 2 px and every f-th px
      resize        to the input's size / f (linear/cubic/area)
      noise         Gaussian of level 1 or 2 (/255): colour (p 0.4), grey (p 0.4) or
                    channel-correlated (p 0.2)
      JPEG          p 0.9, quality 80..95
    a final JPEG, quality 80..95.

Every draw is appended to `record` when one is given, so tests can check the drawn
parameters' distributions against the ranges above.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

INTERPOLATIONS = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA)
_STEPS = 7  # the reference's step ids: 0 blur, 2 down-scale, 3 resize, 4 noise, 5 JPEG


def to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def bicubic(image: np.ndarray, factor: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [H / f, W / f, 3] by bicubic interpolation."""
    h, w = image.shape[:2]
    return cv2.resize(image, (w // factor, h // factor), interpolation=cv2.INTER_CUBIC)


def _resize(image, width: int, height: int, rng, record, what: str) -> np.ndarray:
    interp = int(rng.integers(len(INTERPOLATIONS)))
    _log(record, what, interpolation=interp, size=(height, width))
    out = cv2.resize(image, (max(1, width), max(1, height)), interpolation=INTERPOLATIONS[interp])
    return np.clip(out, 0.0, 1.0)


def _log(record, step: str, **params) -> None:
    if record is not None:
        record.append({"step": step, **params})


# ----- kernels ----------------------------------------------------------------------------
def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """An isotropic size x size Gaussian summing to 1 (tails below eps x max set to 0)."""
    r = (size - 1) / 2.0
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    k = np.exp(-(x * x + y * y) / (2.0 * max(sigma, 1e-4) ** 2))
    k[k < np.finfo(float).eps * k.max()] = 0.0
    return k / k.sum()


def anisotropic_kernel(size: int, theta: float, l1: float, l2: float) -> np.ndarray:
    """A size x size Gaussian with covariance eigenvalues l1, l2, rotated by theta."""
    v = np.array([np.cos(theta), np.sin(theta)])
    basis = np.array([[v[0], v[1]], [v[1], -v[0]]])
    cov = basis @ np.diag([max(l1, 1e-4), max(l2, 1e-4)]) @ np.linalg.inv(basis)
    centre = size / 2.0 + 0.5
    offsets = np.arange(size) - centre + 1
    cx, cy = np.meshgrid(offsets, offsets)
    points = np.stack([cx, cy], axis=-1)  # [size, size, 2] as (x, y)
    quad = np.einsum("...i,ij,...j->...", points, np.linalg.inv(cov), points)
    # Shifted by the minimum: a narrow kernel on an even grid (no sample at the centre)
    # would otherwise underflow to all zeros.
    k = np.exp(-0.5 * (quad - quad.min()))
    return k / k.sum()


def shift_kernel(k: np.ndarray, factor: int) -> np.ndarray:
    """The kernel resampled (bilinearly, edges clamped) (f - 1) / 2 px towards the upper
    left, so that taking every f-th pixel afterwards stays centred."""
    h, w = k.shape
    shift = (factor - 1) * 0.5
    ys = np.clip(np.arange(h) + shift, 0, h - 1)
    xs = np.clip(np.arange(w) + shift, 0, w - 1)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return ndimage.map_coordinates(k, [yy, xx], order=1, mode="nearest")


def _convolve(image: np.ndarray, k: np.ndarray) -> np.ndarray:
    return ndimage.convolve(image, k[..., None], mode="mirror")


# ----- steps ------------------------------------------------------------------------------
def _blur(image, factor: int, rng, record) -> np.ndarray:
    wide, narrow = (4.0 + factor) / 4.0, (2.0 + 0.2 * factor) / 4.0
    if rng.random() < 0.5:
        l1, l2 = wide * rng.random(), wide * rng.random()
        size, theta = int(rng.integers(2, 12)) + 3, rng.random() * np.pi
        _log(record, "blur", kind="anisotropic", factor=factor, size=size, l1=l1, l2=l2,
             theta=theta)  # fmt: skip
        k = anisotropic_kernel(size, theta, l1, l2)
    else:
        size, sigma = int(rng.integers(2, 5)) + 3, narrow * rng.random()
        _log(record, "blur", kind="isotropic", factor=factor, size=size, sigma=sigma)
        k = gaussian_kernel(size, sigma)
    return _convolve(image, k)


def _downscale(image, factor: int, rng, record) -> np.ndarray:
    h, w = image.shape[:2]
    if rng.random() < 0.8:
        scale = rng.uniform(1.0, 2.0 * factor)
        _log(record, "downscale_scale", factor=factor, scale=scale)
        return _resize(image, int(w / scale), int(h / scale), rng, record, "downscale")
    sigma = rng.uniform(0.1, 0.6 * factor)
    _log(record, "downscale_blur", factor=factor, sigma=sigma)
    k = shift_kernel(gaussian_kernel(25, sigma), factor)
    return np.clip(_convolve(image, k / k.sum())[::factor, ::factor], 0.0, 1.0)


def _noise(image, rng, record) -> np.ndarray:
    level = int(rng.integers(1, 3))  # 1 or 2, in 1/255
    kind = rng.random()
    h, w = image.shape[:2]
    if kind > 0.6:
        _log(record, "noise", kind="colour", level=level)
        noise = rng.normal(0.0, level / 255.0, image.shape)
    elif kind < 0.4:
        _log(record, "noise", kind="grey", level=level)
        noise = rng.normal(0.0, level / 255.0, (h, w, 1))
    else:
        _log(record, "noise", kind="correlated", level=level)
        d = np.diag(rng.random(3))
        u, _ = np.linalg.qr(rng.random((3, 3)))
        cov = np.abs((2.0 / 255.0) ** 2 * (u.T @ d @ u))
        noise = rng.multivariate_normal(np.zeros(3), cov, (h, w))
    return np.clip(image + noise.astype(np.float32), 0.0, 1.0)


def _jpeg(image, rng, record) -> np.ndarray:
    quality = int(rng.integers(80, 96))
    _log(record, "jpeg", quality=quality)
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="JPEG", quality=quality)
    return to_float(np.asarray(Image.open(buffer).convert("RGB")))


def _step_order(rng) -> list[int]:
    order = list(rng.permutation(_STEPS))
    i, j = order.index(2), order.index(3)
    if i > j:  # the final resize comes after the down-scaling
        order[i], order[j] = order[j], order[i]
    return order


def bsr_light(image: np.ndarray, factor: int, rng, record: list | None = None) -> np.ndarray:
    """uint8 [H, W, 3] (H, W multiples of f) -> the degraded uint8 [H / f, W / f, 3]."""
    x = to_float(image)
    h, w = x.shape[:2]
    if h % factor or w % factor:
        raise ValueError(f"image {h}x{w} is not a multiple of the factor {factor}")
    sf = factor
    if factor == 4 and rng.random() < 0.25:
        if rng.random() < 0.5:
            x = _resize(x, w // 2, h // 2, rng, record, "halve")
        else:
            _log(record, "halve", interpolation="antialiased_bicubic", size=(h // 2, w // 2))
            x = to_float(np.asarray(Image.fromarray(to_uint8(x)).resize((w // 2, h // 2),
                                                                        Image.BICUBIC)))  # fmt: skip
        sf = 2
    before_downscale = x.shape[:2]
    for step in _step_order(rng):
        if step == 0:
            x = _blur(x, sf, rng, record)
        elif step == 2:
            before_downscale = x.shape[:2]
            x = _downscale(x, sf, rng, record)
        elif step == 3:
            bh, bw = before_downscale
            x = _resize(x, bw // sf, bh // sf, rng, record, "resize")
        elif step == 4:
            x = _noise(x, rng, record)
        elif step == 5 and rng.random() < 0.9:
            x = _jpeg(x, rng, record)
    return to_uint8(_jpeg(x, rng, record))


DEGRADATIONS = {"bicubic": lambda image, factor, rng, record=None: bicubic(image, factor),
                "bsr_light": bsr_light}  # fmt: skip
