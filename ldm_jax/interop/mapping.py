"""Name tables between ldm_jax param trees and PyTorch state dicts, and tensor layouts.

A table has one `Entry` per leaf of the model's param tree (from `jax.eval_shape`, so no
weights are materialised): the torch tensor name and how the tensor is laid out there.
Import and export walk the same table, so import(export(params)) is the identity by
construction, and both directions check every shape against the model.

Imported params are jax arrays on the host's CPU device, made one tensor at a time as the
file is read: orbax writes them to a checkpoint without the host copies it makes of numpy
leaves (an SD-1.5 UNet's save peaked 5.8 GB above its 3.4 GB as numpy, 1.8 GB as jax
arrays: bench/import_memory.py), and `jax.device_put(params, shardings)` still places them
onto a mesh without first gathering a full copy on one accelerator.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from ldm_jax.errors import UserError
from ldm_jax.interop import tensor_files

Path = tuple[str, ...]


class Entry(NamedTuple):
    path: Path  # ldm_jax param path, e.g. ("out_2", "kernel")
    name: str  # torch state-dict key, e.g. "model.diffusion_model.out.2.weight"
    layout: str  # a key of LAYOUTS


def _conv_to_torch(x: np.ndarray) -> np.ndarray:  # [*K, I, O] -> [O, I, *K]
    return x.transpose(x.ndim - 1, x.ndim - 2, *range(x.ndim - 2))


def _conv_to_flax(x: np.ndarray) -> np.ndarray:  # [O, I, *K] -> [*K, I, O]
    return x.transpose(*range(2, x.ndim), 1, 0)


# layout -> (ldm_jax -> torch, torch -> ldm_jax); numpy views, no copies.
LAYOUTS = {
    "copy": (lambda x: x, lambda x: x),  # biases, norm scales, embedding tables
    "linear": (lambda x: x.T, lambda x: x.T),  # Dense [I, O] <-> Linear [O, I]
    "conv": (_conv_to_torch, _conv_to_flax),  # HWIO (or KIO) <-> OIHW (or OIK)
    # a 1x1 conv here that torch holds as a Linear (diffusers' VAE attention)
    "conv1x1_as_linear": (lambda x: x[0, 0].T, lambda x: x.T[None, None]),
}
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def default_layout(path: Path, ndim: int) -> str:
    if path[-1] != "kernel":
        return "copy"
    return "linear" if ndim == 2 else "conv"


def named_table(abstract: Mapping[Path, Any], name: Callable[[Path], str]) -> list[Entry]:
    """One Entry per parameter, its torch name from `name(path)`, in the default layout."""
    return [Entry(p, name(p), default_layout(p, len(s.shape))) for p, s in abstract.items()]


def torch_leaf(path: Path) -> str:
    """The torch parameter name of a flax leaf (kernel, scale, embedding -> weight)."""
    if path[-1] not in _TORCH_LEAF:
        raise UserError(f"no torch name for parameter {'/'.join(path)}")
    return _TORCH_LEAF[path[-1]]


def dotted(module: str) -> str:
    """A flax module name in the CompVis spelling: numbers are their own dotted parts
    (`input_blocks_1_0` -> `input_blocks.1.0`, `net_0_proj` -> `net.0.proj`)."""
    tokens = module.split("_")
    name = tokens[0]
    for prev, token in zip(tokens, tokens[1:]):
        name += ("." if token.isdigit() or prev.isdigit() else "_") + token
    return name


def abstract_params(model: nn.Module, *args, **kwargs) -> dict[Path, jax.ShapeDtypeStruct]:
    """{path: shape and dtype} of every parameter of `model.init(rng, *args, **kwargs)`."""
    init = lambda rng, *arrays: model.init(rng, *arrays, **kwargs)  # kwargs stay static
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), *args)
    return traverse_util.flatten_dict(nn.meta.unbox(shapes["params"]))


def cached_per_model(fn: Callable[[nn.Module], Any]) -> Callable[[nn.Module], Any]:
    """Memoise fn(model) by the model's hyper-parameters (flax modules hash by their
    fields): tracing an SD-size UNet costs about a second per conversion otherwise."""
    cached = functools.lru_cache(maxsize=16)(fn)

    def wrapper(model: nn.Module) -> Any:
        try:
            hash(model)
        except TypeError:  # a list-valued field: trace every time
            return fn(model)
        return cached(model)

    return functools.wraps(fn)(wrapper)


def torch_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a parameter of ldm_jax shape `shape` (on a zero-stride view)."""
    to_torch = LAYOUTS[entry.layout][0]
    return tuple(to_torch(np.broadcast_to(np.zeros((), np.uint8), shape)).shape)


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def import_state(
    state: Mapping[str, Any],
    table: list[Entry],
    abstract: Mapping[Path, jax.ShapeDtypeStruct],
    *,
    what: str,
    prefix: str = "",
    ignore_prefixes: tuple[str, ...] = (),
    hint: str = "",
) -> dict:
    """{'params': nested tree of host jax arrays} for the model of `table` from a torch state dict.

    Keys outside `prefix` or under `ignore_prefixes` are not considered (a single-file SD
    checkpoint also holds the other models). Anything else that does not match -- the first
    tensor of a wrong shape, missing and unexpected tensors -- is one UserError.
    """
    by_name = {e.name: e for e in table}
    considered = [k for k in state if k.startswith(prefix) and not k.startswith(ignore_prefixes)]
    unexpected = [k for k in considered if k not in by_name]
    missing = [e.name for e in table if e.name not in state]
    wrong = []  # (name, file shape, torch shape the model needs), in the file's order
    for name in considered:
        if name in by_name:
            e = by_name[name]
            want = torch_shape(e, abstract[e.path].shape)
            got = tensor_files.shape_of(state, name)
            if got != want:
                wrong.append((e, got, want))
    problems = []
    if wrong:
        e, got, want = wrong[0]
        more = f" ({len(wrong) - 1} more tensors differ in shape)" if len(wrong) > 1 else ""
        problems.append(
            f"tensor {e.name!r} has shape {got} but the model expects {want} "
            f"(ldm_jax {'/'.join(e.path)} {tuple(abstract[e.path].shape)}){more}"
        )
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_names(unexpected)}")
    if problems:
        raise UserError(f"{what} weights do not match the model: {'; '.join(problems)}. {hint}")
    host = jax.local_devices(backend="cpu")[0]
    flat = {}
    for e in table:  # one tensor of `state` read at a time (a file's are read on access)
        value = LAYOUTS[e.layout][1](np.asarray(state[e.name]))
        flat[e.path] = jax.device_put(np.asarray(value, dtype=abstract[e.path].dtype), host)
    return {"params": traverse_util.unflatten_dict(flat)}


