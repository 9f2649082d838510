"""Layouts and class maps read from datasets with real TFDS feature specs.

Two tiny datasets are built offline (array_record, no TensorFlow) with EXACTLY the
FeaturesDicts of TFDS's own builders, under those builders' names, so that a config a
user writes for a prepared dataset (`data.name='coco/2017'`, `'scene_parse150'`) reads
them through `tfds.data_source`-style random access:
- `coco/2017` (tensorflow_datasets/object_detection/coco.py, config 2017, v1.1.0): image
  (jpeg), image/filename, image/id, objects = Sequence({id, area, bbox: BBoxFeature,
  label: ClassLabel(80), is_crowd});
- `scene_parse150` (tensorflow_datasets/datasets/scene_parse150, v1.0.0): image (jpeg),
  annotation (png, 3 channels: ADE20K's instance annotations keep the class id in R and
  the instance in G).
Every expectation below is computed here, independently of ldm_jax.data.annotations:
the stored examples are read with TFDS alone, resized with PIL, cropped and mirrored
with plain slicing, and the box arithmetic is written out.
"""

from __future__ import annotations

import io
import logging
import math
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import read_only_builder

from ldm_jax.data import pipeline
from ldm_jax.data.builders.base import ProjectBuilder, png_bytes
from ldm_jax.data.layouts import Layout
from ldm_jax.errors import UserError

S = 32  # data.image_size
MAX_OBJECTS = 4
MIN_VISIBLE = 0.25  # the documented share of a box that must stay inside the crop
SEED = 3

# ------------------------------------------------------------------------ the data

# COCO: image/id -> (height, width, boxes as TFDS BBox (ymin, xmin, ymax, xmax), labels).
COCO = {
    101: (
        48,
        80,
        [
            (0.20, 0.35, 0.70, 0.60),  # inside every centre crop
            (0.10, 0.10, 0.50, 0.30),  # half out on the left (resize 32), out (None)
            (0.30, 0.75, 0.90, 0.95),  # mostly out on the right (resize 32): dropped
            (0.00, 0.00, 1.00, 0.15),  # outside both centre crops
            (0.05, 0.25, 0.60, 0.50),  # clipped on two sides (resize None)
            (0.30, 0.65, 0.50, 0.95),  # 17% inside (resize None): dropped
        ],
        [1, 2, 3, 4, 5, 6],
    ),
    102: (96, 64, [], []),  # no objects
    103: (  # more objects than MAX_OBJECTS, all inside the centre crops
        64,
        64,
        [
            (0.30, 0.30, 0.40, 0.45),
            (0.35, 0.50, 0.55, 0.70),
            (0.42, 0.31, 0.66, 0.49),
            (0.60, 0.55, 0.70, 0.69),
            (0.31, 0.60, 0.38, 0.68),
            (0.50, 0.40, 0.69, 0.52),
            (0.45, 0.45, 0.55, 0.55),
        ],
        [5, 17, 42, 0, 79, 3, 8],
    ),
    104: (
        96,
        64,
        [
            (0.00, 0.20, 0.30, 0.60),  # 44% inside vertically (resize 32)
            (0.75, 0.10, 0.98, 0.40),  # 36% inside vertically (resize 32)
            (0.80, 0.50, 1.00, 0.90),  # 17% inside (resize 32): dropped
            (0.30, 0.30, 0.50, 0.60),  # clipped at the top (resize None)
        ],
        [10, 20, 30, 40],
    ),
}
# scene_parse150: (height, width, annotation stored as RGB (class, instance, 0) or as a
# single-channel PNG ('L')).
SCENES = [(48, 80, "RGB"), (96, 64, "RGB"), (64, 64, "L")]
NUM_CLASSES = 151  # ADE20K's 150 classes and 0, "other"


