"""Improved precision and recall (k-nearest-neighbour manifolds in feature space).

Each set's manifold is the union of balls around its points, each ball's radius the
distance to the point's k-th nearest neighbour within the set (the point itself not
counted). Precision: the fraction of generated samples inside the real manifold (quality);
recall: the fraction of real samples inside the generated manifold (coverage). The
reference setting is k = 3 on Inception pool3 features.
"""

from __future__ import annotations

import numpy as np


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [len(a), len(b)], in float64."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def knn_radii(x: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """Squared distance of each row of x to its k-th nearest other row."""
    if not 1 <= k < len(x):
        raise ValueError(f"k={k} needs at least k + 1 = {k + 1} samples, have {len(x)}")
    out = np.empty(len(x))
    for i in range(0, len(x), block):
        d = _sq_dists(x[i : i + block], x)
        # The k+1-th smallest includes the point itself at distance 0.
        out[i : i + block] = np.partition(d, k, axis=1)[:, k]
    return out


def coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block=1024) -> float:
    """Fraction of `points` within radius of at least one centre."""
    inside = 0
    for i in range(0, len(points), block):
        d = _sq_dists(points[i : i + block], centres)
        inside += int(np.any(d <= radii[None, :], axis=1).sum())
    return inside / len(points)


def precision_recall(real, fake, k: int = 3) -> dict[str, float]:
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    return {
        "precision": coverage(fake, real, knn_radii(real, k)),
        "recall": coverage(real, fake, knn_radii(fake, k)),
    }
