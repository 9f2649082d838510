"""Image arrays in and out: [-1, 1] floats <-> uint8, grids, PNG files, image files."""

from __future__ import annotations


import numpy as np
from PIL import Image

from ldm_jax import storage
from ldm_jax.data import transforms
from ldm_jax.errors import UserError


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8, the same rounding everywhere in the project."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def image_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Rows of [N, H, W, 3] uint8 images -> one [R*(H+pad)+pad, N*(W+pad)+pad, 3] grid."""
    n, h, w, c = rows[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, np.uint8)
    for r, row in enumerate(rows):
        for i, img in enumerate(row):
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            grid[y : y + h, x : x + w] = img
    return grid


def load_image(path, size: int) -> np.ndarray:
    """An image file -> [size, size, 3] float32 in [-1, 1]: the shorter side resized to
    `size`, then the centre cropped, as the data pipeline's eval images are."""
    path = storage.path(path)
    if not path.is_file():
        raise UserError(f"image {path} not found.")
    try:
        with path.open("rb") as f:
            image = np.asarray(Image.open(f).convert("RGB"))
    except OSError as e:
        raise UserError(f"{path} is not an image PIL can read: {e}") from None
    image = transforms.resize_smaller_side(image, size)
    return transforms.to_float(transforms.center_crop(image, size))


def save_png(path, image: np.ndarray, upscale: int = 1) -> None:
    """uint8 [H, W, 3] written as a PNG at `path` (local or remote), `upscale` times
    larger (nearest)."""
    path = storage.path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    storage.save_png(path, img)
