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

import os
import pickle
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from ldm_jax import storage
from ldm_jax.errors import UserError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _existing(path: str | os.PathLike) -> storage.Path:
    path = storage.path(path)
    if not path.is_file():
        raise UserError(f"weight file {path} does not exist")
    return path


def load_safetensors(path: str | os.PathLike, prefix: str = "") -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file whose names start with `prefix` (all by default).

    Reads tensor by tensor, so a prefix keeps e.g. the text encoder of a single-file
    Stable Diffusion checkpoint out of memory.
    """
    from safetensors import SafetensorError, safe_open

    path = _existing(path)
    try:
        with storage.local_copy(path) as local, safe_open(os.fspath(local), framework="np") as f:
            return {name: f.get_tensor(name) for name in f.keys() if name.startswith(prefix)}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file: {e}") from e


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


def load_torch_checkpoint(path: str | os.PathLike, prefix: str = "") -> dict[str, np.ndarray]:
    """Tensors of a pickled PyTorch checkpoint; Lightning's `state_dict` entry when present.

    Non-tensor entries (step counters, nested optimiser state) are dropped.
    """
    path = _existing(path)
    try:
        import torch
    except ImportError as e:
        raise UserError(
            f"reading {path.name} needs PyTorch (pip install torch), or convert the file "
            "to .safetensors, which ldm_jax reads without torch"
        ) from e
    try:
        with storage.local_copy(path) as local:
            obj = torch.load(os.fspath(local), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{path} holds pickled objects other than tensors, which torch.load(weights_only"
            f"=True) refuses to run; convert it to .safetensors with a tool you trust ({e})"
        ) from e
    except (RuntimeError, OSError, EOFError) as e:
        raise UserError(f"{path} is not a readable PyTorch checkpoint: {e}") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    return {
        name: _torch_to_numpy(torch, value)
        for name, value in obj.items()
        if isinstance(value, torch.Tensor) and name.startswith(prefix)
    }


def load_state_dict(path: str | os.PathLike, prefix: str = "") -> dict[str, np.ndarray]:
    """{name: array} of a .safetensors or pickled PyTorch file, chosen by its suffix."""
    suffix = storage.path(path).suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return load_safetensors(path, prefix)
    if suffix in TORCH_SUFFIXES:
        return load_torch_checkpoint(path, prefix)
    raise UserError(
        f"{path}: unknown weight file suffix {suffix!r}; "
        f"expected one of {SAFETENSORS_SUFFIXES + TORCH_SUFFIXES}"
    )


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
    path = _existing(path)
    if path.suffix == ".msgpack":
        from flax import serialization

        return serialization.msgpack_restore(path.read_bytes())
    if path.suffix in SAFETENSORS_SUFFIXES:
        return unflatten_params(load_safetensors(path))
    raise UserError(f"{path}: ldm_jax params files are .safetensors or .msgpack")
