"""The quickstart's off-manifold share: real digits are on it, colour noise and shifted
colours are off it."""

import numpy as np
import pytest

from ldm_jax.evaluation.digits_classifier import DigitsClassifier, _load


@pytest.fixture(scope="module")
def clf(data_dir):
    return DigitsClassifier(data_dir)


def test_real_digits_are_on_the_manifold_and_noise_is_off(clf, data_dir):
    assert clf.real_off_manifold_share <= 0.05
    test_images, _ = _load("test", data_dir)
    assert clf.off_manifold_share(test_images) <= 0.05
    rng = np.random.default_rng(0)
    noise = rng.uniform(-1, 1, (40, 32, 32, 3)).astype(np.float32)
    assert clf.off_manifold_share(noise) == 1.0
    # the same digits with their ink tinted red: the classifier may still read them
    tinted = test_images[:40].copy()
    tinted[..., 1:] = -1.0
    assert clf.off_manifold_share(tinted) >= 0.9
    mixed = np.concatenate([test_images[:30], noise[:10]])
    assert clf.off_manifold_share(mixed) == pytest.approx(0.25, abs=0.05)
