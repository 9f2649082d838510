"""PSNR / SSIM against scikit-image and closed forms."""

import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldm_jax.evaluation.image_metrics import gaussian_window, psnr, ssim


def _batch(seed, shape=(3, 24, 20, 3), noise=0.3):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=shape)
    y = np.clip(x + noise * rng.normal(size=shape), -1, 1)
    return x.astype(np.float32), y.astype(np.float32)


def test_psnr_matches_skimage_and_closed_form():
    x, y = _batch(0)
    got = np.asarray(psnr(x, y))
    want = [peak_signal_noise_ratio(a.astype(np.float64), b.astype(np.float64), data_range=2.0)
            for a, b in zip(x, y)]  # fmt: skip
    assert got.shape == (3,)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # Constant offset c on range R: PSNR = 10 log10(R^2 / c^2).
    z = np.zeros((2, 8, 8, 3), np.float32)
    np.testing.assert_allclose(psnr(z, z + 0.1), [20 * math.log10(2.0 / 0.1)] * 2, rtol=1e-5)
    np.testing.assert_allclose(psnr(z, z + 0.1, data_range=1.0), [20.0] * 2, rtol=1e-5)


def test_gaussian_window_is_skimage_11_tap():
    w = gaussian_window(1.5)
    assert w.shape == (11,) and abs(w.sum() - 1) < 1e-6 and w.argmax() == 5


@pytest.mark.parametrize("shape,noise,data_range", [((3, 24, 20, 3), 0.3, 2.0),
                                                    ((2, 11, 16, 1), 0.05, 2.0),
                                                    ((2, 32, 32, 3), 0.1, 4.0)])  # fmt: skip
def test_ssim_matches_skimage(shape, noise, data_range):
    x, y = _batch(1, shape, noise)
    got = np.asarray(ssim(x, y, data_range=data_range))
    want = [
        structural_similarity(
            a.astype(np.float64), b.astype(np.float64), channel_axis=-1, gaussian_weights=True,
            sigma=1.5, use_sample_covariance=False, data_range=data_range,
        )
        for a, b in zip(x, y)
    ]  # fmt: skip
    assert got.shape == (shape[0],)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_ssim_closed_forms():
    x, _ = _batch(2, (2, 16, 16, 3))
    np.testing.assert_allclose(ssim(x, x), [1.0, 1.0], atol=1e-5)
    # Two constant images a, b: variances vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.5, -0.25, (0.01 * 2.0) ** 2
    xa = np.full((1, 12, 12, 3), a, np.float32)
    xb = np.full((1, 12, 12, 3), b, np.float32)
    np.testing.assert_allclose(ssim(xa, xb), [(2 * a * b + c1) / (a * a + b * b + c1)], rtol=1e-4)
    with pytest.raises(ValueError, match="11"):
        ssim(x[:, :10], x[:, :10])
