"""The project's TFDS builders; importing this package registers them with TFDS."""

from ldm_jax.data.builders.digit_scenes import DigitScenes
from ldm_jax.data.builders.digits import Digits
from ldm_jax.data.builders.photo_crops import PhotoCrops

BUILDERS = {Digits.name: Digits, PhotoCrops.name: PhotoCrops, DigitScenes.name: DigitScenes}

__all__ = ["BUILDERS", "DigitScenes", "Digits", "PhotoCrops"]
