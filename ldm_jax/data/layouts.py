"""Layouts: labelled boxes as a token sequence, the condition of layout-to-image models.

A layout is a list of objects, each a class id and a box (x0, y0, x1, y1) in [0, 1] of
the image side (x to the right, y down, x0 < x1, y0 < y1). As the paper's layout model
does, it enters the UNet through a transformer over tokens, with no text tokenizer:

    object k -> 3 tokens   [class id, corner(x0, y0), corner(x1, y1)]
    corner(x, y)           = round(y * (G - 1)) * G + round(x * (G - 1)), on a G x G grid,
                             G = floor(sqrt(vocab_size - 1)) (90 for the reference's 8192)
    the sequence           objects in the given order, then PAD = vocab_size - 1 up to
                           3 * max_objects tokens; the empty layout is all PAD (the
                           unconditional input of classifier-free guidance)

Class ids and corners share the id range (the transformer's positions tell them apart);
ids must stay below PAD. The embedding table starts random as the reference's, or with
`cond.corner_init='fourier'` with each corner's grid point as Fourier features
(`corner_features`), so that where a corner is need not be learnt token by token. A corner decodes to the grid point it names, so a box comes back
within half a grid cell, 0.5 / (G - 1), on each coordinate. Objects beyond max_objects
are dropped (`truncated` counts them; the caller warns).
"""

from __future__ import annotations

import json
import math
from typing import NamedTuple

import numpy as np

from ldm_jax import storage
from ldm_jax.errors import UserError

TOKENS_PER_OBJECT = 3


class Layout(NamedTuple):
    labels: np.ndarray  # int [n]
    boxes: np.ndarray  # float32 [n, 4] (x0, y0, x1, y1) in [0, 1]

    @staticmethod
    def empty() -> Layout:
        return Layout(np.zeros((0,), np.int64), np.zeros((0, 4), np.float32))

    def __len__(self) -> int:
        return len(self.labels)


