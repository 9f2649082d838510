"""Restore a run's checkpoint onto this job's mesh and print a digest of every array.

    python -m ldm_jax.inspect_checkpoint --workdir runs/kl_f8 [--step N] [--mesh 1,8,1]

Any process count and mesh may restore any checkpoint (the target is built from the
run's own config); the digest (SHA-256 over each array's bytes in tree order) is the same
whenever the restored values are, so comparing digests shows a restore is bit-exact.
Prints one JSON line on process 0: step, number of arrays and elements, digest, and the
mesh it restored onto. In a multi-process job run it on every process (launch/local.py).
"""

from __future__ import annotations

import hashlib
import json


def digest(state) -> tuple[str, int, int]:
    """(sha256 hex, arrays, elements) of a pytree of (possibly sharded) arrays."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    h, arrays, elements = hashlib.sha256(), 0, 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        value = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(value.dtype).encode() + str(value.shape).encode())
        h.update(np.ascontiguousarray(value).tobytes())
        arrays, elements = arrays + 1, elements + value.size
    return h.hexdigest(), arrays, elements


def run(args) -> dict:
    import jax

    from ldm_jax import runtime
    from ldm_jax.errors import UserError
    from ldm_jax.parallel import distributed
    from ldm_jax.parallel import mesh as mesh_lib
    from ldm_jax.training.restore import load_run

    distributed.initialize()

    def overrides(config):
        runtime.apply_config_overrides(config, args.config_overrides)
        if args.mesh:
            try:
                sizes = [int(v) for v in args.mesh.split(",")]
            except ValueError:
                raise UserError(
                    f"--mesh {args.mesh!r}: give data,fsdp,tensor sizes, e.g. 1,8,1"
                ) from None
            if len(sizes) != len(mesh_lib.MESH_AXES):
                raise UserError(
                    f"--mesh {args.mesh!r}: give 3 sizes (data,fsdp,tensor), e.g. 1,8,1"
                )
            config.mesh.update(dict(zip(mesh_lib.MESH_AXES, sizes)))

    _, _, state, step = load_run(args.workdir, args.step, overrides=overrides, sharded=True)
    mesh = jax.tree_util.tree_leaves(state)[0].sharding.mesh
    sha, arrays, elements = digest(state)
    out = {
        "step": step,
        "arrays": arrays,
        "elements": elements,
        "sha256": sha,
        "mesh": dict(mesh.shape),
        "processes": jax.process_count(),
    }
    if jax.process_index() == 0:
        print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> dict:
    from ldm_jax import runtime

    p = runtime.CommandParser(description=__doc__.splitlines()[0], config_overrides=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=-1, help="-1: the latest")
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes (default: the run's)")
    return runtime.run_command(run, p, argv)


if __name__ == "__main__":
    main()
