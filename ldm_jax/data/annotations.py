"""Spatial annotations that travel with an example's image through resize, crop and flip.

The pipeline draws one `Geometry` per example (the resize of data.resize, the crop's
offset, the flip) and applies it to everything spatial the example carries:
- the image (bicubic resize, as transforms.resize_smaller_side);
- a segmentation map of class ids (nearest-neighbour resize, never blended), for
  data.condition.kind = 'semantic';
- objects, boxes with labels (ldm_jax.data.layouts.Layout), for layout models: each box
  is mapped into the crop's [0, 1] frame and clipped to it, and an object is kept while at
  least MIN_VISIBLE of its area stays inside the crop.
The draws (crop top, crop left, flip) are the ones transforms.random_crop / random_flip
make, in that order, so images come out as they did before annotations existed.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ldm_jax.data import transforms
from ldm_jax.data.layouts import Layout

MIN_VISIBLE = 0.25  # share of a box's area inside the crop for the object to be kept


def objects_config() -> dict:
    """`data.objects`: where a dataset keeps its boxes and their labels (read when it has
    both features). box_format 'yxyx' is TFDS's BBoxFeature (COCO's `objects/bbox`);
    'xyxy' is (x0, y0, x1, y1), digit_scenes' order."""
    return {"bbox_key": "objects/bbox", "label_key": "objects/label", "box_format": "yxyx"}


class Geometry(NamedTuple):
    source_hw: tuple[int, int]  # the stored image's size
    resized_hw: tuple[int, int]  # after data.resize
    top: int
    left: int
    size: int  # the crop's side: data.image_size
    flip: bool

    def image(self, image: np.ndarray) -> np.ndarray:
        image = transforms.as_rgb(image)
        if self.resized_hw != self.source_hw:
            image = transforms.resize_smaller_side(image, min(self.resized_hw))
        return self._crop(image)

    def label_map(self, labels: np.ndarray) -> np.ndarray:
        """[H, W] (or [H, W, C]: channel 0) class ids -> [size, size] uint8/int as stored."""
        labels = np.asarray(labels)
        if labels.ndim == 3:
            labels = labels[..., 0]
        labels = transforms.resize_nearest(labels, *self.resized_hw)
        return self._crop(labels)

    def _crop(self, array: np.ndarray) -> np.ndarray:
        out = array[self.top : self.top + self.size, self.left : self.left + self.size]
        return np.ascontiguousarray(out[:, ::-1] if self.flip else out)

    def layout(self, layout: Layout) -> Layout:
        """Boxes (x0, y0, x1, y1) in [0, 1] of the stored image -> of the crop."""
        if not len(layout):
            return layout
        (h, w), s = self.resized_hw, float(self.size)
        b = np.asarray(layout.boxes, np.float64)
        x = (b[:, [0, 2]] * w - self.left) / s
        y = (b[:, [1, 3]] * h - self.top) / s
        area = (x[:, 1] - x[:, 0]) * (y[:, 1] - y[:, 0])
        x, y = np.clip(x, 0.0, 1.0), np.clip(y, 0.0, 1.0)
        inside = (x[:, 1] - x[:, 0]) * (y[:, 1] - y[:, 0])
        keep = (inside > 0) & (inside >= MIN_VISIBLE * np.maximum(area, 1e-12))
        if self.flip:
            x = 1.0 - x[:, ::-1]
        boxes = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1).astype(np.float32)
        return Layout(np.asarray(layout.labels)[keep], boxes[keep])


def plan(height: int, width: int, s, train: bool, rng) -> Geometry:
    """The geometry of an example of height x width under the data settings `s`
    (image_size, resize, crop, flip); `rng` draws the random crop and flip of training."""
    resized = (height, width)
    if s.resize is not None:
        resized = transforms.resized_shape(height, width, s.resize)
    h, w, size = *resized, s.image_size
    if train and s.crop == "random":
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    else:
        top, left = (h - size) // 2, (w - size) // 2
    flip = bool(train and s.flip and rng.random() < 0.5)
    return Geometry((height, width), resized, top, left, size, flip)
