"""FID features: images -> the Inception's 299x299 input -> pool3 features [B, 2048].

Preprocessing follows the TensorFlow FID reference (the TTUR code that defined FID, and
torch-fidelity after it), which the TF 2015-12-05 graph was built for:
1. images as floats on the 0..255 scale (uint8 as is; ldm_jax's [-1, 1] images mapped by
   (x + 1) * 127.5, then clipped; no rounding to integers);
2. resized to 299x299 by TF1's `resize_bilinear` (align_corners=False, no half-pixel
   centres: source coordinate = destination index x in/out, neighbours clamped at the
   edge). `resize="torch_bilinear"` uses PyTorch's `interpolate(bilinear,
   align_corners=False)` (half-pixel centres) as pytorch-fid does;
3. mapped to the network's domain by (x - 128) / 128.
Images already 299x299 are not resampled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import storage

INCEPTION_SIZE = 299
RESIZE_MODES = ("tf1_bilinear", "torch_bilinear")


def _tf1_axis(in_size: int, out_size: int):
    """Source indices (lo, hi) and weights of TF1 resize_bilinear along one axis."""
    src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
    lo = np.floor(src).astype(np.int32)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo).astype(np.float32)


def _torch_axis(in_size: int, out_size: int):
    """PyTorch bilinear, align_corners=False: half-pixel centres, clamped at 0."""
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    src = np.clip(src, 0.0, None)
    lo = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo).astype(np.float32)


def resize_bilinear(x, size: int, mode: str = "tf1_bilinear"):
    """x [B, H, W, C] float -> [B, size, size, C] by separable linear interpolation."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; valid: {list(RESIZE_MODES)}")
    axis = _tf1_axis if mode == "tf1_bilinear" else _torch_axis
    for dim in (1, 2):
        n = x.shape[dim]
        if n == size:
            continue
        lo, hi, w = axis(n, size)
        a, b = jnp.take(x, lo, axis=dim), jnp.take(x, hi, axis=dim)
        shape = [1] * x.ndim
        shape[dim] = size
        w = jnp.asarray(w).reshape(shape)
        x = a + (b - a) * w
    return x


def to_inception_input(images, *, resize: str = "tf1_bilinear"):
    """uint8 [B, H, W, 3] (0..255) or float [B, H, W, 3] in [-1, 1] -> the network's input
    [B, 299, 299, 3] in [-1, 1). Grey images ([..., 1]) are repeated to RGB."""
    x = jnp.asarray(images)
    if x.dtype == jnp.uint8:
        x = x.astype(jnp.float32)
    else:
        x = jnp.clip((x.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    x = resize_bilinear(x, INCEPTION_SIZE, resize)
    return (x - 128.0) / 128.0


def feature_fn(params, *, resize: str = "tf1_bilinear"):
    """A jitted images -> {"pool3": [B, 2048], and "logits": [B, 1008] when the weights
    have the classifier head (IS logits, without bias)} for the given Inception params,
    on this process's default device."""
    from ldm_jax.models.inception import FIDInceptionV3, logits_from_pool3, split_head

    model = FIDInceptionV3()
    net, head = jax.device_put(split_head(params))  # arguments, not constants in the HLO

    @jax.jit
    def forward(net, head, images):
        pool3 = model.apply({"params": net}, to_inception_input(images, resize=resize))
        out = {"pool3": pool3}
        if head is not None:
            out["logits"] = logits_from_pool3(head, pool3)
        return out

    return lambda images: forward(net, head, images)


def weights_fingerprint(path: str) -> str:
    """sha256 of the Inception weights file (recorded with every statistic)."""
    import hashlib

    h = hashlib.sha256()
    with storage.path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stats_of_batches(features, batches, image_key: str = "image", keep: list | None = None):
    """FeatureStats over `batches` (dicts with images and an optional `mask`), combined
    over all processes. `features`: see `feature_fn`. With `keep`, the (local) pool3 rows
    and masks are appended to that list too."""
    from ldm_jax.evaluation.frechet import FeatureStats

    stats = FeatureStats(2048)
    for batch in batches:
        pool3 = np.asarray(features(batch[image_key])["pool3"])
        stats.update(pool3, batch.get("mask"))
        if keep is not None:
            keep.append((pool3, batch.get("mask")))
    return stats.all_processes()


def dataset_stats(
    data_cfg, *, split: str, num_images: int | None, features, weights: str, resize: str,
    batch_size: int, cache_dir, keep: list | None = None,
):  # fmt: skip
    """Reference statistics of a dataset split (center crops at data.image_size), computed
    once and cached as .npz with their provenance; a cached file is used only when its
    provenance matches, and not when the features themselves are wanted (`keep`, see
    `stats_of_batches`). Returns (FeatureStats, provenance, path)."""
    import json
    import re

    from ldm_jax import storage
    from ldm_jax.data import pipeline
    from ldm_jax.data.datasets import open_source, resolve_data_dir
    from ldm_jax.evaluation.frechet import FeatureStats

    total = len(open_source(data_cfg.name, split, data_cfg.data_dir))
    n = total if num_images is None else min(int(num_images), total)
    provenance = {
        "dataset": data_cfg.name,
        "data_dir": resolve_data_dir(data_cfg.data_dir),
        "split": split,
        "image_size": data_cfg.image_size,
        "resize_before_crop": data_cfg.resize,
        "crop": "center",
        "num_images": n,
        "inception_resize": resize,
        "network": "InceptionV3 TF 2015-12-05, pool3",
        "weights_sha256": weights_fingerprint(weights),
    }
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{data_cfg.name}-{split}-{data_cfg.image_size}-{n}")
    path = storage.path(cache_dir) / f"{tag}-{resize}.npz"
    if path.is_file() and keep is None:
        stats, found = FeatureStats.load(path)
        if found == provenance:
            return stats, provenance, path
    batches = pipeline.eval_batches(
        data_cfg, global_batch_size=batch_size, num_examples=n, split=split
    )
    stats = stats_of_batches(features, batches, keep=keep)
    if jax.process_index() == 0:
        stats.save(path, provenance)
        (path.with_suffix(".json")).write_text(json.dumps(provenance, indent=2) + "\n")
    return stats, provenance, path