def _jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _blocks(rng, h, w, block, high):
    cells = rng.integers(0, high, (-(-h // block), -(-w // block)))
    return cells.repeat(block, 0).repeat(block, 1)[:h, :w]


def _coco_example(image_id, rng):
    h, w, boxes, labels = COCO[image_id]
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    objects = {
        "id": [image_id * 100 + k for k in range(len(boxes))],
        "area": [int(round((b[2] - b[0]) * h * (b[3] - b[1]) * w)) for b in boxes],
        "bbox": [tfds.features.BBox(ymin=b[0], xmin=b[1], ymax=b[2], xmax=b[3]) for b in boxes],
        "label": list(labels),
        "is_crowd": [False] * len(boxes),
    }
    return {
        "image": _jpeg(image),
        "image/filename": f"{image_id:012d}.jpg",
        "image/id": image_id,
        "objects": objects,
    }


def _scene_example(h, w, mode, rng, bad=False):
    classes = _blocks(rng, h, w, 4, NUM_CLASSES)
    classes[:4, :4], classes[4:8, :4] = 0, NUM_CLASSES - 1  # both ends of the id range
    if bad:  # one id past the 151 classes, in a block every crop keeps
        classes[h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4] = NUM_CLASSES
    classes = classes.astype(np.uint8)
    if mode == "RGB":
        instances = _blocks(rng, h, w, 4, 256).astype(np.uint8)
        annotation = Image.fromarray(np.stack([classes, instances, np.zeros_like(classes)], -1))
    else:
        annotation = Image.fromarray(classes, mode="L")
    # The image's red channel is the class id, so image and map can be checked aligned
    # (JPEG at quality 100 without chroma subsampling keeps it within a few levels).
    green, blue = (_blocks(rng, h, w, 8, 256) for _ in range(2))
    image = np.stack([classes, green, blue], -1).astype(np.uint8)
    return {"image": _jpeg(image, quality=100), "annotation": png_bytes(annotation)}


class _Coco(ProjectBuilder, skip_registration=True):
    """coco/2017's features, as tensorflow_datasets/object_detection/coco.py has them."""

    name = "coco"
    VERSION = tfds.core.Version("1.1.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2017", version="1.1.0")]

    def _info(self):
        features = {
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/filename": tfds.features.Text(),
            "image/id": np.int64,
            "objects": tfds.features.Sequence(
                {
                    "id": np.int64,
                    "area": np.int64,
                    "bbox": tfds.features.BBoxFeature(),
                    "label": tfds.features.ClassLabel(num_classes=80),
                    "is_crowd": np.bool_,
                }
            ),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0), "validation": self._generate_examples(1)}

    def _generate_examples(self, seed):
        rng = np.random.default_rng(seed)
        for image_id in COCO:
            yield image_id, _coco_example(image_id, rng)


class _SceneParse150(ProjectBuilder, skip_registration=True):
    """scene_parse150's features (its dataset builder, v1.0.0), plus a split 'bad' whose
    map has an id past the 151 classes."""

    name = "scene_parse150"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "annotation": tfds.features.Image(encoding_format="png"),
                }
            ),
            supervised_keys=("image", "annotation"),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(10),
            "test": self._generate_examples(11),
            "bad": self._generate_examples(12, bad=True),
        }

    def _generate_examples(self, seed, bad=False):
        rng = np.random.default_rng(seed)
        for i, (h, w, mode) in enumerate(SCENES[:1] if bad else SCENES):
            yield f"ADE_{seed}_{i:08d}", _scene_example(h, w, mode, rng, bad)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("prepared"))
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    for builder in (
        _Coco(data_dir=path, config="2017", file_format="array_record"),
        _SceneParse150(data_dir=path, file_format="array_record"),
    ):
        builder.download_and_prepare(download_config=config)
    return path


def _stored(data_dir, name, split):
    """The split's examples as TFDS alone decodes them (no ldm_jax code)."""
    config = {"coco": "2017/1.1.0", "scene_parse150": "1.0.0"}[name]
    builder = read_only_builder.builder_from_directory(f"{data_dir}/{name}/{config}")
    source = builder.as_data_source(split=split)
    return [source[i] for i in range(len(source))]


# -------------------------------------------------------- independent expectations


