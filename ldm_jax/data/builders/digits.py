"""TFDS builder `digits`: scikit-learn's 1,797 handwritten 8x8 digits at 32x32 RGB.

Built offline with no TensorFlow: images are PNG-encoded here with PIL (tfds' own
numpy-array encoder runs a TensorFlow graph), records are written as array_record.
"""

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ldm_jax.data.builders.base import ProjectBuilder, png_bytes

IMAGE_SIZE = 32
CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Caption template for example i is TEMPLATES[i % 3]; every one names the class word.
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {word} written by hand",
    "a picture of {article} {word}",
)
# Stratified split: within each class, ranks r with r % 20 >= 17 go to test (15%).
_TEST_PERIOD, _TEST_FROM = 20, 17


def caption_for(index: int, label: int) -> str:
    word = CLASS_NAMES[label]
    article = "an" if word == "eight" else "a"  # by sound: "a one", "an eight"
    return CAPTION_TEMPLATES[index % len(CAPTION_TEMPLATES)].format(word=word, article=article)


def split_indices(targets: np.ndarray) -> dict[str, np.ndarray]:
    """Deterministic stratified ~85/15 split by example index."""
    is_test = np.zeros(len(targets), bool)
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)  # ascending, so ranks follow the index order
        is_test[idx] = np.arange(len(idx)) % _TEST_PERIOD >= _TEST_FROM
    return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


def digit_grey(image_8x8: np.ndarray, side: int) -> np.ndarray:
    """0..16 float 8x8 -> uint8 [side, side] grey (scaled to 0..255, bicubic upsampling)."""
    grey = np.clip(np.rint(image_8x8 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grey).resize((side, side), Image.Resampling.BICUBIC))


def digit_image(image_8x8: np.ndarray) -> np.ndarray:
    """0..16 float 8x8 -> uint8 [32, 32, 3] (bicubic upsampling, grey replicated)."""
    return np.repeat(digit_grey(image_8x8, IMAGE_SIZE)[:, :, None], 3, axis=2)


class Digits(ProjectBuilder):
    """Handwritten digits (UCI optdigits test set via scikit-learn), 32x32 RGB, captioned."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "The 1,797 handwritten 8x8 digits (values 0..16) bundled with scikit-learn "
                "(sklearn.datasets.load_digits, a copy of the UCI optdigits test set), "
                "upsampled bicubically to 32x32, scaled to 0..255 and replicated to RGB. "
                "Each has a class label and a templated caption naming the digit. Splits are "
                "a deterministic, per-class 85/15 split by example index."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                    "caption": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with scikit-learn
        from sklearn.datasets import load_digits

        data = load_digits()
        splits = split_indices(data.target)
        return {
            name: self._generate_examples(data.images, data.target, idx)
            for name, idx in splits.items()
        }

    def _generate_examples(self, images, targets, indices):
        for i in indices:
            label = int(targets[i])
            yield (
                int(i),
                {
                    "image": png_bytes(Image.fromarray(digit_image(images[i]))),
                    "label": label,
                    "caption": caption_for(int(i), label),
                },
            )
