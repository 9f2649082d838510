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


def image_grid(rows: list[np.ndarray], pad: int = 2, upscale: int = 1) -> np.ndarray:
    """Rows of [N, H, W, 3] uint8 images -> one [R*(H+pad)+pad, N*(W+pad)+pad, 3] grid,
    each image `upscale` times larger (nearest) first."""
    if upscale > 1:
        rows = [np.repeat(np.repeat(r, upscale, axis=1), upscale, axis=2) for r in rows]
    n, h, w, c = rows[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, np.uint8)
    for r, row in enumerate(rows):
        for i, img in enumerate(row):
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            grid[y : y + h, x : x + w] = img
    return grid


def caption_columns(grid: np.ndarray, captions: list[str], column_width: int,
                    pad: int = 2) -> np.ndarray:  # fmt: skip
    """`grid` (from image_grid, columns `column_width` wide) with a white band below in
    which each column's caption is written, wrapped to the column (at most 3 lines)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    line_h, max_lines = 13, 3
    wrapped = [_wrap(c, font, column_width - 2, max_lines) for c in captions]
    band_h = pad + line_h * max(len(w) for w in wrapped) + pad
    out = Image.new("RGB", (grid.shape[1], grid.shape[0] + band_h), "white")
    out.paste(Image.fromarray(grid), (0, 0))
    draw = ImageDraw.Draw(out)
    for i, lines in enumerate(wrapped):
        x = pad + i * (column_width + pad)
        for j, line in enumerate(lines):
            draw.text((x + 1, grid.shape[0] + j * line_h), line, fill=(20, 20, 20), font=font)
    return np.asarray(out)


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Words of `text` in lines no wider than `width` pixels; the last line kept gets an
    ellipsis where words are left over."""
    lines, line = [], ""
    for word in text.split() or [""]:
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1] + " …"
    while lines and font.getlength(lines[-1]) > width and len(lines[-1]) > 1:  # one long word
        lines[-1] = lines[-1][:-2] + "…"
    return lines


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