def _resized_shape(h, w, resize):
    if resize is None or min(h, w) == resize:
        return h, w
    if h <= w:
        return resize, max(resize, round(w * resize / h))
    return max(resize, round(h * resize / w)), resize


def _resized(array, resize, resample):
    h, w = array.shape[:2]
    nh, nw = _resized_shape(h, w, resize)
    if (nh, nw) == (h, w):
        return array
    return np.asarray(Image.fromarray(array).resize((nw, nh), resample))


def _crop(array, top, left, flip):
    out = array[top : top + S, left : left + S]
    return out[:, ::-1] if flip else out


def _expected_layout(example, resized_hw, top, left, flip):
    """(labels, boxes x0, y0, x1, y1, categories) of the stored objects in the crop."""
    h, w = resized_hw
    labels, boxes, kinds = [], [], []
    objects = example["objects"]
    for (ymin, xmin, ymax, xmax), label in zip(objects["bbox"], objects["label"]):
        # pixels of the resized image, then the crop's [0, 1] frame
        x0, x1 = (float(xmin) * w - left) / S, (float(xmax) * w - left) / S
        y0, y1 = (float(ymin) * h - top) / S, (float(ymax) * h - top) / S
        full = (x1 - x0) * (y1 - y0)
        cx0, cx1, cy0, cy1 = (min(max(v, 0.0), 1.0) for v in (x0, x1, y0, y1))
        visible = (cx1 - cx0) * (cy1 - cy0)
        if visible <= 0 or visible < MIN_VISIBLE * full:
            kinds.append("dropped, partly inside" if visible > 0 else "dropped, outside")
            continue
        kinds.append("kept" if math.isclose(visible, full) else "kept, clipped")
        if flip:
            cx0, cx1 = 1.0 - cx1, 1.0 - cx0
        labels.append(int(label))
        boxes.append((cx0, cy0, cx1, cy1))
    return np.array(labels, np.int64), np.array(boxes, np.float64).reshape(-1, 4), kinds


def _check_layout(layout, example, resized_hw, top, left, flip):
    labels, boxes, kinds = _expected_layout(example, resized_hw, top, left, flip)
    assert isinstance(layout, Layout)
    np.testing.assert_array_equal(np.asarray(layout.labels), labels)
    assert np.asarray(layout.boxes).shape == (len(labels), 4)
    np.testing.assert_allclose(np.asarray(layout.boxes, np.float64), boxes, rtol=0, atol=1e-6)
    return kinds


def _as_uint8(image):
    return np.rint((np.asarray(image, np.float64) + 1.0) * 127.5).astype(np.uint8)


def _find_crop(output, candidates, resize):
    """The (candidate index, top, left, flip) whose resized crop the output image is."""
    found = []
    for i, image in enumerate(candidates):
        big = _resized(image, resize, Image.Resampling.BICUBIC)
        h, w = big.shape[:2]
        for top in range(h - S + 1):
            for left in range(w - S + 1):
                for flip in (False, True):
                    if np.array_equal(output, _crop(big, top, left, flip)):
                        found.append((i, top, left, flip))
    assert len(found) == 1, found
    return found[0]


def _expected_map(example, resize, top, left, flip):
    annotation = np.asarray(example["annotation"])
    classes = annotation[..., 0] if annotation.ndim == 3 else annotation  # R: the class
    return _crop(_resized(classes, resize, Image.Resampling.NEAREST), top, left, flip)


def _centre(h, w, resize):
    nh, nw = _resized_shape(h, w, resize)
    return (nh, nw), (nh - S) // 2, (nw - S) // 2


def _coco_cfg(**overrides):
    return pipeline.default_config(
        name="coco/2017", eval_split="validation", image_size=S, num_threads=0, **overrides
    )


def _scene_cfg(data_dir, **overrides):
    cfg = pipeline.default_config(
        name="scene_parse150", data_dir=data_dir, image_size=S, num_threads=0, **overrides
    )
    cfg.condition.kind = "semantic"
    cfg.condition.num_classes = NUM_CLASSES
    cfg.condition.map_key = "annotation"
    return cfg


