"""Latent caching: encode a training split once with the frozen first stage, then train
the diffusion model from the stored codes instead of running the encoder every step.

The cache is a TFDS dataset in array_record, read like any other source. Example i is
example i of the split (no shuffling) with `latent` float32 [h, w, k] — the KL posterior's
moments (mean and logvar, k = 2c, so each training step still draws a fresh posterior
sample, as without the cache) or the VQ encoder's pre-quantisation output (k = c) — and
`label` / `caption` (a list of captions) when the dataset has them, and `image` (uint8
[S, S, 3], the centre crop that was encoded) when the run has a dense condition
(`data.condition`): conditions that are random per example (degradations, masks) are then
made from it on the fly, as without the cache.

Encoding runs on the whole mesh (every process encodes its slice of each batch); process 0
gathers the codes and writes. `provenance.json` records what the cache was made from
(autoencoder checkpoint, dataset, split, preprocessing); a cache made from anything else
is refused with an error, never overwritten. Only deterministic preprocessing can be
cached (center crop, no flip): random augmentation would be frozen into the cache.
"""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils
from tensorflow_datasets.core import read_only_builder

from ldm_jax import storage
from ldm_jax.data import pipeline
from ldm_jax.data.builders.base import ProjectBuilder
from ldm_jax.data.datasets import Source, open_source, resolve_data_dir
from ldm_jax.errors import UserError

PROVENANCE = "provenance.json"
FORMAT_VERSION = 1
_ADDED_KEYS = {"with_images": False}  # provenance keys added since format 1: their defaults


class LatentCacheBuilder(ProjectBuilder, skip_registration=True):
    """Writes examples handed to it; not a registered dataset."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(self, *, features=None, examples=None, split="train", **kwargs):
        self._features, self._examples, self._split = features, examples, split
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="First-stage codes of a dataset split, written by ldm_jax.",
            features=self._features,
            disable_shuffling=True,  # cache index i is example i of the split
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {self._split: self._generate_examples()}

    def _generate_examples(self):
        yield from self._examples


def cache_dir(config, first_stage) -> storage.Path:
    """config.latent_cache.dir, or one directory per (autoencoder step, dataset, split,
    size) inside the autoencoder's workdir, so that runs on the same first stage share it."""
    if config.latent_cache.dir:
        return storage.path(config.latent_cache.dir)
    d = config.data
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{d.name}-{d.train_split}-{d.image_size}")
    return first_stage.workdir / "latent_cache" / f"{name}-step{first_stage.step}"


def provenance(config, first_stage) -> dict:
    d = config.data
    return {
        "format_version": FORMAT_VERSION,
        "autoencoder_checkpoint": str(first_stage.path),
        "autoencoder_kind": first_stage.regularizer,
        "dataset": d.name,
        "data_dir": resolve_data_dir(d.data_dir),
        "split": d.train_split,
        "image_size": d.image_size,
        "resize": d.resize,
        "crop": "center",
        "image_key": d.image_key,
        "label_key": d.label_key,
        "caption_key": d.caption_key,
        "with_images": _with_images(config),
    }


def _serves(key: str, found, expected) -> bool:
    """Whether a cache's provenance value serves a run's: equal, or a cache that kept its
    images serving a run that does not need them."""
    return found == expected or (key == "with_images" and found and not expected)


def _with_images(config) -> bool:
    cond = config.data.get("condition")
    return bool(cond) and cond.get("kind", "none") != "none"


def check_cacheable(config) -> None:
    d = config.data
    kind = (d.get("condition") or {}).get("kind", "none")
    if kind == "semantic" or config.cond.kind == "layout":
        raise UserError(
            "latent_cache.enabled: the cache keeps no class maps or boxes, which this run "
            f"conditions on ({'data.condition.kind=semantic' if kind == 'semantic' else 'cond.kind=layout'}); "
            "disable latent_cache."
        )
    if d.flip or d.crop == "random":
        raise UserError(
            f"latent_cache.enabled needs deterministic preprocessing, but data.crop={d.crop!r} "
            f"and data.flip={d.flip}: a cache would freeze one random crop/flip per image. Set "
            "data.crop='center' and data.flip=False, or disable latent_cache."
        )


def _features(label_key, caption_key, shape, image_size) -> tfds.features.FeaturesDict:
    feats = {"latent": tfds.features.Tensor(shape=shape, dtype=np.float32)}
    if image_size:
        feats["image"] = tfds.features.Tensor(shape=(image_size, image_size, 3), dtype=np.uint8)
    if label_key:
        feats["label"] = tfds.features.Scalar(dtype=np.int64)
    if caption_key:
        feats["caption"] = tfds.features.Sequence(tfds.features.Text())
    return tfds.features.FeaturesDict(feats)


def _encoded_batches(config, encode_fn, mesh_run, total: int):
    """Yields (global index of the first row, codes [n, h, w, k] numpy, uint8 images
    [n, S, S, 3] or None) on every process; the rows of all processes are gathered and the
    last batch's padding dropped (the eval batches hold examples in order, so n follows
    from `total`)."""
    batch_size = config.latent_cache.batch_size
    data_cfg = config.data.copy_and_resolve_references()
    with data_cfg.unlocked():
        data_cfg.crop, data_cfg.flip = "center", False
    start = 0
    for local in pipeline.eval_batches(
        data_cfg, global_batch_size=batch_size, split=config.data.train_split
    ):
        images = mesh_run.to_global({"image": local["image"]})["image"]
        codes = mesh_run.all_rows(encode_fn(images))
        n = min(batch_size, total - start)
        kept = None
        if _with_images(config):  # the exact uint8 crops back from [-1, 1]
            kept = np.rint((mesh_run.all_rows(images)[:n] + 1.0) * 127.5).astype(np.uint8)
        yield start, codes[:n], kept
        start += n


