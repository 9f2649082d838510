"""Do samples of digit scenes show what their condition asked for? (digit_scenes only)

Both checks read a sample as the digits builder draws scenes: grey ink (>= INK_THRESHOLD
of 255) on black, digits classified by the digits SVM.
- layout-to-image, per requested box: the box's crop classified (`box_accuracy`), and the
  IoU of the box with the ink found for it (`box_iou`: the tight box of the sample's ink
  components that lie mostly inside the box; no such ink gives 0).
- semantic synthesis: the IoU of the sample's ink with the map's foreground
  (`foreground_iou`, per image), and per connected region of each digit class in the map
  (at least MIN_REGION pixels; smaller ones are slivers where two digits' ink meet) its
  bounding box's crop classified (`region_accuracy`).

A crop is normalised as the classifier's training digits are: the crop is padded to a
square (centred, black), resized to 8x8 by area averaging and put on sklearn's 0..16
scale. The classifier is trained on the `digits` train split's images after the same
steps: each 8x8 digit upsampled as the scenes paste it (digits.digit_grey, 32 px), cut to
its ink box, normalised. So a real scene's digit and a training digit reach the SVM
alike; the figures on the real held-out scenes (the `real/` keys) are the ceiling.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from ldm_jax.data.builders import digit_scenes
from ldm_jax.data.layouts import Layout

INK_THRESHOLD = digit_scenes.INK_THRESHOLD
MIN_REGION = 16  # pixels: smaller connected regions of a class map are not scored
PATCH_SIDE = 32  # the side digits are upsampled to before their ink box is cut


def grey(images) -> np.ndarray:
    """[N, H, W, 3] floats in [-1, 1] or uint8 -> [N, H, W] grey on 0..255."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return x.astype(np.float32).mean(axis=-1)
    return (x.astype(np.float32).mean(axis=-1) + 1.0) * 127.5


def ink(images) -> np.ndarray:
    return grey(images) >= INK_THRESHOLD


def patch_features(grey_image: np.ndarray, box_px) -> np.ndarray:
    """[64] features of a crop (x0, y0, x1, y1 pixels, exclusive) of a grey image."""
    x0, y0, x1, y1 = box_px
    crop = np.asarray(grey_image[y0:y1, x0:x1], np.float32)
    h, w = crop.shape
    side = max(h, w, 1)
    square = np.zeros((side, side), np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = crop
    small = Image.fromarray(square, mode="F").resize((8, 8), Image.Resampling.BOX)
    return np.asarray(small, np.float32).reshape(64) / 255.0 * 16.0


def ink_box(mask: np.ndarray):
    """(x0, y0, x1, y1) pixels of a boolean mask's True pixels, or None."""
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return None
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def box_iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _pixels(box, size: int):
    x0, y0, x1, y1 = (int(round(float(v) * size)) for v in box)
    return max(x0, 0), max(y0, 0), min(max(x1, x0 + 1), size), min(max(y1, y0 + 1), size)


class SceneClassifier:
    """The digits SVM on normalised ink crops (see the module docstring)."""

    def __init__(self, data_dir=None):
        from sklearn.svm import SVC

        from ldm_jax.data.builders.digits import digit_grey
        from ldm_jax.evaluation import digits_classifier

        def normalised(images8):
            rows = []
            for digit in images8:
                big = digit_grey(digit, PATCH_SIDE).astype(np.float32)
                box = ink_box(big >= INK_THRESHOLD) or (0, 0, PATCH_SIDE, PATCH_SIDE)
                rows.append(patch_features(big, box))
            return np.stack(rows)

        train, test = _digits8("train", data_dir), _digits8("test", data_dir)
        self.svc = SVC(**digits_classifier.SVC_SETTINGS).fit(normalised(train[0]), train[1])
        self.real_test_accuracy = float(np.mean(self.svc.predict(normalised(test[0])) == test[1]))

    def predict(self, features: np.ndarray) -> np.ndarray:
        if not len(features):
            return np.zeros((0,), np.int64)
        return self.svc.predict(np.asarray(features))


def _digits8(split: str, data_dir):
    """The digits split's 8x8 images (0..16) and labels, as the scenes' builder uses."""
    from sklearn.datasets import load_digits

    from ldm_jax.data.builders.digits import split_indices

    data = load_digits()
    idx = split_indices(data.target)[split]
    return data.images[idx], data.target[idx]


@functools.cache
def classifier() -> SceneClassifier:
    return SceneClassifier()


def layout_scores(images, layouts, clf: SceneClassifier) -> np.ndarray:
    """float64 [N, 3] per image: (boxes classified right, their IoU sum, boxes)."""
    g = grey(images)
    size = g.shape[1]
    out = np.zeros((len(g), 3), np.float64)
    for i, layout in enumerate(layouts):
        layout = layout if layout is not None else Layout.empty()
        feats, ious = [], []
        for box in layout.boxes:
            px = _pixels(box, size)
            feats.append(patch_features(g[i], px))
            ious.append(_found_iou(g[i] >= INK_THRESHOLD, px))
        if feats:
            right = clf.predict(np.stack(feats)) == np.asarray(layout.labels)
            out[i] = (right.sum(), sum(ious), len(feats))
    return out


def _found_iou(drawn: np.ndarray, px) -> float:
    """IoU of a requested box (pixels) with the ink found for it: the tight box of the
    sample's ink components (8-connected, over the whole image) that lie mostly (over
    half their pixels) inside the box. A digit reaching out of its box still counts
    whole; a neighbour's ink, or ink spread everywhere (one component across the
    image), does not."""
    from scipy import ndimage

    labelled, _ = ndimage.label(drawn, structure=np.ones((3, 3), bool))
    inside = labelled[px[1] : px[3], px[0] : px[2]]
    ids, inside_counts = np.unique(inside[inside > 0], return_counts=True)
    if not len(ids):
        return 0.0
    totals = np.bincount(labelled.ravel())[ids]
    kept = ids[inside_counts * 2 > totals]
    found = ink_box(np.isin(labelled, kept))
    return 0.0 if found is None else box_iou(px, found)


def regions(class_map: np.ndarray):
    """[(digit, (x0, y0, x1, y1))] of the map's connected regions of each digit class
    (4-connected, at least MIN_REGION pixels)."""
    from scipy import ndimage

    found = []
    for cls in np.unique(class_map):
        if cls == digit_scenes.BACKGROUND:
            continue
        labelled, n = ndimage.label(class_map == cls)
        for k, sl in enumerate(ndimage.find_objects(labelled), start=1):
            if sl is not None and (labelled[sl] == k).sum() >= MIN_REGION:
                found.append((int(cls) - 1, (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)))
    return found


def semantic_scores(images, class_maps, clf: SceneClassifier) -> np.ndarray:
    """float64 [N, 3] per image: (foreground IoU, regions classified right, regions)."""
    g = grey(images)
    out = np.zeros((len(g), 3), np.float64)
    for i, class_map in enumerate(np.asarray(class_maps)):
        fg, drawn = class_map != digit_scenes.BACKGROUND, g[i] >= INK_THRESHOLD
        union = (fg | drawn).sum()
        iou = (fg & drawn).sum() / union if union else 1.0
        found = regions(class_map)
        right = 0
        if found:
            feats = np.stack([patch_features(g[i], box) for _, box in found])
            right = int((clf.predict(feats) == np.array([d for d, _ in found])).sum())
        out[i] = (iou, right, len(found))
    return out