def _eval_batch(cfg, n):
    batches = list(
        pipeline.eval_batches(cfg, global_batch_size=n, process_index=0, process_count=1)
    )
    assert len(batches) == 1 and batches[0]["mask"].all()
    return batches[0]


# ------------------------------------------------------------------------ COCO


def test_feature_specs_are_tfds_own(data_dir):
    """The prepared datasets carry the real builders' features, read without TensorFlow."""
    coco = read_only_builder.builder_from_directory(f"{data_dir}/coco/2017/1.1.0")
    features = coco.info.features
    assert set(features.keys()) == {"image", "image/filename", "image/id", "objects"}
    assert set(features["objects"].keys()) == {"id", "area", "bbox", "label", "is_crowd"}
    assert isinstance(features["objects"]["bbox"], tfds.features.BBoxFeature)
    assert features["objects"]["label"].num_classes == 80
    assert features["image"].encoding_format == "jpeg"
    assert coco.info.file_format.value == "array_record"
    scenes = read_only_builder.builder_from_directory(f"{data_dir}/scene_parse150/1.0.0")
    assert set(scenes.info.features.keys()) == {"image", "annotation"}
    assert scenes.info.features["annotation"].shape == (None, None, 3)
    assert scenes.info.features["annotation"].encoding_format == "png"
    # Stored boxes come back in BBoxFeature's order (ymin, xmin, ymax, xmax).
    stored = {int(e["image/id"]): e for e in _stored(data_dir, "coco", "validation")}
    np.testing.assert_allclose(stored[101]["objects"]["bbox"], COCO[101][2], atol=1e-6)
    # TFDS decodes a Sequence to lists (of arrays); the image with no objects to [].
    assert len(stored[102]["objects"]["bbox"]) == len(stored[102]["objects"]["label"]) == 0
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("resize", [32, None])
def test_coco_center_crop_layouts(data_dir, resize):
    """eval_batches (centre crop): each box is the stored box through the resize scale
    and the crop offset, clipped to [0, 1]; objects with < 25% inside are dropped; the
    image with no objects gives an empty Layout; the image is cut at the same place."""
    cfg = _coco_cfg(data_dir=data_dir, resize=resize, crop="center", flip=True)
    batch = _eval_batch(cfg, len(COCO))
    stored = _stored(data_dir, "coco", "validation")
    assert batch["image"].shape == (len(COCO), S, S, 3)
    assert batch["layout"].dtype == object and batch["layout"].shape == (len(COCO),)
    kinds = []
    for row, example in enumerate(stored):  # eval row g is example g of the split
        image = np.asarray(example["image"])
        (h, w), top, left = _centre(*image.shape[:2], resize)
        expected = _crop(_resized(image, resize, Image.Resampling.BICUBIC), top, left, False)
        np.testing.assert_array_equal(_as_uint8(batch["image"][row]), expected)
        kinds += _check_layout(batch["layout"][row], example, (h, w), top, left, False)
        if int(example["image/id"]) == 102:
            assert len(batch["layout"][row]) == 0
            assert batch["layout"][row].boxes.shape == (0, 4)
    # The data exercises every case of the rule.
    assert set(kinds) == {"kept", "kept, clipped", "dropped, partly inside", "dropped, outside"}


