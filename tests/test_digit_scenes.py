"""The `digit_scenes` builder: scene invariants, split hygiene and a small offline build."""

import itertools
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import SMALL_SCENES as SMALL
from sklearn.datasets import load_digits

from ldm_jax.data import open_source
from ldm_jax.data.builders import digit_scenes as ds
from ldm_jax.data.builders.digits import digit_grey, split_indices


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return data.images, data.target


def _pixels(box):
    """Box in [0, 1] -> integer pixel bounds (x0, y0, x1, y1), checking they are exact."""
    px = np.asarray(box, np.float64) * ds.IMAGE_SIZE
    np.testing.assert_array_equal(px, np.rint(px))
    return tuple(int(v) for v in np.rint(px))


def _check_scene(scene, images, labels):
    n = len(scene.labels)
    assert 1 <= n <= ds.MAX_OBJECTS
    assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
    assert scene.class_map.shape == scene.instance_map.shape == (64, 64)
    assert scene.boxes.shape == scene.ink_boxes.shape == (n, 4)
    assert scene.boxes.dtype == scene.ink_boxes.dtype == np.float32
    assert scene.labels.dtype == scene.sources.dtype == np.int64
    np.testing.assert_array_equal(scene.labels, labels[scene.sources])
    grey = scene.image[..., 0]
    assert (scene.image == grey[..., None]).all()
    for boxes in (scene.boxes, scene.ink_boxes):
        assert (boxes >= 0).all() and (boxes <= 1).all()
        assert (boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 1] < boxes[:, 3]).all()
    frames = [_pixels(b) for b in scene.boxes]
    for a, b in itertools.combinations(frames, 2):
        assert ds.overlap_fraction(a, b) <= ds.MAX_OVERLAP
    # The image is the max of the pasted digits; nothing outside the frames.
    expected = np.zeros((64, 64), np.uint8)
    for k, (x0, y0, x1, y1) in enumerate(frames):
        assert x1 - x0 == y1 - y0 and ds.MIN_DIGIT <= x1 - x0 <= ds.MAX_DIGIT
        patch = digit_grey(images[scene.sources[k]], x1 - x0)
        np.maximum(expected[y0:y1, x0:x1], patch, out=expected[y0:y1, x0:x1])
        # The ink box is the tight box of the pasted digit's ink, inside its frame.
        rows, cols = np.nonzero(patch >= ds.INK_THRESHOLD)
        ink = (x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1, y0 + rows.max() + 1)
        assert _pixels(scene.ink_boxes[k]) == ink
        assert x0 <= ink[0] and y0 <= ink[1] and ink[2] <= x1 and ink[3] <= y1
    np.testing.assert_array_equal(grey, expected)
    # Maps: background exactly off-ink; each object's pixels inside its ink box, of its class.
    np.testing.assert_array_equal(scene.class_map > 0, scene.instance_map > 0)
    np.testing.assert_array_equal(scene.class_map > 0, grey >= ds.INK_THRESHOLD)
    assert set(np.unique(scene.instance_map)) <= set(range(n + 1))
    assert set(np.unique(scene.class_map)) <= {ds.BACKGROUND, *(scene.labels + 1)}
    for k in range(n):
        mine = scene.instance_map == k + 1
        assert mine.any()
        assert (scene.class_map[mine] == scene.labels[k] + 1).all()
        x0, y0, x1, y1 = _pixels(scene.ink_boxes[k])
        inside = np.zeros_like(mine)
        inside[y0:y1, x0:x1] = True
        assert not (mine & ~inside).any()
        alone = all(ds.overlap_fraction(frames[k], f) == 0 for j, f in enumerate(frames) if j != k)
        if alone:  # nothing drawn over it: the map's ink spans exactly the ink box
            rows, cols = np.nonzero(mine)
            assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (x0, y0, x1, y1)


def test_overlap_fraction():
    assert ds.overlap_fraction((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching
    assert ds.overlap_fraction((0, 0, 10, 10), (5, 0, 15, 10)) == 0.5
    assert ds.overlap_fraction((0, 0, 20, 20), (0, 0, 10, 10)) == 1.0  # contained: 1, IoU 0.25


def test_make_scene_is_deterministic_per_seed(digits):
    images, labels = digits
    a, b = (ds.make_scene(np.random.default_rng(7), images, labels) for _ in range(2))
    c = ds.make_scene(np.random.default_rng(8), images, labels)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.image, c.image)
    # split_scene seeds by (split, index) alone.
    s1, s2 = (ds.split_scene("train", 5, images, labels) for _ in range(2))
    for x, y in zip(s1, s2):
        np.testing.assert_array_equal(x, y)


def test_scenes_are_well_formed(digits):
    images, labels = digits
    counts = np.zeros(ds.MAX_OBJECTS + 1, int)
    for i in range(300):
        scene = ds.make_scene(np.random.default_rng(i), images, labels)
        _check_scene(scene, images, labels)
        counts[len(scene.labels)] += 1
    assert counts[0] == 0 and (counts[1:] > 40).all()  # uniform over 1..4


def test_splits_paste_only_their_own_digits(digits):
    images, labels = digits
    idx = split_indices(labels)
    for split in ("train", "test"):
        used = set()
        for i in range(150):
            scene = ds.split_scene(split, i, images, labels)
            np.testing.assert_array_equal(scene.labels, labels[scene.sources])
            used |= set(scene.sources.tolist())
            _check_scene(scene, images, labels)  # sources index load_digits() here
        assert used <= set(idx[split].tolist()), split
    assert not set(idx["train"]) & set(idx["test"])
    # Different splits draw different scenes from the same index.
    a, b = (ds.split_scene(s, 0, images, labels) for s in ("train", "test"))
    assert not np.array_equal(a.image, b.image)


def test_build_reads_back_the_scenes(scenes_dir, digits):
    images, labels = digits
    for split, count in SMALL.items():
        src = open_source("digit_scenes", split, scenes_dir)
        assert len(src) == count
        for i in range(count):
            ex, scene = src[i], ds.split_scene(split, i, images, labels)
            np.testing.assert_array_equal(ex["image"], scene.image)
            np.testing.assert_array_equal(ex["segmentation"], scene.class_map[..., None])
            np.testing.assert_array_equal(ex["instances"], scene.instance_map[..., None])
            assert ex["num_objects"] == len(scene.labels)
            obj = ex["objects"]
            assert obj["bbox"].dtype == np.float32 and obj["label"].dtype == np.int64
            np.testing.assert_array_equal(obj["bbox"], scene.boxes)
            np.testing.assert_array_equal(obj["ink_bbox"], scene.ink_boxes)
            np.testing.assert_array_equal(obj["label"], scene.labels)
            np.testing.assert_array_equal(obj["source"], scene.sources)
    # tfds' own entry point reads the registered builder too, with no TensorFlow.
    raw = tfds.data_source("digit_scenes", split="test", data_dir=scenes_dir, download=False)
    assert raw[0]["segmentation"].dtype == np.uint8
    assert "tensorflow" not in sys.modules
