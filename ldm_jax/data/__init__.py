"""Data: TFDS builders and sources (no TensorFlow), transforms, per-process iterators.

`prepare` lives in `ldm_jax.data.datasets` and is re-exported as `prepare_dataset`:
the name `ldm_jax.data.prepare` belongs to the CLI module, and importing that module
would overwrite a function of the same name here.
"""

from ldm_jax.data.datasets import PROJECT_DATASETS, Source, open_source
from ldm_jax.data.datasets import prepare as prepare_dataset
from ldm_jax.data.pipeline import TrainIterator, default_config, eval_batches

__all__ = [
    "PROJECT_DATASETS",
    "Source",
    "TrainIterator",
    "default_config",
    "eval_batches",
    "open_source",
    "prepare_dataset",
]
