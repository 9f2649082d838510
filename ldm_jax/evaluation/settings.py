"""`config.evaluation`: the settings of every evaluation, in training and in the evaluate
command. Its own module, so configs read the defaults without importing the metrics."""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """`config.evaluation`: off in training unless `every` > 0 and `metrics` are named."""
    none = lambda t: ml_collections.FieldReference(None, field_type=t)  # noqa: E731
    return ml_collections.ConfigDict(
        dict(
            metrics=(),
            every=0,  # training steps between evaluations (0: never during training)
            num_samples=1000,
            num_reference=none(int),  # reference images (None: the whole split)
            split=none(str),  # None: train (sample metrics), eval split (autoencoder, restoration)
            sampler=none(str),  # None: config.sampling's
            steps=none(int),
            guidance=none(float),
            seed=0,
            batch_size=none(int),  # global; None: the multiple of the batch shards <= 64
            resize="tf1_bilinear",  # or "torch_bilinear" (pytorch-fid's resize)
            inception=none(str),  # weights file; None: cache, then the packaged network
            inception_cache="~/.cache/ldm_jax/inception",
            download_inception=False,  # fetch pytorch-fid's weights into the cache
            stats_dir="~/.cache/ldm_jax/fid_stats",
            is_splits=10,
            pr_k=3,
        )
    )
