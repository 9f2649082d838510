"""Conditional accuracy on the digits: does a sample of class k look like a k?

A support-vector classifier trained on the real training split of the `digits` dataset
(images pooled back to the original 8x8 grid) labels generated samples; the fraction that
gets the requested label is the conditional accuracy. Its accuracy on the real test split
is reported beside it, as the ceiling the samples can reach.

The classifier names a digit even for a colour-noise blob, so accuracy alone flatters a
model. `off_manifold_share` counts the samples far from every real training digit: each
image read at the digits' 8x8 grid per colour channel (a grey digit has equal channels),
its distance to the nearest real training digit, against a threshold set at the 99th
percentile of the same distance for one half of the real test split; the other half's
share is reported beside it as real data's own figure (about 1%).
"""

from __future__ import annotations

import numpy as np
from sklearn.svm import SVC

from ldm_jax.data.datasets import open_source

SVC_SETTINGS = dict(gamma=0.001, C=10.0)


def features(images) -> np.ndarray:
    """[N, 32, 32, 3] in [-1, 1] -> [N, 64]: grey, 4x4 average pooled, on sklearn's 0..16."""
    x = np.asarray(images, np.float32).mean(axis=-1)  # [N, 32, 32]
    x = (x + 1.0) * 0.5 * 16.0
    n, h, w = x.shape
    f = h // 8
    return x.reshape(n, 8, f, 8, f).mean(axis=(2, 4)).reshape(n, 64)


def channel_features(images) -> np.ndarray:
    """[N, 32, 32, 3] in [-1, 1] -> [N, 192]: each channel 4x4 average pooled, on 0..16."""
    x = (np.asarray(images, np.float32) + 1.0) * 0.5 * 16.0
    n, h, w, c = x.shape
    f = h // 8
    return x.reshape(n, 8, f, 8, f, c).mean(axis=(2, 4)).reshape(n, 64 * c)


def _nearest_distances(queries: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Euclidean distance from each query row to its nearest reference row."""
    d2 = (queries**2).sum(1)[:, None] - 2.0 * queries @ reference.T + (reference**2).sum(1)
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0))


def _load(split: str, data_dir) -> tuple[np.ndarray, np.ndarray]:
    src = open_source("digits", split, data_dir, prepare_if_missing=True)
    images = np.stack([src[i]["image"] for i in range(len(src))]).astype(np.float32)
    labels = np.array([src[i]["label"] for i in range(len(src))], np.int64)
    return images / 127.5 - 1.0, labels


class DigitsClassifier:
    def __init__(self, data_dir=None):
        images, labels = _load("train", data_dir)
        self._train = (features(images), labels)
        self.svc = SVC(**SVC_SETTINGS).fit(*self._train)
        test_images, test_labels = _load("test", data_dir)
        self.real_test_accuracy = self.accuracy(test_images, test_labels)
        self._train_channels = channel_features(images)
        real = _nearest_distances(channel_features(test_images), self._train_channels)
        calibration, held = real[0::2], real[1::2]
        self.off_manifold_threshold = float(np.percentile(calibration, 99))
        self.real_off_manifold_share = float(np.mean(held > self.off_manifold_threshold))

    def off_manifold_share(self, images) -> float:
        """The share of `images` farther from every real training digit than the
        threshold (see the module docstring)."""
        far = _nearest_distances(channel_features(images), self._train_channels)
        return float(np.mean(far > self.off_manifold_threshold))

    def predict(self, images) -> np.ndarray:
        return self.svc.predict(features(images))

    def probabilities(self, images) -> np.ndarray:
        """[N, 10] class probabilities (the same SVM, Platt-scaled by 5-fold calibration),
        columns in label order 0..9. Labels still come from the SVM's decision function."""
        if not hasattr(self, "_calibrated"):
            from sklearn.calibration import CalibratedClassifierCV

            calibrated = CalibratedClassifierCV(SVC(**SVC_SETTINGS), ensemble=False, cv=5)
            self._calibrated = calibrated.fit(*self._train)
        return self._calibrated.predict_proba(features(images))

    def accuracy(self, images, labels) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))
