"""Feature statistics and the Frechet distance: closed forms, the reference formula,
streaming, masking, and the exact combination of two real processes."""

import json

import numpy as np
import pytest
import scipy.linalg
from toy import run_launched

from ldm_jax.evaluation.frechet import FeatureStats, fid_from_stats, frechet_distance


def _reference_fd(mu1, s1, mu2, s2, eps=1e-6):
    """The formula as pytorch-fid writes it: scipy's general sqrtm of S1 S2, an eps
    offset if it is singular, the real part."""
    diff = mu1 - mu2
    covmean, _ = scipy.linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset).dot(s2 + offset))
    covmean = covmean.real
    return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def _random_stats(rng, d):
    a = rng.standard_normal((d, d))
    return rng.standard_normal(d), a @ a.T / d + 0.1 * np.eye(d)


def test_equals_the_reference_formula_on_random_statistics():
    rng = np.random.default_rng(0)
    for d in (8, 64, 256):
        (m1, s1), (m2, s2) = _random_stats(rng, d), _random_stats(rng, d)
        want = _reference_fd(m1, s1, m2, s2)
        assert frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-6)


def test_closed_forms():
    rng = np.random.default_rng(1)
    d = 16
    mu = rng.standard_normal(d)
    # Diagonal covariances: sum (sqrt(a) - sqrt(b))^2 plus the squared mean distance.
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    want = np.sum((mu - 1.0) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu, np.diag(a), np.ones(d), np.diag(b)) == pytest.approx(want, 1e-10)
    # Same distribution: 0, even with a singular covariance (fewer samples than dims).
    x = rng.standard_normal((10, 32))
    stats = FeatureStats(32).update(x)
    scale = np.trace(stats.mean_cov()[1])  # square roots of ~1e-16 eigenvalues remain
    assert abs(fid_from_stats(stats, stats)) < 1e-7 * scale


def test_streaming_with_masks_equals_numpy_on_all_rows():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((103, 12)) * 3 + 1
    stats = FeatureStats(12)
    for i in range(0, 103, 16):
        chunk = x[i : i + 16]
        padded = np.concatenate([chunk, np.full((16 - len(chunk), 12), 1e6)])  # padding
        stats.update(padded, mask=np.arange(16) < len(chunk))
    mu, cov = stats.mean_cov()
    assert stats.count == 103
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    halves = FeatureStats(12).update(x[:50]).merge(FeatureStats(12).update(x[50:]))
    np.testing.assert_allclose(halves.mean_cov()[1], cov, rtol=1e-12)


def test_save_and_load_keep_sums_and_provenance(tmp_path):
    x = np.random.default_rng(3).standard_normal((20, 5))
    stats = FeatureStats(5).update(x)
    path = stats.save(tmp_path / "ref.npz", {"dataset": "digits", "split": "train"})
    loaded, prov = FeatureStats.load(path)
    assert prov == {"dataset": "digits", "split": "train"} and loaded.count == 20
    np.testing.assert_array_equal(loaded.outer, stats.outer)
    with np.load(path) as data:  # what pytorch-fid's .npz readers expect
        np.testing.assert_allclose(data["sigma"], np.cov(x, rowvar=False), rtol=1e-12)


@pytest.mark.slow  # a job of 2 processes
def test_two_processes_combine_exactly(tmp_path):
    """Each of 2 processes streams its half (different sizes, one with padding); the
    combined statistics equal one process's over all rows in float64 (to the rounding of
    a different summation order), padding excluded."""
    out = tmp_path / "stats.json"
    run_launched(2, 1, "tests.mp_stats_worker", str(out))
    got = json.loads(out.read_text())
    x = np.random.default_rng(7).standard_normal((37, 6)) * 1e3 + 1e-3
    want = FeatureStats(6).update(x)
    assert got["count"] == 37
    np.testing.assert_allclose(got["sum"], want.sum, rtol=1e-13)
    np.testing.assert_allclose(got["outer"], want.outer, rtol=1e-13)
