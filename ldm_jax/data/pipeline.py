"""Training and evaluation iterators over a prepared dataset, per process.

Determinism contract (multi-host runs rely on it): the GLOBAL batch k is the same whatever
the process count. Epoch e visits the examples in `default_rng([seed, 0, e]).permutation(n)`;
global batch k holds global positions [k*B, (k+1)*B) of the concatenated epochs; process p
takes the contiguous slice [p*b, (p+1)*b) of it (b = B / process_count); the crop / flip /
caption rng of the example at global position g is `default_rng([seed, 1, g])`, and its
dense condition's (data.condition) `default_rng([seed, 2, g])`. The iterator state is the
next global batch index.
"""

import threading
from types import SimpleNamespace

import grain
import ml_collections
import numpy as np

from ldm_jax.data import annotations, conditions, layouts, transforms
from ldm_jax.data.datasets import Source, open_source
from ldm_jax.errors import UserError

_PERM_TAG, _EXAMPLE_TAG = 0, 1
_REQUIRED = ("name", "image_size")


def default_config(**overrides) -> ml_collections.ConfigDict:
    """The `data` section of an experiment config, with every key the pipeline reads."""
    cfg = ml_collections.ConfigDict(
        {
            "name": "digits",
            "data_dir": ml_collections.FieldReference(None, field_type=str),
            "train_split": "train",
            "eval_split": "test",
            "image_size": 32,
            "resize": ml_collections.FieldReference(None, field_type=int),
            "crop": "random",
            "flip": False,
            "prepare_if_missing": False,
            "num_threads": 8,
            # >0: the training batches are made (read, decoded, augmented) in this many
            # worker processes, whole batches each, in order (bench/input_pipeline.py).
            "num_workers": 0,
            "image_key": "image",
            "label_key": "label",
            "caption_key": "caption",
            "condition": conditions.default_config(),
            "objects": annotations.objects_config(),  # boxes and labels, for layouts
        }
    )
    cfg.update(overrides)
    return cfg


def _settings(data_cfg) -> SimpleNamespace:
    """Reads the config (ConfigDict, dataclass or dict) with defaults for optional keys."""
    defaults = default_config().to_dict()
    get = data_cfg.get if isinstance(data_cfg, dict) else lambda k, d: getattr(data_cfg, k, d)
    for key in _REQUIRED:
        if get(key, None) is None:
            raise UserError(f"data config needs `{key}` (e.g. data.{key}={defaults[key]!r}).")
    s = SimpleNamespace(**{k: get(k, v) for k, v in defaults.items()})
    s.condition = conditions.settings(s.condition)
    s.objects = {**defaults["objects"], **dict(s.objects or {})}
    conditions.check(s.condition, s.image_size)
    if s.crop not in ("random", "center"):
        raise UserError(f"data.crop must be 'random' or 'center', got {s.crop!r}.")
    if s.resize is not None and s.resize < s.image_size:
        raise UserError(
            f"data.resize={s.resize} is smaller than data.image_size={s.image_size}: the crop "
            f"would not fit. Use data.resize >= {s.image_size} (or None to crop unresized)."
        )
    return s


def _processes(global_batch_size, process_index, process_count) -> tuple[int, int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} not in [0, {process_count}).")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise UserError(
            f"global batch size {global_batch_size} is not a positive multiple of the "
            f"process count {process_count}; choose a batch size divisible by {process_count}."
        )
    return process_index, process_count, global_batch_size // process_count


def lookup(example: dict, key: str):
    for part in key.split("/"):
        example = example[part]
    return example


