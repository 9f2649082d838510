"""Large inpainting masks: deterministic per seed, within the coverage range, made of
both strokes and boxes, and the masked image zero exactly where the mask is."""

import numpy as np
import pytest

from ldm_jax.data import masks


def test_same_seed_same_mask():
    a = masks.large_mask(64, np.random.default_rng(5))
    b = masks.large_mask(64, np.random.default_rng(5))
    c = masks.large_mask(64, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == bool and a.shape == (64, 64) and np.any(a != c)


@pytest.mark.parametrize("coverage", [(0.1, 0.5), (0.3, 0.35), (0.05, 0.1)])
def test_coverage_stays_in_its_range_and_spreads_over_it(coverage):
    low, high = coverage
    drawn = [masks.large_mask(64, np.random.default_rng(s), coverage) for s in range(200)]
    shares = np.array([m.mean() for m in drawn])
    assert shares.min() >= low - 1 / 64**2 and shares.max() <= high
    counts, edges = masks.coverage_histogram(drawn, bins=20)
    assert counts.sum() == 200 and edges[0] == 0.0 and edges[-1] == 1.0
    if high - low >= 0.2:  # a wide range is used across, not at one end
        # Drawing stops at the first shape past a uniform target, so shares lean high.
        assert shares.min() < low + 0.2 * (high - low)
        assert np.quantile(shares, 0.25) < low + 0.5 * (high - low)
        assert np.quantile(shares, 0.75) > low + 0.6 * (high - low)


def test_masks_hold_strokes_and_boxes():
    # A box is a filled axis-aligned rectangle: its mask equals its bounding box.
    def is_box(m):
        ys, xs = np.nonzero(m)
        return m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].all()

    drawn = [masks.large_mask(64, np.random.default_rng(s), (0.05, 0.08)) for s in range(60)]
    kinds = {is_box(m) for m in drawn}
    assert kinds == {True, False}


def test_masked_image_is_black_inside_the_mask_only():
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (32, 32, 3)).astype(np.float32)
    mask = masks.large_mask(32, rng)
    out = masks.masked_image(image, mask)
    assert np.all(out[mask] == -1.0)
    np.testing.assert_array_equal(out[~mask], image[~mask])
    with pytest.raises(ValueError, match="coverage"):
        masks.large_mask(32, rng, (0.5, 0.2))
