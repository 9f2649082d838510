"""Feature statistics streamed over any number of samples and hosts, and the Frechet
distance between two of them (the FID formula).

Statistics are sums, not means: the count, the sum of features and the sum of their
outer products, in float64. Batches add to them (padding rows masked out), processes
combine them exactly by adding the sums of all hosts (not by averaging per-host means),
and only then do they become a mean and an unbiased covariance, as numpy's `np.cov`
(and pytorch-fid) compute them.
"""

from __future__ import annotations

import json

import numpy as np

from ldm_jax import storage


class FeatureStats:
    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self.sum = np.zeros(self.dim, np.float64)
        self.outer = np.zeros((self.dim, self.dim), np.float64)

    def update(self, features, mask=None) -> FeatureStats:
        """Adds rows of `features` [b, dim] (those where `mask` is true, if given)."""
        f = np.asarray(features, np.float64).reshape(-1, self.dim)
        if mask is not None:
            f = f[np.asarray(mask, bool).reshape(-1)]
        self.count += f.shape[0]
        self.sum += f.sum(axis=0)
        self.outer += f.T @ f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
        self.count += other.count
        self.sum += other.sum
        self.outer += other.outer
        return self

    def all_processes(self) -> FeatureStats:
        """The statistics of every process's rows together (call on all processes)."""
        import jax

        if jax.process_count() == 1:
            return self
        from jax.experimental import multihost_utils

        # float64 travels as raw bytes: jax arrays would round it to float32.
        packed = np.concatenate([[float(self.count)], self.sum, self.outer.ravel()])
        gathered = multihost_utils.process_allgather(packed.view(np.uint8))
        parts = np.asarray(gathered).reshape(jax.process_count(), -1).view(np.float64)
        out = FeatureStats(self.dim)
        for part in parts:  # added in process order: the same result on every process
            out.count += int(round(part[0]))
            out.sum += part[1 : 1 + self.dim]
            out.outer += part[1 + self.dim :].reshape(self.dim, self.dim)
        return out

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean [dim] and unbiased covariance [dim, dim] (divided by count - 1)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.count}")
        mu = self.sum / self.count
        cov = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, (cov + cov.T) / 2.0

    # ----- files ---------------------------------------------------------------------------
    def save(self, path, provenance: dict | None = None) -> storage.Path:
        """Writes mu, sigma (as pytorch-fid's .npz files hold them), the raw sums and the
        provenance (JSON) to `path` (.npz)."""
        path = storage.path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        mu, sigma = self.mean_cov()
        storage.save_npz(
            path,
            mu=mu,
            sigma=sigma,
            count=self.count,
            sum=self.sum,
            outer=self.outer,
            provenance=json.dumps(provenance or {}),
        )
        return path

    @classmethod
    def load(cls, path) -> tuple[FeatureStats, dict]:
        with storage.path(path).open("rb") as f, np.load(f) as data:
            stats = cls(data["sum"].shape[0])
            stats.count = int(data["count"])
            stats.sum = data["sum"].astype(np.float64)
            stats.outer = data["outer"].astype(np.float64)
            provenance = json.loads(str(data["provenance"]))
        return stats, provenance


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr (S1 S2)^(1/2) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2), which has the same eigenvalues as S1 S2
    but, unlike the general square root of the non-symmetric S1 S2, stays real and
    well-defined when the covariances are singular (fewer samples than dimensions).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(
            f"statistics differ in shape: {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}"
        )
    root = _sqrt_psd(s1)
    m = root @ s2 @ root
    tr_sqrt = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(*a.mean_cov(), *b.mean_cov())
