"""TFDS builder `digit_scenes`: 1 to 4 scikit-learn digits pasted on a black 64x64 canvas,
with the per-pixel class map, the instance map and each digit's box and label.

For semantic synthesis (class map -> image) and layout-to-image (boxes -> image). The
train split pastes only the `digits` train split's images, the test split only its test
images (`digits.split_indices`), so the digits classifier never saw a test scene's digits.

Conventions (also in the dataset's description):
- `segmentation` class ids: 0 = background, digit d is class d + 1 (1..10). A pixel is a
  digit's when that digit's pasted grey value is >= INK_THRESHOLD; where two digits' ink
  meet, the brighter one (the one the max-composited image shows) gets the pixel.
- `instances`: 0 = background, object k (0-based, in `objects` order) is k + 1, same rule.
- Boxes are float32 (x0, y0, x1, y1) in [0, 1] of the canvas side, x1 and y1 exclusive
  (pixel column c is inside when x0 * 64 <= c < x1 * 64). Note the order is NOT TFDS's
  BBoxFeature order (ymin, xmin, ymax, xmax): these are plain Tensors.
  `objects/bbox` is the pasted square frame of the 8x8 digit (cropping it and resizing to
  32x32 gives what the digits classifier was trained on); `objects/ink_bbox` is the tight
  box of the digit's ink (its pixels >= INK_THRESHOLD).
- Frames are whole inside the canvas and any two overlap by at most MAX_OVERLAP of the
  smaller frame's area (intersection / min area, which bounds their IoU too).

Scene i of a split is a pure function of (split, i): `scene_rng` seeds it, `make_scene`
draws it, so a smaller build is a prefix of the full one. Built offline with no
TensorFlow (PNG via PIL, array_record output), like the other builders.
"""

import zlib
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ldm_jax.data.builders.base import ProjectBuilder, png_bytes
from ldm_jax.data.builders.digits import digit_grey, split_indices

IMAGE_SIZE = 64
MIN_DIGIT, MAX_DIGIT = 16, 32  # side of a pasted digit's square frame, uniform, pixels
MAX_OBJECTS = 4  # objects per scene uniform in 1..MAX_OBJECTS
MAX_OVERLAP = 0.1  # intersection / smaller frame area, for any two frames
INK_THRESHOLD = 128  # pasted grey value (0..255) from which a pixel is the digit's ink
BACKGROUND = 0  # class id of the background; digit d is class d + 1
NUM_CLASSES = 11
# Scenes per split; tests shrink these (scene i does not depend on the count).
NUM_SCENES = {"train": 6000, "test": 1000}
SEED = 20220114
_MAX_TRIES = 100  # placements tried per object before the scene's layout is redrawn
_MAX_LAYOUTS = 100


class Scene(NamedTuple):
    image: np.ndarray  # uint8 [S, S, 3], grey replicated
    class_map: np.ndarray  # uint8 [S, S]: 0 background, digit + 1
    instance_map: np.ndarray  # uint8 [S, S]: 0 background, object index + 1
    boxes: np.ndarray  # float32 [n, 4] frames (x0, y0, x1, y1) in [0, 1], x1/y1 exclusive
    ink_boxes: np.ndarray  # float32 [n, 4] tight ink boxes, same convention
    labels: np.ndarray  # int64 [n] digits 0..9
    sources: np.ndarray  # int64 [n] indices into the `images` passed to make_scene


def scene_rng(split: str, index: int) -> np.random.Generator:
    """The generator scene `index` of `split` is drawn with."""
    return np.random.default_rng([SEED, zlib.crc32(split.encode()), index])


