"""Per-example image transforms in plain numpy (+ PIL for resizing).

Every function takes a uint8 image [H, W, C] (greyscale [H, W] or [H, W, 1] is turned
into RGB) and is deterministic given its `rng`, so a pipeline can derive the rng from
the example's position and replay any batch exactly.
"""

import numpy as np
from PIL import Image


def as_rgb(image: np.ndarray) -> np.ndarray:
    """[H, W] / [H, W, 1] / [H, W, 3] / [H, W, 4] -> [H, W, 3] (alpha dropped)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image [H, W], [H, W, 1|3|4], got shape {image.shape}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image[:, :, :3]


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, C] -> float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    if image.dtype != np.uint8:
        raise ValueError(f"to_float expects uint8, got {image.dtype}")
    return image.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def resize_smaller_side(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes so that min(H, W) == size, keeping the aspect ratio (PIL bicubic).

    PIL's resampling widens its kernel when shrinking, so downscaling is antialiased.
    """
    image = as_rgb(image)
    h, w = image.shape[:2]
    if min(h, w) == size:
        return image
    new_h, new_w = resized_shape(h, w, size)
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize((new_w, new_h), Image.Resampling.BICUBIC))


def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """(H, W) after `resize_smaller_side(image, size)` of an H x W image."""
    if min(h, w) == size:
        return h, w
    scale = size / min(h, w)
    return (size, max(size, round(w * scale))) if h <= w else (max(size, round(h * scale)), size)


def resize_nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """A per-pixel label map [H, W] resized by nearest neighbour (ids are not blended)."""
    if labels.shape[:2] == (height, width):
        return labels
    pil = Image.fromarray(np.ascontiguousarray(labels))
    return np.asarray(pil.resize((width, height), Image.Resampling.NEAREST))


def _check_fits(image: np.ndarray, size: int) -> None:
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from an image of {h}x{w}")


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central size x size window (offsets rounded down)."""
    image = as_rgb(image)
    _check_fits(image, size)
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size window at a uniformly random offset."""
    image = as_rgb(image)
    _check_fits(image, size)
    h, w = image.shape[:2]
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return image[top : top + size, left : left + size]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirrors left-right with probability 1/2."""
    image = as_rgb(image)
    return image[:, ::-1] if rng.random() < 0.5 else image