class _Reader:
    """Turns (example index, rng) into a transformed uint8 example; shared by both iterators."""

    def __init__(self, s: SimpleNamespace, source: Source, train: bool):
        self.s, self.source, self.train = s, source, train
        # A latent cache (ldm_jax.data.latent_cache) holds first-stage codes, not images.
        self.latent = source.has_feature("latent")
        if self.latent:
            s = self.s = SimpleNamespace(
                **{**vars(s), "label_key": "label", "caption_key": "caption"}
            )
            if s.condition.kind != "none" and not source.has_feature("image"):
                raise UserError(
                    f"data.condition.kind={s.condition.kind!r} is made from the images, which "
                    f"the latent cache {source.data_dir} does not hold; delete it to re-encode "
                    "with the images, or disable latent_cache."
                )
        elif not source.has_feature(s.image_key):
            raise UserError(
                f"Dataset '{source.name}' has no feature '{s.image_key}' (features: "
                f"{', '.join(source.features.keys())}); set data.image_key."
            )
        self.label_key = s.label_key if s.label_key and source.has_feature(s.label_key) else None
        self.caption_key = (
            s.caption_key if s.caption_key and source.has_feature(s.caption_key) else None
        )
        o = s.objects
        self.objects = (
            not self.latent and source.has_feature(o["bbox_key"])
            and source.has_feature(o["label_key"])
        )  # fmt: skip
        self.map_key = None
        if s.condition.kind == "semantic" and not self.latent:
            self.map_key = s.condition.map_key
            if not source.has_feature(self.map_key):
                raise UserError(
                    f"data.condition.kind='semantic' reads the class map "
                    f"'{self.map_key}', which '{source.name}' lacks (features: "
                    f"{', '.join(source.features.keys())}); set data.condition.map_key."
                )

    def blank(self) -> dict:
        """A padding example for eval (masked out)."""
        size = self.s.image_size
        out = {"image": np.zeros((size, size, 3), np.uint8)}
        out |= conditions.blank(self.s.condition, size)
        if self.objects:
            out["layout"] = layouts.Layout.empty()
        if self.label_key:
            out["label"] = 0
        if self.caption_key:
            out["caption"] = ""
        return out

    def read(self, index: int, rng: np.random.Generator | None, condition_rng=None) -> dict:
        """`rng` draws crops, flips and captions (None: center crop, first caption);
        `condition_rng` the dense condition (data.condition), when there is one."""
        example = self.source[index]
        if self.latent:  # its image (if any) is the encoded crop: conditions only
            out = {"latent": example["latent"]}
            if self.s.condition.kind != "none":
                out["image"] = np.asarray(example["image"])
        else:
            out = self._image(index, example, rng)
        if self.s.condition.kind != "none":
            out |= conditions.make(self.s.condition, out["image"], condition_rng)
        if self.label_key:
            out["label"] = int(lookup(example, self.label_key))
        if self.caption_key:
            caption = lookup(example, self.caption_key)
            if not isinstance(caption, str):  # several captions (e.g. COCO): pick one
                caption = list(np.ravel(caption))
                caption = (
                    caption[int(rng.integers(len(caption)))] if rng is not None else caption[0]
                )
            out["caption"] = str(caption)
        return out

    def _image(self, index: int, example: dict, rng) -> dict:
        """The example's crop and, with it, its class map and objects when it has them."""
        s = self.s
        image = lookup(example, s.image_key)
        h, w = image.shape[:2]
        resized = (h, w) if s.resize is None else transforms.resized_shape(h, w, s.resize)
        if min(resized) < s.image_size:
            raise UserError(
                f"Example {index} of '{self.source.name}' is {h}x{w}, smaller than "
                f"data.image_size={s.image_size}; set data.resize={s.image_size} to upscale "
                "the smaller side before cropping."
            )
        geometry = annotations.plan(h, w, s, self.train, rng)
        out = {"image": geometry.image(image)}
        if self.map_key:
            out["segmentation"] = self._class_map(index, example, geometry)
        if self.objects:
            o = s.objects
            layout = layouts.from_example(
                lookup(example, o["label_key"]), lookup(example, o["bbox_key"]), o["box_format"]
            )
            out["layout"] = geometry.layout(layout)
        return out

    def _class_map(self, index: int, example: dict, geometry) -> np.ndarray:
        labels = geometry.label_map(lookup(example, self.map_key))
        n = int(self.s.condition.num_classes)
        if labels.size and int(labels.max()) >= n:
            raise UserError(
                f"Example {index} of '{self.source.name}' has class id {int(labels.max())} in "
                f"'{self.map_key}', but data.condition.num_classes={n}; set it above the "
                "largest id."
            )
        return labels.astype(np.uint8 if n <= 256 else np.int32)