class TokenLayout(NamedTuple):
    """The token scheme of one run: `vocab_size` ids, up to `max_objects` objects."""

    vocab_size: int
    max_objects: int

    @property
    def grid(self) -> int:
        return math.isqrt(self.vocab_size - 1)

    @property
    def pad(self) -> int:
        return self.vocab_size - 1

    @property
    def length(self) -> int:
        return TOKENS_PER_OBJECT * self.max_objects

    def check(self, n_classes: int) -> None:
        if self.grid < 2:
            raise UserError(f"cond.vocab_size={self.vocab_size} is too small for a corner grid.")
        if n_classes > self.pad:
            raise UserError(
                f"cond.n_classes={n_classes} does not fit below the pad token {self.pad}; "
                "raise cond.vocab_size."
            )

    def corner_features(self, dim: int) -> np.ndarray:
        """float32 [G * G, dim]: each corner token's grid point (x, y) as Fourier features,
        sin and cos of pi * f * (2x - 1) and of pi * f * (2y - 1) for f = 1, 2, 4, ...,
        filling the first 4 * n columns (n frequencies up to half the grid); the rest 0.
        An embedding table started from these knows where its corners are."""
        g = self.grid
        ids = np.arange(g * g)
        x, y = (ids % g) / (g - 1) * 2 - 1, (ids // g) / (g - 1) * 2 - 1
        n = min(dim // 4, max(1, int(np.log2(g))))
        freqs = np.pi * 2.0 ** np.arange(n)
        parts = [f(v[:, None] * freqs) for v in (x, y) for f in (np.sin, np.cos)]
        out = np.zeros((g * g, dim), np.float32)
        out[:, : 4 * n] = np.concatenate(parts, axis=1)
        return out

    def corner(self, x, y) -> np.ndarray:
        g = self.grid
        xi = np.rint(np.clip(x, 0.0, 1.0) * (g - 1)).astype(np.int64)
        yi = np.rint(np.clip(y, 0.0, 1.0) * (g - 1)).astype(np.int64)
        return yi * g + xi

    def encode(self, layout: Layout) -> tuple[np.ndarray, int]:
        """(int32 tokens [length], how many objects were dropped past max_objects)."""
        n = min(len(layout), self.max_objects)
        tokens = np.full((self.length,), self.pad, np.int32)
        boxes = np.asarray(layout.boxes, np.float64)[:n]
        per_object = np.stack(
            [
                np.asarray(layout.labels[:n], np.int64),
                self.corner(boxes[:, 0], boxes[:, 1]),
                self.corner(boxes[:, 2], boxes[:, 3]),
            ],
            axis=1,
        )  # [n, 3]
        tokens[: TOKENS_PER_OBJECT * n] = per_object.reshape(-1)
        return tokens, len(layout) - n

    def decode(self, tokens) -> Layout:
        """The layout a token sequence names (objects up to the first PAD class token)."""
        tokens = np.asarray(tokens, np.int64).reshape(-1, TOKENS_PER_OBJECT)
        real = tokens[:, 0] != self.pad
        n = int(np.argmin(real)) if not real.all() else len(real)
        tokens, g = tokens[:n], self.grid
        corners = [(t % g / (g - 1), t // g / (g - 1)) for t in (tokens[:, 1], tokens[:, 2])]
        boxes = np.stack([corners[0][0], corners[0][1], corners[1][0], corners[1][1]], axis=1)
        return Layout(tokens[:, 0], boxes.astype(np.float32))


# ------------------------------------------------------------------ from the data


def from_example(labels, boxes, box_format: str) -> Layout:
    """A dataset example's objects: `box_format` 'xyxy' (x0, y0, x1, y1) or 'yxyx' (TFDS's
    BBoxFeature: ymin, xmin, ymax, xmax), both normalised to [0, 1]."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if box_format == "yxyx":
        boxes = boxes[:, [1, 0, 3, 2]]
    elif box_format != "xyxy":
        raise UserError(f"data.objects.box_format={box_format!r}; valid: 'xyxy', 'yxyx'.")
    return Layout(np.asarray(labels, np.int64).reshape(-1), boxes)


# ------------------------------------------------------------- from the command line


def _label_id(value, class_names) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    text = str(value).strip()
    if class_names and text in class_names:
        return list(class_names).index(text)
    try:
        return int(text)
    except ValueError:
        names = f" or one of {list(class_names)}" if class_names else ""
        raise UserError(f"layout label {text!r} is not a class id{names}.") from None


def _checked(labels, boxes, n_classes: int, where: str) -> Layout:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int64).reshape(-1)
    for label, box in zip(labels, boxes):
        if not 0 <= label < n_classes:
            raise UserError(f"{where}: class {label} is out of range: ids are 0..{n_classes - 1}.")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise UserError(
                f"{where}: box {[x0, y0, x1, y1]} is not x0 < x1, y0 < y1 inside [0, 1]."
            )
    return Layout(labels, boxes)


def parse_text(text: str, n_classes: int, class_names=()) -> Layout:
    """'LABEL:x0,y0,x1,y1;LABEL:...' (LABEL a class id or name; '' is the empty layout)."""
    labels, boxes = [], []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        label, sep, coords = part.rpartition(":")
        try:
            box = [float(v) for v in coords.split(",")]
        except ValueError:
            box = []
        if not sep or len(box) != 4:
            raise UserError(
                f"--layout object {part!r}: write LABEL:x0,y0,x1,y1 (coordinates in [0, 1]), "
                "objects separated by ';'."
            )
        labels.append(_label_id(label, class_names))
        boxes.append(box)
    return _checked(labels, boxes, n_classes, f"--layout {text!r}")


def read_json(path, n_classes: int, class_names=()) -> list[Layout]:
    """A JSON file of layouts: a list of layouts, each a list of
    {"label": id or name, "box": [x0, y0, x1, y1]} (one layout alone is accepted too)."""
    path = storage.path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--layout {path}: cannot read it as JSON ({e}).") from None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = [data]
    if not isinstance(data, list):  # a bare object, a number, null: no layouts
        data = [data]  # so the message below names it
    layouts = []
    for i, objects in enumerate(data):
        try:
            if not isinstance(objects, list):
                raise TypeError(objects)
            labels = [_label_id(o["label"], class_names) for o in objects]
            boxes = [[float(v) for v in o["box"]] for o in objects]
            if any(len(box) != 4 for box in boxes):  # else _checked's reshape pairs wrongly
                raise ValueError(boxes)
        except (KeyError, TypeError, ValueError):
            raise UserError(
                f"--layout {path}: layout {i} must be a list of "
                '{"label": ..., "box": [x0, y0, x1, y1]}.'
            ) from None
        layouts.append(_checked(labels, boxes, n_classes, f"--layout {path}, layout {i}"))
    return layouts


def parse(value: str, n_classes: int, class_names=()) -> list[Layout]:
    """One --layout value: a .json file (several layouts) or one layout as text."""
    if value.endswith(".json"):
        return read_json(value, n_classes, class_names)
    return [parse_text(value, n_classes, class_names)]


def to_json(layout: Layout, class_names=()) -> list[dict]:
    names = list(class_names)
    return [
        {"label": names[int(c)] if names else int(c), "box": [round(float(v), 4) for v in b]}
        for c, b in zip(layout.labels, layout.boxes)
    ]