def test_coco_random_crop_and_flip_layouts(data_dir):
    """TrainIterator (random crop, flip): the crop and flip each row's image shows (found
    by search over all offsets) move and mirror its boxes the same way."""
    cfg = _coco_cfg(data_dir=data_dir, resize=32, crop="random", flip=True)
    it = pipeline.TrainIterator(
        cfg, global_batch_size=4, seed=SEED, process_index=0, process_count=1
    )
    stored = _stored(data_dir, "coco", "train")
    images = [np.asarray(e["image"]) for e in stored]
    geometries, seen = [], set()
    for step in range(3):
        batch = next(it)
        for row in range(4):
            index, top, left, flip = _find_crop(_as_uint8(batch["image"][row]), images, 32)
            shape = _resized_shape(*images[index].shape[:2], 32)
            _check_layout(batch["layout"][row], stored[index], shape, top, left, flip)
            # The documented draws: example rng default_rng([seed, 1, g]) -> top, left, flip.
            g = step * 4 + row
            rng = np.random.default_rng([SEED, 1, g])
            draws = (int(rng.integers(0, shape[0] - S + 1)), int(rng.integers(0, shape[1] - S + 1)))
            assert (top, left, flip) == (*draws, bool(rng.random() < 0.5))
            geometries.append((top, left, flip, len(batch["layout"][row])))
            seen.add(int(stored[index]["image/id"]))
    assert seen == set(COCO)  # three epochs of four examples
    assert {f for _, _, f, _ in geometries} == {False, True}
    assert any(t > 0 for t, _, _, _ in geometries) and any(x > 0 for _, x, _, _ in geometries)
    assert any(f and n for _, _, f, n in geometries)  # mirrored boxes were checked


def _layout_conditioner():
    from ldm_jax.training.conditioner import Conditioner

    cfg = ml_collections.ConfigDict(
        dict(
            kind="layout",
            n_classes=80,
            vocab_size=8192,
            max_objects=MAX_OBJECTS,
            embed_dim=32,
            n_layer=1,
            max_length=12,
            heads=2,
            dim_head=16,
            drop_rate=0.0,
        )
    )
    return Conditioner(cfg, "crossattn")


def _tokens(layout, vocab_size=8192, max_objects=MAX_OBJECTS):
    """The layout token scheme written out: [class, corner(x0, y0), corner(x1, y1)] per
    object on a G x G grid, G = floor(sqrt(vocab - 1)), padded with vocab - 1."""
    g, pad = math.isqrt(vocab_size - 1), vocab_size - 1
    out = [pad] * (3 * max_objects)
    for k, (label, (x0, y0, x1, y1)) in enumerate(zip(layout.labels, layout.boxes)):
        if k == max_objects:
            break
        c0 = round(float(y0) * (g - 1)) * g + round(float(x0) * (g - 1))
        c1 = round(float(y1) * (g - 1)) * g + round(float(x1) * (g - 1))
        out[3 * k : 3 * k + 3] = [int(label), c0, c1]
    return np.array(out, np.int32)


def test_coco_layouts_truncated_with_one_warning(data_dir, caplog):
    """The batch's layouts through a layout Conditioner: 12 tokens each, the 7-object
    example keeps its first 4 objects, the empty one is all padding; one warning in all,
    however many batches are truncated."""
    cfg = _coco_cfg(data_dir=data_dir, resize=32, crop="center")
    batch = _eval_batch(cfg, len(COCO))
    ids = [int(e["image/id"]) for e in _stored(data_dir, "coco", "validation")]
    layouts = {i: batch["layout"][row] for row, i in enumerate(ids)}
    assert len(layouts[103]) == 7 and len(layouts[102]) == 0
    assert all(len(layouts[i]) <= MAX_OBJECTS for i in (101, 104))
    conditioner = _layout_conditioner()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        first = conditioner.host_inputs(batch)["tokens"]
        second = conditioner.host_inputs(batch)["tokens"]
    assert first.shape == (len(COCO), 12) and first.dtype == np.int32
    np.testing.assert_array_equal(first, second)
    for row, i in enumerate(ids):
        np.testing.assert_array_equal(first[row], _tokens(layouts[i]))
    truncated = first[ids.index(103)]
    np.testing.assert_array_equal(truncated[::3], COCO[103][3][:MAX_OBJECTS])
    assert (first[ids.index(102)] == 8191).all()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "max_objects=4" in message and "3 objects dropped" in message


# ---------------------------------------------------------------- scene_parse150