def _collate(examples, float_images: bool = True) -> dict:
    batch = {}
    if "latent" in examples[0]:
        batch["latent"] = np.stack([e["latent"] for e in examples]).astype(np.float32)
    if "image" in examples[0]:
        images = np.stack([e["image"] for e in examples])
        batch["image"] = transforms.to_float(images) if float_images else images
        conditions.collate(examples, batch)
    if "label" in examples[0]:
        batch["label"] = np.array([e["label"] for e in examples], np.int32)
    if "caption" in examples[0]:
        batch["caption"] = np.array([e["caption"] for e in examples], dtype=object)
    if "layout" in examples[0]:
        batch["layout"] = np.empty(len(examples), dtype=object)
        for i, e in enumerate(examples):  # element-wise: a Layout is a tuple numpy would unpack
            batch["layout"][i] = e["layout"]
    return batch


def _batched(elements: grain.MapDataset, local_batch: int, num_threads: int):
    """Ordered, threaded decode with about two batches read ahead."""
    opts = grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=2 * local_batch if num_threads else 0
    )
    return iter(elements.to_iter_dataset(opts).batch(local_batch, batch_fn=_collate))


class _TrainElements:
    """Example j of this process's stream -> its transformed example (see the module's
    determinism contract). A plain picklable object, so that worker processes can make
    batches with it; each keeps its own cache of epoch permutations."""

    def __init__(self, reader, seed, global_batch, process_index, local_batch, num_examples):
        self.reader, self.seed = reader, seed
        self.global_batch, self.process_index = global_batch, process_index
        self.local_batch, self.num_examples = local_batch, num_examples
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in vars(self).items() if k not in ("_perms", "_lock")}

    def __setstate__(self, state):
        vars(self).update(state)
        self._perms, self._lock = {}, threading.Lock()

    def perm(self, epoch: int) -> np.ndarray:
        with self._lock:  # grain reads from several threads
            if epoch not in self._perms:
                rng = np.random.default_rng([self.seed, _PERM_TAG, epoch])
                self._perms[epoch] = rng.permutation(self.num_examples)
                for old in [e for e in self._perms if e < epoch - 1]:
                    del self._perms[old]
            return self._perms[epoch]

    def global_position(self, step: int, row: int) -> int:
        return step * self.global_batch + self.process_index * self.local_batch + row

    def __call__(self, j: int) -> dict:
        g = self.global_position(j // self.local_batch, j % self.local_batch)
        epoch, offset = divmod(g, self.num_examples)
        rng = np.random.default_rng([self.seed, _EXAMPLE_TAG, g])
        condition_rng = conditions.rng_for_train(self.seed, g)
        return self.reader.read(int(self.perm(epoch)[offset]), rng, condition_rng)

    def batch(self, k: int) -> dict:
        """This process's part of global batch k, collated, its images still uint8 (a
        quarter of the bytes to send back from a worker)."""
        examples = [self(k * self.local_batch + r) for r in range(self.local_batch)]
        return _collate(examples, float_images=False)


def _float_images(batch: dict) -> dict:
    if "image" in batch:
        batch["image"] = transforms.to_float(batch["image"])
    return batch


def _batches_in_workers(elements: _TrainElements, first_batch: int, workers: int):
    """Whole batches made in `workers` processes: grain gives worker i every workers-th
    batch and reads them back in turn, so the stream is the threaded one's."""
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; argparse commands
        flags.FLAGS.mark_as_parsed()  # and tests never parse them: take the defaults
    batches = grain.MapDataset.range(first_batch, 2**62).map(elements.batch)
    options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)
    return iter(batches.to_iter_dataset().mp_prefetch(options).map(_float_images))


