"""Open prepared TFDS datasets as random-access sources, with no TensorFlow.

Reading goes through tfds' array_record data sources (`builder.as_data_source`, what
`tfds.data_source` calls): records are parsed and images decoded to uint8 numpy with PIL.
Datasets built by TFDS's own builders are opened from their files (`builder_from_files`)
so that a builder whose code imports TensorFlow (e.g. coco_captions) can still be read.
"""

import os
import re
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants, read_only_builder, registered

from ldm_jax.data.builders import BUILDERS
from ldm_jax.errors import DatasetNotPreparedError, UserError

PROJECT_DATASETS = tuple(BUILDERS)
_ARRAY_RECORD = "array_record"


def resolve_data_dir(data_dir: str | None) -> str:
    """`None` means TFDS's default, read now so that a late $TFDS_DATA_DIR is honoured."""
    path = str(data_dir) if data_dir else constants.get_default_data_dir()
    # Absolute local paths make error messages and commands unambiguous; keep URLs (gs://).
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def prepare_command(name: str, data_dir: str | None) -> str:
    """The shell command that prepares `name` as array_record under `data_dir`."""
    data_dir = resolve_data_dir(data_dir)
    if name.split("/")[0].split(":")[0] in PROJECT_DATASETS:
        return f"python -m ldm_jax.data.prepare --dataset {name} --data_dir {data_dir}"
    return f"tfds build {name} --data_dir {data_dir} --file_format=array_record"


def _not_prepared(
    name: str, split: str, data_dir: str, detail: str = ""
) -> DatasetNotPreparedError:
    msg = (
        f"Dataset '{name}' (split '{split}') is not prepared in data_dir '{data_dir}'"
        f"{': ' + detail if detail else ''}. Prepare it with:\n    {prepare_command(name, data_dir)}"
    )
    if name in PROJECT_DATASETS:
        msg += "\nor pass prepare_if_missing=True (config: data.prepare_if_missing=True)."
    else:
        if not _is_tfds_name(name):
            msg += f"\n(No TFDS builder is named '{name}' either: check the spelling.)"
        msg += (
            "\nTFDS's own builders may need a manual download first (see the dataset's page "
            "on tensorflow.org/datasets) and building them needs TensorFlow, which this "
            "project does not: build once anywhere, then copy the directory. The project's "
            f"own datasets are: {', '.join(PROJECT_DATASETS)}."
        )
    return DatasetNotPreparedError(msg)


def _is_tfds_name(name: str) -> bool:
    try:
        tfds.builder_cls(name.split("/")[0].split(":")[0])
    except registered.DatasetNotFoundError:
        return False
    except Exception:  # the builder's module exists but e.g. imports TensorFlow
        return True
    return True


def _project_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    return BUILDERS[name](data_dir=data_dir, file_format=_ARRAY_RECORD)


def prepare(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Builds a project dataset under `data_dir` (idempotent) and returns its builder.

    No barrier inside: in a multi-process job call it on process 0, then synchronise.
    """
    if name not in PROJECT_DATASETS:
        raise UserError(
            f"prepare() builds only the project's datasets {PROJECT_DATASETS}, not '{name}'. "
            f"For a TFDS dataset run: {prepare_command(name, data_dir)}"
        )
    builder = _project_builder(name, resolve_data_dir(data_dir))
    if not builder.is_prepared():
        # No GCS look-up: the data is generated locally and offline.
        config = tfds.download.DownloadConfig(try_download_gcs=False)
        builder.download_and_prepare(download_config=config)
    return builder


def _split_names(split: str) -> list[str]:
    """'train[:10%]+test' -> ['train', 'test'] (tfds' split slicing syntax is allowed)."""
    return [re.sub(r"\[.*\]$", "", part.strip()) for part in str(split).split("+")]


def _builder_for(name: str, split: str, data_dir: str, prepare_if_missing: bool):
    if name in PROJECT_DATASETS:
        builder = _project_builder(name, data_dir)
        if not builder.is_prepared():
            if not prepare_if_missing:
                raise _not_prepared(name, split, data_dir)
            builder = prepare(name, data_dir)
        return builder
    try:
        return read_only_builder.builder_from_files(name, data_dir=data_dir)
    except registered.DatasetNotFoundError:
        raise _not_prepared(name, split, data_dir) from None


def _to_numpy(value):
    """tfds' numpy decoding gives bytes for text; callers want str (and numpy arrays)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
        return np.array([_to_numpy(v) for v in value.ravel()], dtype=object).reshape(value.shape)
    if isinstance(value, (list, tuple)):
        return [_to_numpy(v) for v in value]
    return value


class Source(Sequence):
    """Random access to one split: `len(src)`, `src[i]` -> dict of numpy values.

    Images are uint8 [H, W, C] as stored (C may be 1); text is `str`; nested features
    (e.g. coco_captions' `captions/text`) stay nested dicts.
    """

    def __init__(self, name: str, split: str, data_dir: str, builder, data_source):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.builder = builder
        self._source = data_source

    @property
    def features(self):
        return self.builder.info.features

    def has_feature(self, key: str) -> bool:
        """Whether the '/'-separated feature path `key` exists, e.g. 'captions/text'."""
        node = self.features
        for part in key.split("/"):
            if not hasattr(node, "keys") or part not in node.keys():
                return False
            node = node[part]
        return True

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self!r}")
        return _to_numpy(self._source[int(index) % len(self)])

    def __repr__(self) -> str:
        return f"Source({self.name!r}, split={self.split!r}, n={len(self)}, dir={self.data_dir!r})"


def open_source(
    name: str, split: str, data_dir: str | None = None, *, prepare_if_missing: bool = False
) -> Source:
    """Opens split `split` of the prepared TFDS dataset `name` (array_record) for reading.

    `name` may carry a config and version ('lsun/church_outdoor:3.1.0'). Raises
    DatasetNotPreparedError naming the command that prepares it when it is missing;
    project datasets are built on the spot when `prepare_if_missing` is true.
    """
    data_dir = resolve_data_dir(data_dir)
    builder = _builder_for(name, split, data_dir, prepare_if_missing)
    available = list(builder.info.splits.keys())
    unknown = [s for s in _split_names(split) if s not in available]
    if unknown:
        raise UserError(
            f"Dataset '{name}' in '{data_dir}' has no split {unknown[0]!r}; available splits: "
            f"{', '.join(sorted(available))}. Set data.train_split / data.eval_split to one."
        )
    fmt = builder.info.file_format
    if fmt is None or fmt.value != _ARRAY_RECORD:
        formats = [f.value for f in getattr(builder.info, "alternative_file_formats", [])]
        if _ARRAY_RECORD not in formats:
            raise _not_prepared(
                name,
                split,
                data_dir,
                f"it is stored as {fmt.value if fmt else 'an unknown format'}, and random "
                "access without TensorFlow needs array_record (delete it or pick another "
                "data_dir, then rebuild)",
            )
        builder = read_only_builder.builder_from_directory(
            builder.data_dir, file_format=_ARRAY_RECORD
        )
    return Source(name, split, data_dir, builder, builder.as_data_source(split=split))
