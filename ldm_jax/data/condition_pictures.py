"""Conditions drawn as pictures, for the sample grids beside what was sampled from them.

- a class map: one colour per class (class 0, the background of digit_scenes and the
  'other' of ADE20K, is black), a fixed palette so a class has the same colour everywhere;
- a layout: each box outlined in its class's colour on black, its label written inside.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ldm_jax.data.layouts import Layout


def palette(num_classes: int) -> np.ndarray:
    """uint8 [num_classes, 3]: black for class 0, then well-spread bright colours."""
    rng = np.random.default_rng(7)
    hues = (np.arange(num_classes) * 0.618034) % 1.0  # golden-ratio steps on the hue circle
    colours = [_hsv(h, 0.75, 0.6 + 0.4 * rng.random()) for h in hues]
    colours[0] = (0, 0, 0)
    return np.asarray(colours, np.uint8)


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(r * 255), int(g * 255), int(b * 255)


def class_map(ids, num_classes: int) -> np.ndarray:
    """int [..., H, W] class ids -> uint8 [..., H, W, 3]."""
    ids = np.clip(np.asarray(ids, np.int64), 0, num_classes - 1)
    return palette(num_classes)[ids]


def layout(lay: Layout, size: int, num_classes: int, class_names=()) -> np.ndarray:
    """uint8 [size, size, 3]: the layout's boxes on black, labelled."""
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    colours = palette(num_classes + 1)[1:]  # no black outlines
    for label, box in zip(lay.labels, lay.boxes):
        x0, y0, x1, y1 = (float(v) * size for v in box)
        colour = tuple(int(c) for c in colours[int(label) % num_classes])
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour)
        name = class_names[int(label)] if len(class_names) > int(label) else str(int(label))
        draw.text((x0 + 2, y0 + 1), str(name), fill=colour)
    return np.asarray(image)
