"""A task's train step, jitted over a mesh: the one place that pairs a task's state with
its shardings, shared by the training loop, the benches and the tests."""

from __future__ import annotations

import jax

from ldm_jax.parallel import mesh as mesh_lib


def state_shardings(task, mesh, rng=None):
    """NamedShardings of the task's (unboxed) state from its logical-axis annotations."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return mesh_lib.logical_to_sharding(jax.eval_shape(task.init_state, rng), mesh)


def jit_train_step(task, mesh, shardings, *, donate: bool = True):
    """step(state, batch, rng, frozen) -> (state, metrics): state sharded by `shardings`,
    the batch over the data-like axes, rng / frozen params / metrics replicated."""
    rep, data = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
    return jax.jit(
        task.train_step,
        in_shardings=(shardings, data, rep, rep),
        out_shardings=(shardings, rep),
        donate_argnums=0 if donate else (),
    )
