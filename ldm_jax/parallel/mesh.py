"""Device mesh and logical-axis rules: the only module that knows physical mesh axes.

Models name logical axes (`conv_out`, `embed`, `batch`, ...); the rules below map them to
the mesh axes `data`, `fsdp` and `tensor`. Training code asks this module for shardings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis. The batch is split over every data-like axis; FSDP shards
# each weight's input side (conv_in / embed) over `fsdp`, tensor parallelism its output
# side (conv_out / mlp / heads) over `tensor`, so params, optimizer moments and EMA all
# shrink with both. A dimension that the mesh axis does not divide stays replicated
# (see `logical_to_sharding`), which is what happens to RGB convs and small norms.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", None),
    ("norm", None),
    ("codebook", "fsdp"),
    ("latent", None),
)


# Compute layout under FSDP: weights are stored split over `fsdp` (params, moments, EMA)
# and gathered whole for the matmuls/convs, still split over `tensor`; the gradient comes
# back reduce-scattered. Stating the gather explicitly (rather than leaving the choice to
# the SPMD partitioner) is the FSDP recipe, and it sidesteps a wrong conv gradient that
# XLA:CPU produced for the (2, 2, 2) mesh when the choice was left to it (smallest case
# seen: two stacked convs, the first's conv_out over tensor, the second's conv_in over
# fsdp, the batch over (data, fsdp): the first conv's gradient was off by ~1e-3).
COMPUTE_AXIS_RULES = tuple(
    (name, None if axes == "fsdp" else axes) for name, axes in LOGICAL_AXIS_RULES
)


def resolve_mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills the one -1 entry so that the product equals num_devices."""
    sizes = [int(s) for s in sizes]
    if sizes.count(-1) > 1:
        raise UserError(f"mesh sizes {sizes}: at most one axis may be -1 (fill).")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
        raise UserError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the {num_devices} devices; "
            "set config.mesh.data/fsdp/tensor so that their product is the device count "
            "(one of them may be -1 to fill)."
        )
    shape = tuple(num_devices // known if s == -1 else s for s in sizes)
    if math.prod(shape) != num_devices:
        raise UserError(
            f"mesh shape {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} devices but "
            f"{num_devices} are present; use -1 on one axis to fill."
        )
    return shape


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh from `config.mesh` with Auto axis types.

    `mesh.data/fsdp/tensor` are the sizes within a slice (one -1 fills); for a multi-slice
    TPU job `mesh.dcn_data/dcn_fsdp/dcn_tensor` (default 1) multiply them across slices,
    so that only the axes named there talk over the data-centre network.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = tuple(int(getattr(mesh_cfg, f"dcn_{a}", 1) or 1) for a in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if math.prod(dcn) > 1:
        return _multislice_mesh(mesh_cfg, dcn, devices, axis_types)
    shape = resolve_mesh_shape((mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor), len(devices))
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    # A sub-mesh (e.g. one device of eight in tests): jax.make_mesh insists on all devices.
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def mesh_of(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A mesh from its sizes (one may be -1: fill), over `devices` (default: all)."""
    return make_mesh(SimpleNamespace(data=data, fsdp=fsdp, tensor=tensor), devices)


def _multislice_mesh(mesh_cfg, dcn, devices, axis_types) -> Mesh:
    from jax.experimental import mesh_utils

    slices = {getattr(d, "slice_index", None) for d in devices}
    if None in slices or len(slices) != math.prod(dcn):
        raise UserError(
            f"config.mesh asks for {math.prod(dcn)} slices (dcn sizes "
            f"{dict(zip(MESH_AXES, dcn))}) but the devices come from "
            f"{'no multi-slice job' if None in slices else f'{len(slices)} slices'}; set "
            "mesh.dcn_data/dcn_fsdp/dcn_tensor to 1 or run on a multi-slice TPU job."
        )
    per_slice = len(devices) // len(slices)
    ici = resolve_mesh_shape((mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor), per_slice)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data-like axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_size_per_shard(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def logical_to_sharding(abstract_tree, mesh: Mesh):
    """Shardings for a tree whose leaves may be flax `nn.Partitioned` boxes.

    Unannotated leaves are replicated, and so is any dimension whose size the mesh axes it
    maps to do not divide. Returns a tree of NamedSharding with the boxes removed,
    matching `nn.unbox(tree)`.
    """
    specs = logical_specs(abstract_tree)
    shapes = nn.unbox(abstract_tree)

    def sharding(spec, leaf):
        axes = nn.logical_to_mesh_axes(tuple(spec), LOGICAL_AXIS_RULES) if spec else P()
        return NamedSharding(mesh, fit_spec(axes, np.shape(leaf), mesh))

    return jax.tree_util.tree_map(sharding, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """`spec` with every entry that does not divide its dimension (or names a size-1 mesh
    axis only) replaced by None."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        size = math.prod(mesh.shape[n] for n in names)
        out.append(entry if names and size > 1 and dim % size == 0 else None)
    return P(*out)


def bytes_per_device(abstract_tree, shardings) -> int:
    """Bytes one device holds of a tree of arrays (or ShapeDtypeStructs) placed by
    `shardings` (the largest shard of each leaf, so uneven splits are not undercounted)."""
    leaves = jax.tree_util.tree_leaves(nn.unbox(abstract_tree))
    total = 0
    for leaf, sharding in zip(leaves, jax.tree_util.tree_leaves(shardings), strict=True):
        shard = sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def gather_for_compute(tree, logical_specs):
    """Constrains weights (inside jit, under `jax.set_mesh`) to the compute layout:
    whole over `fsdp`, split over `tensor`. `logical_specs` is the matching tree of
    logical PartitionSpecs (`nn.get_partition_spec` of the boxed tree). A no-op without
    a mesh or with fsdp = 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or dict(mesh.shape).get("fsdp", 1) == 1:
        return tree

    def one(spec, x):
        axes = nn.logical_to_mesh_axes(tuple(spec), COMPUTE_AXIS_RULES) if spec else P()
        return jax.lax.with_sharding_constraint(x, fit_spec(axes, x.shape, mesh))

    return jax.tree_util.tree_map(
        one, logical_specs, tree, is_leaf=lambda x: isinstance(x, P) or x is None
    )


def logical_specs(boxed_tree):
    """Logical PartitionSpecs of a boxed (abstract) tree; unannotated leaves get P()."""
    return jax.tree_util.tree_map(
        lambda x: P(*x.names) if isinstance(x, nn.Partitioned) else P(),
        boxed_tree,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