def build(config, first_stage, encode_fn, mesh_run) -> Source:
    """Opens the cache for this run, encoding and writing it first if missing.

    encode_fn: jitted batch-sharded images -> codes on the mesh; mesh_run: the run's
    `parallel.mesh_run.MeshRun` (host rows to global arrays and back). Call on every
    process.
    """
    check_cacheable(config)
    root = cache_dir(config, first_stage)
    expected = provenance(config, first_stage)
    prov_path = root / PROVENANCE
    if prov_path.exists():
        found = json.loads(prov_path.read_text())
        # Caches written before a key existed hold its default.
        diff = [
            k for k in expected if not _serves(k, found.get(k, _ADDED_KEYS.get(k)), expected[k])
        ]
        if diff:
            k = diff[0]
            raise UserError(
                f"the latent cache {root} was made from {k}={found.get(k, _ADDED_KEYS.get(k))!r}, but this run "
                f"has {k}={expected[k]!r}. It is left as it is: delete it to re-encode, or "
                "set config.latent_cache.dir to another directory."
            )
    # array_record shards open from local paths only: a remote cache is written and read
    # through a local mirror of it (storage.local_mirror), the remote copy the shared one.
    local = root
    if storage.is_remote(root):  # one mirror per process: processes may share a host
        local = storage.local_mirror(root) / f"process_{jax.process_index()}"
    builder_kw = dict(data_dir=str(local), file_format="array_record")
    if storage.is_remote(root):
        _sync_mirror(config, first_stage, encode_fn, mesh_run, root, local, expected, builder_kw)
    elif not LatentCacheBuilder(**builder_kw).is_prepared():
        _write(config, first_stage, encode_fn, mesh_run, root, expected, builder_kw)
    builder = read_only_builder.builder_from_directory(LatentCacheBuilder(**builder_kw).data_dir)
    split = config.data.train_split
    return Source("latent_cache", split, str(root), builder, builder.as_data_source(split=split))


def _sync_mirror(config, first_stage, encode_fn, mesh_run, root, local, expected, builder_kw):
    """A remote cache: encoded into the local mirror and uploaded by process 0 if the
    remote one is missing; then copied down by every process whose mirror lacks it (or
    holds another provenance)."""
    relative = str(LatentCacheBuilder(**builder_kw).data_dir)[len(str(local)) :].lstrip("/")
    remote_ready = (root / relative / "dataset_info.json").exists()
    if not remote_ready:
        if local.exists():
            local.rmtree()  # a mirror of an older cache
        _write(config, first_stage, encode_fn, mesh_run, local, expected, builder_kw)
        if jax.process_index() == 0:
            storage.copy_tree(local, root)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("ldm_jax:latent_cache_uploaded")
    mirrored = local / PROVENANCE
    if not mirrored.exists() or mirrored.read_text() != (root / PROVENANCE).read_text():
        partial = local.parent / f"{local.name}.partial"  # a kill leaves no half mirror
        for stale in (partial, local):
            if stale.exists():
                stale.rmtree()
        storage.copy_tree(root, partial)
        partial.rename(local)


def _write(config, first_stage, encode_fn, mesh_run, root, expected, builder_kw):
    is_lead = jax.process_index() == 0
    d = config.data
    raw = open_source(d.name, d.train_split, d.data_dir)
    label_key = d.label_key if d.label_key and raw.has_feature(d.label_key) else None
    caption_key = d.caption_key if d.caption_key and raw.has_feature(d.caption_key) else None
    s = d.image_size // first_stage.factor
    shape = (s, s, first_stage.code_channels)
    batches = _encoded_batches(config, encode_fn, mesh_run, len(raw))
    if is_lead:
        print(f"latent cache: encoding {len(raw)} examples of {d.name}/{d.train_split} -> {root}")

        def examples():
            for start, codes, images in batches:
                for j, code in enumerate(codes):
                    i = start + j
                    example = raw[i]
                    out = {"latent": code.astype(np.float32)}
                    if images is not None:
                        out["image"] = images[j]
                    if label_key:
                        out["label"] = int(pipeline.lookup(example, label_key))
                    if caption_key:
                        out["caption"] = [
                            str(c) for c in np.ravel(pipeline.lookup(example, caption_key))
                        ]
                    yield i, out

        root.mkdir(parents=True, exist_ok=True)
        (root / PROVENANCE).write_text(json.dumps(expected, indent=2) + "\n")
        builder = LatentCacheBuilder(
            features=_features(
                label_key, caption_key, shape, d.image_size if _with_images(config) else 0
            ),
            examples=examples(),
            split=d.train_split,
            **builder_kw,
        )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    else:
        for _ in batches:  # take part in the collective encode; process 0 writes
            pass
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("ldm_jax:latent_cache_written")
