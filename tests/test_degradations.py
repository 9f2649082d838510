"""The super-resolution conditions: deterministic per seed, the right size, kernels equal
to their closed forms, and the BSR degradation's drawn parameters within the reference's
ranges at its probabilities (distributions, not pixels: the reference draws from Python's
and NumPy's global generators)."""

import numpy as np
import pytest
from skimage import data

from ldm_jax.data import degradations as deg


@pytest.fixture(scope="module")
def photo():
    return data.astronaut()[100:164, 180:244]  # a real 64x64 RGB crop, uint8


def test_same_seed_same_image_other_seed_other_image(photo):
    a = deg.bsr_light(photo, 4, np.random.default_rng(3))
    b = deg.bsr_light(photo, 4, np.random.default_rng(3))
    c = deg.bsr_light(photo, 4, np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and np.any(a != c)


@pytest.mark.parametrize("factor", [2, 4])
def test_low_res_is_the_image_over_the_factor(photo, factor):
    for seed in range(40):
        out = deg.bsr_light(photo, factor, np.random.default_rng(seed))
        assert out.shape == (64 // factor, 64 // factor, 3)
    assert deg.bicubic(photo, factor).shape == (64 // factor, 64 // factor, 3)
    with pytest.raises(ValueError, match="multiple of the factor"):
        deg.bsr_light(photo[:62], 4, np.random.default_rng(0))


def test_bicubic_keeps_the_colours(photo):
    low = deg.bicubic(photo, 4).astype(np.float64)
    np.testing.assert_allclose(low.mean((0, 1)), photo.mean((0, 1)), atol=2.0)


def test_kernels_equal_their_closed_forms():
    x = np.arange(7) - 3.0
    g = np.exp(-(x**2) / (2 * 1.3**2))
    np.testing.assert_allclose(deg.gaussian_kernel(7, 1.3), np.outer(g, g) / np.outer(g, g).sum())
    # equal eigenvalues: the isotropic Gaussian of variance l
    np.testing.assert_allclose(deg.anisotropic_kernel(7, 0.7, 1.69, 1.69),
                               deg.gaussian_kernel(7, 1.3), atol=1e-12)  # fmt: skip
    # a wide window: the kernel's second moments are its covariance, rotated by theta
    theta, l1, l2 = 0.4, 4.0, 1.0
    k = deg.anisotropic_kernel(41, theta, l1, l2)
    off = np.arange(41) - 20.0
    xx, yy = np.meshgrid(off, off)
    moments = np.array([[np.sum(k * xx * xx), np.sum(k * xx * yy)],
                        [np.sum(k * xx * yy), np.sum(k * yy * yy)]])  # fmt: skip
    v = np.array([np.cos(theta), np.sin(theta)])
    basis = np.array([[v[0], v[1]], [v[1], -v[0]]])
    np.testing.assert_allclose(moments, basis @ np.diag([l1, l2]) @ basis.T, atol=1e-6)


def test_shifted_kernel_moves_its_centre_by_half_the_factor_minus_one():
    k = deg.shift_kernel(deg.gaussian_kernel(25, 1.5), 4)
    idx = np.arange(25)
    centre = (np.sum(k.sum(1) * idx) / k.sum(), np.sum(k.sum(0) * idx) / k.sum())
    np.testing.assert_allclose(centre, (12 - 1.5, 12 - 1.5), atol=1e-6)


def _records(photo, factor, n):
    records = []
    for seed in range(n):
        record = []
        deg.bsr_light(photo, factor, np.random.default_rng(seed), record)
        records.append(record)
    return records


def _share(hits, n, p):
    """hits of n within 4 binomial standard deviations of n * p."""
    return abs(hits - n * p) <= 4 * np.sqrt(n * p * (1 - p)) + 1


def test_bsr_parameters_stay_in_the_reference_ranges_at_its_rates(photo):
    n = 400
    records = _records(photo, 4, n)
    flat = [r for record in records for r in record]
    of = lambda step: [r for r in flat if r["step"] == step]  # noqa: E731
    assert _share(sum(any(r["step"] == "halve" for r in rec) for rec in records), n, 0.25)
    blurs = of("blur")
    assert len(blurs) == n  # one blur per image
    aniso = [b for b in blurs if b["kind"] == "anisotropic"]
    assert _share(len(aniso), n, 0.5)
    for b in aniso:
        wide = (4 + b["factor"]) / 4
        assert 5 <= b["size"] <= 14 and 0 <= b["l1"] < wide and 0 <= b["l2"] < wide
        assert 0 <= b["theta"] < np.pi
    for b in blurs:
        if b["kind"] == "isotropic":
            assert 5 <= b["size"] <= 7 and 0 <= b["sigma"] < (2 + 0.2 * b["factor"]) / 4
    scales, kernels = of("downscale_scale"), of("downscale_blur")
    assert len(scales) + len(kernels) == n and _share(len(scales), n, 0.8)
    assert all(1 <= s["scale"] <= 2 * s["factor"] for s in scales)
    assert all(0.1 <= k["sigma"] <= 0.6 * k["factor"] for k in kernels)
    assert {s["factor"] for s in scales} == {2, 4}  # halved first or not
    noise = of("noise")
    assert len(noise) == n and {x["level"] for x in noise} == {1, 2}
    kinds = [x["kind"] for x in noise]
    for kind, p in (("colour", 0.4), ("grey", 0.4), ("correlated", 0.2)):
        assert _share(kinds.count(kind), n, p), kind
    qualities = [j["quality"] for j in of("jpeg")]
    assert min(qualities) == 80 and max(qualities) == 95
    assert _share(len(qualities) - n, n, 0.9)  # the middle JPEG at 0.9, the final always
    resizes = of("resize") + of("downscale") + of("halve")
    interps = [r["interpolation"] for r in resizes if r["interpolation"] != "antialiased_bicubic"]
    assert set(interps) == {0, 1, 2}
