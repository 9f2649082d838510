"""Weight files of the PyTorch world as {tensor name: numpy array}.

`.safetensors` needs no torch (`safetensors.numpy`; bf16 arrives as ml_dtypes.bfloat16).
Pickled checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) need torch, imported only when such a
file is read (`pip install torch`, part of the `test` extra), and are unpickled with
`weights_only=True` so that a file cannot run code.

Every path may be local or a URL (gs://..., any `etils.epath` path, via `ldm_jax.storage`):
the readers and writers that take local files only (safetensors' `safe_open` and
`save_file`, torch.load) see a local copy of a remote file, or write one that is then
uploaded (`storage.local_copy`, `storage.staged`); a local file is written under a
temporary name and renamed, so that it appears whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

from ldm_jax import storage
from ldm_jax.errors import UserError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def existing_file(path: str | os.PathLike) -> storage.Path:
    path = storage.path(path)
    if not path.is_file():
        raise UserError(f"weight file {path} does not exist")
    return path


# Tensor dtypes of the safetensors format, as numpy (bf16 through ml_dtypes).
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}  # fmt: skip
_MAX_HEADER = 1 << 28  # a header past 256 MiB is a broken file, not a real one


class _SafetensorsFile(Mapping):
    """A .safetensors file's tensors by name, each read from the file when it is asked
    for, into memory of its own: no mapping of the whole file, so a converter that frees
    each tensor after use holds one tensor of the file at a time."""

    def __init__(self, file, where: str, prefix: str):
        self._file, self._where = file, where
        header = self._header()
        self._base = 8 + self._header_bytes
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = {k: v for k, v in header.items() if k.startswith(prefix)}

    def _header(self) -> dict:
        head = self._file.read(8)
        if len(head) != 8:
            raise UserError(f"{self._where} is not a readable safetensors file: no header")
        (self._header_bytes,) = struct.unpack("<Q", head)
        if self._header_bytes > _MAX_HEADER:
            raise UserError(f"{self._where} is not a readable safetensors file: bad header size")
        try:
            header = json.loads(self._file.read(self._header_bytes))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{self._where} is not a readable safetensors file: {e}") from e
        if not isinstance(header, dict):
            raise UserError(f"{self._where} is not a readable safetensors file: bad header")
        return header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise UserError(
                f"{self._where}: tensor {name!r} has unknown dtype {entry.get('dtype')}"
            )
        begin, end = entry["data_offsets"]
        out = np.empty(entry["shape"], dtype)
        if end - begin != out.nbytes:
            raise UserError(f"{self._where}: tensor {name!r} has {end - begin} bytes for its shape")
        self._file.seek(self._base + begin)
        if self._file.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
            raise UserError(f"{self._where} is truncated (tensor {name!r})")
        return out

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@contextlib.contextmanager
def _open_safetensors(path, prefix: str = "") -> Iterator[_SafetensorsFile]:
    path = existing_file(path)
    with path.open("rb") as f:
        yield _SafetensorsFile(f, str(path), prefix)


def load_safetensors(path: str | os.PathLike, prefix: str = "") -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file whose names start with `prefix` (all by default);
    the tensors outside `prefix` are never read (e.g. the text encoder of a single-file
    Stable Diffusion checkpoint)."""
    with _open_safetensors(path, prefix) as tensors:
        return dict(tensors.items())


def save_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: dict | None = None
) -> None:
    """Write {name: array} (any strides; bf16 via ml_dtypes) to a .safetensors file."""
    from safetensors.numpy import save_file

    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    with storage.staged(path) as local:
        save_file(arrays, os.fspath(local), metadata=metadata)


