"""Device mesh and logical-axis rules: the only module that knows physical mesh axes.

Models name logical axes (`conv_out`, `embed`, `batch`, ...); the rules below map them to
the mesh axes `data`, `fsdp` and `tensor`. Training code asks this module for shardings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis. Parameters are replicated for now (pure data parallelism);
# the batch is split over every data-like axis.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("conv_in", None),
    ("conv_out", None),
    ("embed", None),
    ("mlp", None),
    ("heads", None),
    ("vocab", None),
    ("norm", None),
    ("codebook", None),
    ("latent", None),
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
    """Builds the (data, fsdp, tensor) mesh from `config.mesh` with Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape((mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor), len(devices))
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(
            shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
        )
    # A sub-mesh (e.g. one device of eight in tests): jax.make_mesh insists on all devices.
    return Mesh(
        np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(shape)
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data-like axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_size_per_shard(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def logical_to_sharding(abstract_tree, mesh: Mesh):
    """Shardings for a tree whose leaves may be flax `nn.Partitioned` boxes.

    Unannotated leaves are replicated. Returns a tree of NamedSharding with the boxes
    removed, matching `nn.unbox(tree)`.
    """
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)