def overlap_fraction(a, b) -> float:
    """Intersection of boxes (x0, y0, x1, y1) over the smaller one's area (>= their IoU)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return float(w * h / smaller)


def _layout(rng, n, size, min_digit, max_digit, max_overlap) -> list:
    """n square frames (x0, y0, x1, y1) in pixels, inside the canvas, overlaps bounded."""
    for _ in range(_MAX_LAYOUTS):
        frames = []
        for _ in range(n):
            for _ in range(_MAX_TRIES):
                side = int(rng.integers(min_digit, max_digit + 1))
                x0 = int(rng.integers(0, size - side + 1))
                y0 = int(rng.integers(0, size - side + 1))
                frame = (x0, y0, x0 + side, y0 + side)
                if all(overlap_fraction(frame, f) <= max_overlap for f in frames):
                    frames.append(frame)
                    break
            else:
                break  # no room left for this object: redraw the whole layout
        if len(frames) == n:
            return frames
    raise RuntimeError(f"could not place {n} digits of {min_digit}..{max_digit} px")


def make_scene(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    size: int = IMAGE_SIZE,
    max_objects: int = MAX_OBJECTS,
    min_digit: int = MIN_DIGIT,
    max_digit: int = MAX_DIGIT,
    max_overlap: float = MAX_OVERLAP,
) -> Scene:
    """Draws one scene from the 8x8 digits `images` (0..16) with labels `labels`.

    Draws the object count (uniform 1..max_objects), the frames (side uniform in
    min_digit..max_digit, position uniform, redrawn while a frame overlaps an earlier one
    by more than max_overlap), then each frame's digit (uniform over `images`); pastes the
    bicubic-upsampled digits by max onto a black canvas.
    """
    n = int(rng.integers(1, max_objects + 1))
    frames = _layout(rng, n, size, min_digit, max_digit, max_overlap)
    sources = rng.integers(0, len(images), n).astype(np.int64)
    canvas = np.zeros((size, size), np.uint8)
    class_map = np.zeros((size, size), np.uint8)
    instance_map = np.zeros((size, size), np.uint8)
    ink_boxes = np.zeros((n, 4), np.float32)
    for k, ((x0, y0, x1, y1), src) in enumerate(zip(frames, sources)):
        patch = digit_grey(images[src], x1 - x0)
        region = canvas[y0:y1, x0:x1]
        # Ink that shows: at least the threshold and brighter than what is already there.
        mine = (patch >= INK_THRESHOLD) & (patch > region)
        class_map[y0:y1, x0:x1][mine] = int(labels[src]) + 1
        instance_map[y0:y1, x0:x1][mine] = k + 1
        np.maximum(region, patch, out=region)
        rows, cols = np.nonzero(patch >= INK_THRESHOLD)
        if len(rows) == 0:  # never for sklearn's digits; keep the box well formed
            rows = cols = np.array([0, x1 - x0 - 1])
        ink_boxes[k] = (x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1, y0 + rows.max() + 1)
    return Scene(
        image=np.repeat(canvas[:, :, None], 3, axis=2),
        class_map=class_map,
        instance_map=instance_map,
        boxes=np.asarray(frames, np.float32) / size,
        ink_boxes=ink_boxes / size,
        labels=np.asarray(labels, np.int64)[sources],
        sources=sources,
    )


def split_scene(split: str, index: int, images, targets, indices=None) -> Scene:
    """Scene `index` of `split` as stored: drawn from that split's digits only, with
    `sources` mapped back to indices into sklearn's load_digits() (`images`, `targets`).
    `indices`: that split's `split_indices`, when the caller has them already."""
    idx = split_indices(targets)[split] if indices is None else indices
    scene = make_scene(scene_rng(split, index), images[idx], targets[idx])
    return scene._replace(sources=idx[scene.sources].astype(np.int64))


class DigitScenes(ProjectBuilder):
    """Scenes of 1-4 handwritten digits on 64x64, with class/instance maps and boxes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"Scenes of 1 to {MAX_OBJECTS} of scikit-learn's handwritten 8x8 digits, each "
                f"upsampled bicubically to a square of {MIN_DIGIT}..{MAX_DIGIT} px and pasted "
                f"(pixel-wise max) at a random position on a black {IMAGE_SIZE}x{IMAGE_SIZE} "
                "canvas, grey replicated to RGB. Any two digits' frames overlap by at most "
                f"{MAX_OVERLAP:g} of the smaller one's area. `segmentation`: per-pixel class, "
                "0 = background and digit d = d + 1, on pixels where the digit's pasted grey "
                f"value is >= {INK_THRESHOLD} (the brighter digit wins where two meet); "
                "`instances`: 0 = background, object k = k + 1. `objects/bbox`: the pasted "
                "frame, `objects/ink_bbox`: the tight box of its ink, both float32 (x0, y0, "
                "x1, y1) in [0, 1] with x1, y1 exclusive (not TFDS's ymin-first BBox order); "
                "`objects/label`: the digit (int64 0..9); `objects/source`: its index in "
                "sklearn.datasets.load_digits. The train split pastes only the `digits` "
                "train split's images and the test split only its test images. "
                f"{NUM_SCENES['train']} train and {NUM_SCENES['test']} test scenes, seeded, "
                "in scene order."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                    "segmentation": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
                    "instances": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
                    "num_objects": tfds.features.Tensor(shape=(), dtype=np.int64),
                    # Tensors with a free first axis read back as numpy arrays ([n, 4], [n]);
                    # a tfds Sequence would read back as lists of per-object arrays.
                    "objects": tfds.features.FeaturesDict(
                        {
                            "bbox": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
                            "ink_bbox": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
                            "label": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                            "source": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                        }
                    ),
                }
            ),
            homepage="https://archive.ics.uci.edu/dataset/80",
            # Records stay in scene order (record i is scene i); scenes are i.i.d. anyway.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the digits ship with scikit-learn
        from sklearn.datasets import load_digits

        data = load_digits()
        return {
            split: self._generate_examples(split, count, data.images, data.target)
            for split, count in NUM_SCENES.items()
        }

    def _generate_examples(self, split, count, images, targets):
        indices = split_indices(targets)[split]
        for i in range(count):
            scene = split_scene(split, i, images, targets, indices)
            yield (
                i,
                {
                    "image": png_bytes(Image.fromarray(scene.image), compress_level=1),
                    "segmentation": png_bytes(Image.fromarray(scene.class_map), 1),
                    "instances": png_bytes(Image.fromarray(scene.instance_map), 1),
                    "num_objects": len(scene.labels),
                    "objects": {
                        "bbox": scene.boxes,
                        "ink_bbox": scene.ink_boxes,
                        "label": scene.labels,
                        "source": scene.sources,
                    },
                },
            )