def export_state(
    params: Any,
    table: list[Entry],
    abstract: Mapping[Path, jax.ShapeDtypeStruct],
    *,
    what: str,
    dtype: Any = None,
) -> dict[str, np.ndarray]:
    """{torch name: numpy array} of `params` ({'params': tree} or the tree, boxed or not).

    Arrays may be non-contiguous views (`save_safetensors` makes them contiguous); `dtype`
    casts every tensor (e.g. np.float16 for a half-precision file).
    """
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    missing = sorted("/".join(p) for p in set(abstract) - set(flat))
    unexpected = sorted("/".join(p) for p in set(flat) - set(abstract))
    if missing or unexpected:
        found = [f"missing ({len(missing)}): {_names(missing)}"] if missing else []
        found += [f"unexpected ({len(unexpected)}): {_names(unexpected)}"] if unexpected else []
        raise UserError(f"{what}: the params are not those of the model; {'; '.join(found)}")
    out = {}
    for e in table:
        value = np.asarray(flat[e.path])
        if value.shape != tuple(abstract[e.path].shape):
            raise UserError(
                f"{what}: param {'/'.join(e.path)} has shape {value.shape} but the model "
                f"expects {tuple(abstract[e.path].shape)}"
            )
        value = LAYOUTS[e.layout][0](value)
        out[e.name] = value if dtype is None else value.astype(dtype)
    return out
