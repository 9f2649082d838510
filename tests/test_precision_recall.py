"""k-NN precision and recall: closed forms and a brute-force reference."""

import numpy as np
import pytest

from ldm_jax.evaluation.precision_recall import knn_radii, precision_recall


def brute_force(real, fake, k):
    def radii(x):
        return [sorted(np.linalg.norm(x - p, axis=1))[k] for p in x]

    def inside(points, centres, r):
        return np.mean(
            [any(np.linalg.norm(c - p) <= rc for c, rc in zip(centres, r)) for p in points]
        )

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_closed_forms():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    # real radii (k=1) are all 1: 0.5 is inside, 10 is not; fake radius is 9.5 for both,
    # so every real point is covered.
    assert precision_recall(real, fake, k=1) == {"precision": 0.5, "recall": 1.0}
    x = np.random.default_rng(0).normal(size=(30, 4))
    assert precision_recall(x, x.copy(), k=3) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(x, x + 100.0, k=3) == {"precision": 0.0, "recall": 0.0}


def test_equals_brute_force_in_blocks():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(57, 6)), rng.normal(0.3, 1.3, size=(45, 6))
    got = precision_recall(real, fake, k=3)
    want = brute_force(real, fake, 3)
    assert (got["precision"], got["recall"]) == pytest.approx(want, abs=1e-12)
    np.testing.assert_allclose(knn_radii(real, 3, block=8), knn_radii(real, 3), rtol=1e-12)


def test_too_few_samples():
    with pytest.raises(ValueError, match="k=3 needs at least"):
        knn_radii(np.zeros((3, 2)), 3)
