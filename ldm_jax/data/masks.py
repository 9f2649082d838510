"""Large inpainting masks, made on the host from a numpy Generator (seeded per example):
thick random strokes (polylines with round joints) and boxes, drawn until the masked
share of the image reaches a target drawn uniformly from a coverage range.

Convention (the reference inpainting model's): mask 1 marks the region to fill, and the
masked image is the image with that region black (-1 in [-1, 1], `masked_image`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

DEFAULT_COVERAGE = (0.1, 0.5)
_MAX_TRIES = 20  # fresh starts when a shape overshoots the range's upper end


def _stroke(draw: ImageDraw.ImageDraw, size: int, rng) -> None:
    width = int(rng.uniform(0.06, 0.16) * size) + 1
    x, y = rng.uniform(0, size, 2)
    for _ in range(int(rng.integers(1, 6))):
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.5) * size
        nx = float(np.clip(x + length * np.cos(angle), 0, size - 1))
        ny = float(np.clip(y + length * np.sin(angle), 0, size - 1))
        draw.line([(x, y), (nx, ny)], fill=255, width=width)
        r = width / 2
        draw.ellipse([nx - r, ny - r, nx + r, ny + r], fill=255)  # round joint
        x, y = nx, ny


def _box(draw: ImageDraw.ImageDraw, size: int, rng) -> None:
    w, h = rng.uniform(0.1, 0.5, 2) * size
    x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
    draw.rectangle([x0, y0, x0 + w, y0 + h], fill=255)


def _draw_until(size: int, target: float, high: float, rng) -> np.ndarray | None:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    while True:
        (_stroke if rng.random() < 0.5 else _box)(draw, size, rng)
        mask = np.asarray(canvas) > 0
        coverage = mask.mean()
        if coverage >= target:
            return mask if coverage <= high else None


def large_mask(size: int, rng, coverage: tuple[float, float] = DEFAULT_COVERAGE) -> np.ndarray:
    """bool [size, size], True where the image is to be filled; its masked share lies in
    `coverage` (low, high). Should 20 fresh drawings all overshoot `high` (shapes too
    large for a narrow range), one rectangle of the target's area is returned."""
    low, high = coverage
    if not 0.0 < low <= high < 1.0:
        raise ValueError(f"coverage {coverage}: need 0 < low <= high < 1")
    target = rng.uniform(low, high)
    for _ in range(_MAX_TRIES):
        mask = _draw_until(size, target, high, rng)
        if mask is not None:
            return mask
    w = max(1, int(np.sqrt(target) * size))
    h = int(target * size * size / w)  # area <= target <= high ...
    h = min(size, h + (w * h < low * size * size))  # ... and >= low
    mask = np.zeros((size, size), bool)
    y0, x0 = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    mask[y0 : y0 + h, x0 : x0 + w] = True
    return mask


def masked_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """image [H, W, 3] in [-1, 1], mask [H, W] (True: to fill) -> the image with the
    masked region black (-1), as the reference's masked_image."""
    return np.where(mask[..., None], -1.0, image).astype(np.float32)


def coverage_histogram(masks, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(counts, bin edges over [0, 1]) of the masked shares of `masks`."""
    shares = np.asarray([np.mean(m) for m in masks])
    return np.histogram(shares, bins=bins, range=(0.0, 1.0))
