"""TFDS builder `photo_crops`: 64x64 random crops of the photos bundled with scikit-image
and scikit-learn, split by source photo so test crops come from photos never trained on.

Built offline with no TensorFlow (PNG bytes encoded with PIL, array_record output).
"""

import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ldm_jax.data.builders.base import ProjectBuilder, png_bytes

IMAGE_SIZE = 64
MIN_CROP = 64
MAX_CROP = 256
CROPS_PER_TRAIN_PHOTO = 600
CROPS_PER_TEST_PHOTO = 200
SEED = 20220101
# Crops flatter than this (pixel std over 0..255) are redrawn: retina's black surround and
# the empty sky of hubble_deep_field would otherwise give many constant images.
MIN_STD = 4.0
_MAX_TRIES = 50
_THREADS = min(8, os.cpu_count() or 1)

# Photos that load offline (scikit-image ships them in the wheel; no pooch download).
# `skimage.data.cat` is the same photo as `chelsea`, so only one of them is used.
TRAIN_PHOTOS = (
    "astronaut",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle",
    "china",
    "camera",
    "moon",
    "coins",
    "grass",
    "gravel",
    "brick",
)
TEST_PHOTOS = ("chelsea", "coffee", "flower")  # colour photos held out from training


def load_photo(name: str) -> np.ndarray:
    """Returns the named photo as uint8 [H, W, 3] (greys replicated to RGB)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else None
        if image is None:
            image = getattr(skimage.data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    assert image.dtype == np.uint8 and image.shape[2] == 3, (name, image.shape, image.dtype)
    return image


def crop_boxes(shape, count: int, rng: np.random.Generator, photo=None) -> list:
    """Draws `count` square boxes (top, left, side), side uniform in [64, min(256, h, w)].

    With `photo` given, boxes flatter than MIN_STD are redrawn (checked on a 4x-strided
    view, which is cheap and plenty to spot a constant region).
    """
    h, w = shape[:2]
    max_side = min(MAX_CROP, h, w)
    boxes = []
    for _ in range(count):
        for _ in range(_MAX_TRIES):
            side = int(rng.integers(MIN_CROP, max_side + 1))
            top = int(rng.integers(0, h - side + 1))
            left = int(rng.integers(0, w - side + 1))
            view = (
                photo[top : top + side : 4, left : left + side : 4] if photo is not None else None
            )
            if view is None or view.std() >= MIN_STD:
                break
        boxes.append((top, left, side))
    return boxes


def crop_to_png(photo: np.ndarray, box) -> bytes:
    top, left, side = box
    pil = Image.fromarray(np.ascontiguousarray(photo[top : top + side, left : left + side]))
    # PIL widens the bicubic kernel when shrinking, i.e. this resize is antialiased.
    pil = pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    # Level 1: 2x faster than the default for 3% larger files on these crops.
    return png_bytes(pil, compress_level=1)


class PhotoCrops(ProjectBuilder):
    """Random-scale 64x64 crops of real photographs, split by source photo."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Random crops (side uniform in [64, min(256, photo side)], resized to 64x64 "
                "antialiased bicubic) of real photographs bundled with scikit-image "
                "(skimage.data: astronaut, rocket, hubble_deep_field, immunohistochemistry, "
                "retina, stereo_motorcycle left view, camera, moon, coins, grass, gravel, "
                "brick, chelsea, coffee) and scikit-learn (load_sample_images: china.jpg, "
                "flower.jpg). Grey photos are replicated to RGB. The split is by source photo: "
                f"train uses {', '.join(TRAIN_PHOTOS)} ({CROPS_PER_TRAIN_PHOTO} crops each); "
                f"test uses {', '.join(TEST_PHOTOS)} ({CROPS_PER_TEST_PHOTO} crops each). "
                "See the scikit-image and scikit-learn documentation for each photo's source "
                "and licence."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                    "source": tfds.features.Text(),
                }
            ),
            homepage="https://scikit-image.org/docs/stable/api/skimage.data.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the photos ship with scikit-image / scikit-learn
        return {
            "train": self._generate_examples(TRAIN_PHOTOS, CROPS_PER_TRAIN_PHOTO),
            "test": self._generate_examples(TEST_PHOTOS, CROPS_PER_TEST_PHOTO),
        }

    def _generate_examples(self, photos, count):
        for name in photos:
            # Seeded by the photo's name, so adding a photo leaves the others' crops unchanged.
            rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
            photo = load_photo(name)
            boxes = crop_boxes(photo.shape, count, rng, photo)
            # PIL releases the GIL in resize and PNG encoding; map keeps the order.
            with ThreadPoolExecutor(_THREADS) as pool:
                pngs = list(pool.map(lambda box, p=photo: crop_to_png(p, box), boxes))
            for i, png in enumerate(pngs):
                yield f"{name}_{i:04d}", {"image": png, "source": name}
