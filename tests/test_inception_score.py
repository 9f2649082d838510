"""Inception Score statistics: closed forms, the reference per-split formula, and the
combination of batches in any order."""

import numpy as np
import pytest

from ldm_jax.evaluation.inception_score import ScoreStats


def reference_is(probs: np.ndarray, splits: int) -> tuple[float, float]:
    """The reference computation: consecutive chunks, mean KL to the chunk's marginal."""
    scores = []
    for part in np.array_split(probs, splits):
        py = part.mean(axis=0, keepdims=True)
        kl = np.sum(part * (np.log(part) - np.log(py)), axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def test_closed_forms():
    k = 7
    onehot = np.eye(k)[np.arange(70) % k] * 50.0  # confident, uniform over classes
    mean, std = ScoreStats(k, 70, splits=1).update(onehot, np.arange(70)).score()
    assert mean == pytest.approx(k, rel=1e-12) and std == 0.0
    same = np.tile(np.random.default_rng(0).normal(size=k), (40, 1))  # one prediction
    mean, _ = ScoreStats(k, 40, splits=4).update(same, np.arange(40)).score()
    assert mean == pytest.approx(1.0, abs=1e-12)


def test_equals_the_reference_formula_streamed_in_any_order():
    rng = np.random.default_rng(1)
    n, k, splits = 103, 12, 10
    logits = rng.normal(0, 3, (n, k))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    order = rng.permutation(n)
    stats = ScoreStats(k, n, splits)
    for chunk in np.array_split(order, 9):  # shuffled batches, one padded with junk
        ids = np.concatenate([chunk, [0, 0]])
        rows = np.concatenate([logits[chunk], np.full((2, k), 1e6)])
        stats.update(rows, ids, mask=np.arange(len(ids)) < len(chunk))
    got = stats.score()
    # Chunks are id * splits // n, which differ from np.array_split's when splits does not
    # divide n (test_even_chunks_match_array_split covers the even case).
    chunk_of = np.arange(n) * splits // n
    want = reference_is_by(probs, chunk_of, splits)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[0] > 1.0


def reference_is_by(probs, chunk_of, splits):
    scores = []
    for c in range(splits):
        part = probs[chunk_of == c]
        py = part.mean(axis=0, keepdims=True)
        scores.append(np.exp(np.sum(part * (np.log(part) - np.log(py)), axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def test_even_chunks_match_array_split():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(5), size=50)
    got = ScoreStats(5, 50, 10).update(probs, np.arange(50), probs=True).score()
    np.testing.assert_allclose(got, reference_is(probs, 10), rtol=1e-12)


def test_bad_split_count():
    with pytest.raises(ValueError, match="splits=20"):
        ScoreStats(5, 10, 20)
