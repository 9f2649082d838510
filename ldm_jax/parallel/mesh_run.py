"""A run on a mesh: where a run's arrays live and how host rows get there and back.

One object, made once per command or training run and shared by the loop, the latent
cache, sampling, evaluation and the evaluators:

    host rows (this process's share) --to_global--> global arrays sharded over the batch
    host tree (frozen params)        --place-----> replicated on every device
    global batch-sharded array       --local_rows / all_rows--> numpy on the host
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from ldm_jax.errors import UserError
from ldm_jax.parallel import mesh as mesh_lib


class MeshRun:
    def __init__(self, mesh):
        self.mesh = mesh
        self.batch_sharding = mesh_lib.batch_sharding(mesh)
        self.replicated = mesh_lib.replicated(mesh)
        self.batch_shards = mesh_lib.batch_size_per_shard(mesh)
        self.frozen = {}  # frozen params (first stage, text encoder), replicated

    @classmethod
    def from_config(cls, mesh_cfg) -> MeshRun:
        return cls(mesh_lib.make_mesh(mesh_cfg))

    def check_batch(self, name: str, batch_size: int) -> None:
        """A global batch must split evenly over the batch shards and the processes."""
        procs = jax.process_count()
        if batch_size < 1 or batch_size % self.batch_shards or batch_size % procs:
            raise UserError(
                f"{name}={batch_size} must be a positive multiple of the {self.batch_shards} "
                f"batch shards of the mesh {dict(self.mesh.shape)} and the {procs} processes; "
                f"change {name} or config.mesh."
            )

    # ----- host -> devices -----------------------------------------------------------------
    def to_global(self, local: dict) -> dict:
        """{name: this process's rows} -> {name: global array sharded over the batch}."""
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local.items()
        }

    def place(self, tree):
        """A pytree replicated on every device of the mesh. Through host memory: a
        single-device array cannot move onto a mesh that spans other processes' devices."""
        return jax.device_put(jax.device_get(tree), self.replicated)

    def place_frozen(self, tree) -> dict:
        self.frozen = self.place(tree)
        return self.frozen

    def jit_on_batch(self, fn):
        """fn(frozen, x) -> a jitted function of a batch-sharded x, the frozen params bound."""
        jitted = jax.jit(fn, in_shardings=(self.replicated, self.batch_sharding))
        return lambda x: jitted(self.frozen, x)

    # ----- devices -> host -----------------------------------------------------------------
    def local_rows(self, array) -> np.ndarray:
        """This process's rows of a batch-sharded global array, in its local-data order."""
        if jax.process_count() == 1:
            return np.asarray(array)
        spec = jax.sharding.PartitionSpec(mesh_lib.BATCH_AXES)
        return np.asarray(multihost_utils.global_array_to_host_local_array(array, self.mesh, spec))

    @staticmethod
    def all_rows(array) -> np.ndarray:
        """Every row of a global array (or of each process's host rows), on every process."""
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
