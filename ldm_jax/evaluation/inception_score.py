"""The Inception Score, streamed and combined exactly across processes.

IS = exp(E_x KL(p(y|x) || p(y))), computed on each of `splits` consecutive chunks of the
samples (by their global sample id) and reported as the mean and standard deviation over
chunks, as the reference code does (10 splits). Per chunk the KL mean is

    (1/n) sum_x sum_y p(y|x) log p(y|x)  -  sum_y p(y) log p(y),   p(y) = (1/n) sum_x p(y|x),

so each chunk needs only the count, the sum of p(y|x) and the sum of negative entropies:
float64 sums that add over batches and hosts like the FID statistics do.
"""

from __future__ import annotations

import numpy as np


def _softmax64(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class ScoreStats:
    def __init__(self, num_classes: int, num_samples: int, splits: int = 10):
        if not 1 <= splits <= num_samples:
            raise ValueError(f"splits={splits} must be in [1, num_samples={num_samples}]")
        self.num_classes, self.num_samples, self.splits = num_classes, num_samples, splits
        self.count = np.zeros(splits, np.float64)
        self.prob_sum = np.zeros((splits, num_classes), np.float64)
        self.neg_entropy = np.zeros(splits, np.float64)

    def update(self, logits, sample_ids, mask=None, *, probs: bool = False) -> ScoreStats:
        """Adds samples with global ids `sample_ids` (those where `mask` is true) given
        their logits [b, K] (or probabilities, with `probs`)."""
        p = np.asarray(logits, np.float64) if probs else _softmax64(logits)
        ids = np.asarray(sample_ids, np.int64)
        if mask is not None:
            keep = np.asarray(mask, bool)
            p, ids = p[keep], ids[keep]
        chunk = ids * self.splits // self.num_samples  # consecutive chunks of the id order
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=1)
        np.add.at(self.count, chunk, 1.0)
        np.add.at(self.prob_sum, chunk, p)
        np.add.at(self.neg_entropy, chunk, plogp)
        return self

    def all_processes(self) -> ScoreStats:
        """Every process's samples together (call on all processes)."""
        import jax

        if jax.process_count() == 1:
            return self
        from jax.experimental import multihost_utils

        packed = np.concatenate([self.count, self.prob_sum.ravel(), self.neg_entropy])
        gathered = multihost_utils.process_allgather(packed.view(np.uint8))  # float64 bytes
        total = np.asarray(gathered).reshape(jax.process_count(), -1).view(np.float64).sum(0)
        out = ScoreStats(self.num_classes, self.num_samples, self.splits)
        k = self.splits
        out.count = total[:k]
        out.prob_sum = total[k : k + k * self.num_classes].reshape(k, self.num_classes)
        out.neg_entropy = total[k + k * self.num_classes :]
        return out

    def score(self) -> tuple[float, float]:
        """(mean, std) of exp(KL) over the splits."""
        if np.any(self.count == 0):
            raise ValueError("an Inception Score split holds no samples")
        marginal = self.prob_sum / self.count[:, None]
        log_m = np.log(np.where(marginal > 0, marginal, 1.0))
        kl = self.neg_entropy / self.count - (marginal * log_m).sum(axis=1)
        scores = np.exp(kl)
        return float(scores.mean()), float(scores.std())