def _torch_to_numpy(torch, tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits, exactly
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class _TorchTensors(Mapping):
    """The tensors of an unpickled PyTorch state dict by name, each made a numpy array when
    it is asked for (from a memory-mapped file where torch could map it)."""

    def __init__(self, torch, tensors: dict):
        self._torch, self._tensors = torch, tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def __getitem__(self, name: str) -> np.ndarray:
        return _torch_to_numpy(self._torch, self._tensors[name])

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _torch_load(torch, local, where):
    """torch.load of tensors only, memory-mapped where the file's format allows it."""
    try:
        try:
            return torch.load(os.fspath(local), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # the legacy (non-zip) format cannot be mapped
                raise
            return torch.load(os.fspath(local), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{where} holds pickled objects other than tensors, which torch.load(weights_only"
            f"=True) refuses to run; convert it to .safetensors with a tool you trust ({e})"
        ) from e
    except (RuntimeError, OSError, EOFError) as e:
        raise UserError(f"{where} is not a readable PyTorch checkpoint: {e}") from e


@contextlib.contextmanager
def _open_torch_checkpoint(path, prefix: str = "") -> Iterator[_TorchTensors]:
    """Tensors of a pickled PyTorch checkpoint (Lightning's `state_dict` entry when
    present); non-tensor entries (step counters, nested optimiser state) are dropped."""
    path = existing_file(path)
    try:
        import torch
    except ImportError as e:
        raise UserError(
            f"reading {path.name} needs PyTorch (pip install torch), or convert the file "
            "to .safetensors, which ldm_jax reads without torch"
        ) from e
    with storage.local_copy(path) as local:
        obj = _torch_load(torch, local, path)
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
        tensors = {
            name: value
            for name, value in obj.items()
            if isinstance(value, torch.Tensor) and name.startswith(prefix)
        }
        yield _TorchTensors(torch, tensors)


def load_torch_checkpoint(path: str | os.PathLike, prefix: str = "") -> dict[str, np.ndarray]:
    """Tensors of a pickled PyTorch checkpoint; Lightning's `state_dict` entry when present."""
    with _open_torch_checkpoint(path, prefix) as tensors:
        return {name: np.array(tensors[name]) for name in tensors}  # off the mapped file


def _opener(path):
    suffix = storage.path(path).suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _open_safetensors
    if suffix in TORCH_SUFFIXES:
        return _open_torch_checkpoint
    raise UserError(
        f"{path}: unknown weight file suffix {suffix!r}; "
        f"expected one of {SAFETENSORS_SUFFIXES + TORCH_SUFFIXES}"
    )


@contextlib.contextmanager
def open_state_dict(path: str | os.PathLike, prefix: str = "") -> Iterator[Mapping]:
    """{name: array} of a .safetensors or pickled PyTorch file (by its suffix) whose
    tensors are read one by one as they are asked for, while the block lasts: a converter
    that keeps only what it converts never holds the file's tensors all at once.
    `shape_of` gives a tensor's shape without reading it."""
    with _opener(path)(path, prefix) as tensors:
        yield tensors


def shape_of(state: Mapping, name: str) -> tuple[int, ...]:
    """The shape of `state[name]`, without reading the tensor where `state` is a file."""
    shape = getattr(state, "shape", None)
    return tuple(shape(name)) if callable(shape) else tuple(np.shape(state[name]))


def load_state_dict(path: str | os.PathLike, prefix: str = "") -> dict[str, np.ndarray]:
    """{name: array} of a .safetensors or pickled PyTorch file, chosen by its suffix."""
    if _opener(path) is _open_torch_checkpoint:
        return load_torch_checkpoint(path, prefix)
    return load_safetensors(path, prefix)


# ----- ldm_jax's own naming: the param tree's paths joined by "/" --------------------------
def flatten_params(params: Mapping) -> dict[str, np.ndarray]:
    from flax import traverse_util

    flat = traverse_util.flatten_dict(dict(params), sep="/")
    return {name: np.asarray(value) for name, value in flat.items()}


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict:
    from flax import traverse_util

    return traverse_util.unflatten_dict(dict(flat), sep="/")


def save_params(path: str | os.PathLike, params: Mapping, metadata: dict | None = None) -> None:
    """A param tree to `.safetensors` (names are its paths, e.g. `conv_in/kernel`) or
    `.msgpack` (flax serialization of the nested dict), chosen by the suffix."""
    path = storage.path(path)
    if path.suffix == ".msgpack":
        from flax import serialization

        tree = unflatten_params(flatten_params(params))  # plain nested dict of numpy
        storage.write_atomic(path, serialization.msgpack_serialize(tree))
    elif path.suffix in SAFETENSORS_SUFFIXES:
        save_safetensors(path, flatten_params(params), metadata)
    else:
        raise UserError(f"{path}: save params as .safetensors or .msgpack")


def load_params(path: str | os.PathLike) -> dict:
    """The inverse of `save_params`: a nested dict of numpy arrays."""
    path = existing_file(path)
    if path.suffix == ".msgpack":
        from flax import serialization

        return serialization.msgpack_restore(path.read_bytes())
    if path.suffix in SAFETENSORS_SUFFIXES:
        return unflatten_params(load_safetensors(path))
    raise UserError(f"{path}: ldm_jax params files are .safetensors or .msgpack")