def test_scene_parse150_center_crop_maps(data_dir):
    """eval_batches with resize: `segmentation` int32 [B, S, S] is the stored class ids
    (R channel) resized by PIL NEAREST and cut at the image's crop."""
    batch = _eval_batch(_scene_cfg(data_dir, resize=32, crop="center"), len(SCENES))
    stored = _stored(data_dir, "scene_parse150", "test")
    seg = batch["segmentation"]
    assert seg.shape == (len(SCENES), S, S) and seg.dtype == np.int32
    for row, example in enumerate(stored):
        image = np.asarray(example["image"])
        _, top, left = _centre(*image.shape[:2], 32)
        expected_image = _crop(_resized(image, 32, Image.Resampling.BICUBIC), top, left, False)
        np.testing.assert_array_equal(_as_uint8(batch["image"][row]), expected_image)
        np.testing.assert_array_equal(seg[row], _expected_map(example, 32, top, left, False))
    # Channel 0 was taken, not the instance channel, and no id was blended.
    rgb = [np.asarray(e["annotation"]) for e in stored]
    assert all(a.shape[-1] == 3 for a in rgb)
    assert any((a[..., 1] != a[..., 0]).mean() > 0.5 for a in rgb)
    assert seg.max() == NUM_CLASSES - 1 and seg.min() == 0


def test_scene_parse150_map_aligned_with_image(data_dir):
    """No resize, centre crop: the map is the stored ids cut exactly where the image is
    (the image's red channel is the class id, up to JPEG's few levels)."""
    batch = _eval_batch(_scene_cfg(data_dir, resize=None, crop="center"), len(SCENES))
    stored = _stored(data_dir, "scene_parse150", "test")
    for row, example in enumerate(stored):
        h, w = np.asarray(example["image"]).shape[:2]
        top, left = (h - S) // 2, (w - S) // 2
        seg = batch["segmentation"][row].astype(np.int64)
        np.testing.assert_array_equal(seg, _expected_map(example, None, top, left, False))
        red = _as_uint8(batch["image"][row])[..., 0].astype(np.int64)
        assert np.abs(red - seg).max() <= 4
        # ... which a map one pixel off would not be.
        assert np.abs(red - np.roll(seg, 1, axis=1)).max() > 20
        assert np.abs(red - np.roll(seg, 1, axis=0)).max() > 20


def test_scene_parse150_random_crop_and_flip_maps(data_dir):
    """TrainIterator (resize, random crop, flip): each map is cut and mirrored exactly
    as its image (whose crop is found by search)."""
    cfg = _scene_cfg(data_dir, resize=32, crop="random", flip=True)
    it = pipeline.TrainIterator(
        cfg, global_batch_size=3, seed=SEED, process_index=0, process_count=1
    )
    stored = _stored(data_dir, "scene_parse150", "train")
    images = [np.asarray(e["image"]) for e in stored]
    flips, offsets = set(), set()
    for _ in range(3):
        batch = next(it)
        assert batch["segmentation"].dtype == np.int32
        for row in range(3):
            index, top, left, flip = _find_crop(_as_uint8(batch["image"][row]), images, 32)
            expected = _expected_map(stored[index], 32, top, left, flip)
            np.testing.assert_array_equal(batch["segmentation"][row], expected)
            flips.add(flip)
            offsets.add((top, left))
    assert flips == {False, True} and len(offsets) > 1


def test_scene_parse150_id_past_num_classes(data_dir):
    """A map id >= num_classes is a one-line UserError naming num_classes."""
    cfg = _scene_cfg(data_dir, resize=32, crop="center")
    with pytest.raises(UserError) as info:
        list(
            pipeline.eval_batches(
                cfg, global_batch_size=1, process_index=0, process_count=1, split="bad"
            )
        )
    message = str(info.value)
    assert "num_classes" in message and "151" in message and "\n" not in message
    # The same ids under a smaller num_classes.
    cfg.condition.num_classes = 100
    with pytest.raises(UserError, match="num_classes=100"):
        next(
            pipeline.TrainIterator(
                cfg, global_batch_size=3, seed=0, process_index=0, process_count=1
            )
        )
    assert "tensorflow" not in sys.modules