class TrainIterator:
    """Infinite, shuffled, checkpointable batches for this process (see module docstring).

    Batches: `image` float32 [b, S, S, 3] in [-1, 1] (or `latent` float32 [b, h, w, k]
    from a latent cache passed as `source`); `label` int32 [b] and `caption` object (str)
    [b] when the dataset has them. With `prepare_if_missing`, only process 0 builds a
    missing project dataset (call `prepare` on process 0 before a multi-process run).
    """

    def __init__(
        self,
        data_cfg,
        *,
        global_batch_size,
        seed,
        process_index=None,
        process_count=None,
        source: Source | None = None,
    ):
        s = _settings(data_cfg)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"seed must be a non-negative int, got {seed!r}.")
        p, count, local = _processes(global_batch_size, process_index, process_count)
        if source is None:
            source = open_source(
                s.name,
                s.train_split,
                s.data_dir,
                prepare_if_missing=s.prepare_if_missing and p == 0,
            )
        if not len(source):
            raise UserError(f"{source!r} is empty.")
        self._reader = _Reader(s, source, train=True)
        self.seed, self.global_batch_size = int(seed), global_batch_size
        self.process_index, self.process_count, self.local_batch_size = p, count, local
        self.num_examples = len(source)
        self._threads, self._workers = s.num_threads, int(s.num_workers or 0)
        if self._workers < 0:
            raise UserError(f"data.num_workers={self._workers}: use 0 (threads) or more.")
        self._elements = _TrainElements(
            self._reader, self.seed, global_batch_size, p, local, self.num_examples
        )
        self._it = None
        self._start(0)

    @property
    def has_labels(self) -> bool:
        return self._reader.label_key is not None

    @property
    def has_captions(self) -> bool:
        return self._reader.caption_key is not None

    def global_position(self, step: int, row: int) -> int:
        """Global position of row `row` of this process's part of global batch `step`."""
        return self._elements.global_position(step, row)

    def _start(self, next_batch: int) -> None:
        self.close()
        if self._workers:
            self._it = _batches_in_workers(self._elements, next_batch, self._workers)
        else:
            first = next_batch * self.local_batch_size
            elements = grain.MapDataset.range(first, 2**62).map(self._elements)
            self._it = _batched(elements, self.local_batch_size, self._threads)
        self._next_batch = next_batch

    def close(self) -> None:
        """Stops the worker processes, if any (also done when the iterator is collected)."""
        if self._it is not None and self._workers:
            self._it.close()
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._it)
        self._next_batch += 1
        return batch

    @staticmethod
    def _state(next_batch: int, seed: int, global_batch_size: int) -> dict:
        return {"next_batch": next_batch, "seed": seed, "global_batch_size": global_batch_size}

    @staticmethod
    def initial_state(seed: int, global_batch_size: int) -> dict:
        """The state of an iterator that has given no batch yet: what a run written at
        step 0 without training (an imported one) stores for its data."""
        return TrainIterator._state(0, seed, global_batch_size)

    def get_state(self) -> dict:
        return self._state(self._next_batch, self.seed, self.global_batch_size)

    def set_state(self, state: dict) -> None:
        # A stream that has not begun (an imported run at step 0) has no order to continue.
        started = state.get("next_batch", 0) > 0
        for key, flag in (("seed", "seed"), ("global_batch_size", "batch_size")):
            if started and key in state and state[key] != getattr(self, key):
                raise UserError(
                    f"data iterator state was saved with {key}={state[key]}, but this run uses "
                    f"{getattr(self, key)}; the batch order would not continue. Use the saved "
                    f"value (--config.{flag}={state[key]}) or train into a new --workdir."
                )
        self._start(int(state["next_batch"]))


def eval_batches(
    data_cfg,
    *,
    global_batch_size,
    num_examples=None,
    process_index=None,
    process_count=None,
    split=None,
):
    """Finite, deterministic batches over the first `num_examples` (all if None, capped at
    the split size) of the eval split: no shuffle, center crop, no flip.

    Global batch k holds examples [k*B, (k+1)*B), process p its slice [p*b, (p+1)*b); every
    process yields the same number of batches, the last padded. `mask` (bool [b]) marks real
    examples, so each example counts exactly once across processes.
    """
    s = _settings(data_cfg)
    p, _, local = _processes(global_batch_size, process_index, process_count)
    source = open_source(
        s.name,
        split or s.eval_split,
        s.data_dir,
        prepare_if_missing=s.prepare_if_missing and p == 0,
    )
    reader = _Reader(s, source, train=False)
    total = len(source) if num_examples is None else min(int(num_examples), len(source))
    steps = -(-total // global_batch_size)

    def element(j: int) -> dict:
        g = (j // local) * global_batch_size + p * local + j % local
        if g < total:
            out = reader.read(g, None, conditions.rng_for_eval(s.condition, g))
        else:
            out = reader.blank()
        out["mask"] = g < total
        return out

    def collate(examples):
        batch = _collate(examples)
        batch["mask"] = np.array([e["mask"] for e in examples], bool)
        return batch

    def generate():
        opts = grain.ReadOptions(
            num_threads=s.num_threads, prefetch_buffer_size=2 * local if s.num_threads else 0
        )
        ds = grain.MapDataset.range(steps * local).map(element).to_iter_dataset(opts)
        yield from ds.batch(local, batch_fn=collate)

    return generate()
