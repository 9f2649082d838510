"""Gradient accumulation: the mean loss and gradient of a batch, computed over k
microbatches in one `lax.scan` (activation memory of b / k examples).

Microbatch j holds rows j, j + k, j + 2k, ...: with the batch split over devices in
contiguous blocks, every device keeps its share of every microbatch, so no data moves.
Equal-size microbatches make the mean of microbatch means the batch mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ldm_jax.parallel import mesh as mesh_lib


def _microbatches(x, k: int):
    b = x.shape[0]
    x = jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)  # [k, b / k, ...]
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        spec = mesh_lib.fit_spec(P(None, mesh_lib.BATCH_AXES), x.shape, mesh)
        x = jax.lax.with_sharding_constraint(x, spec)
    return x


def mean_value_and_grad(loss_fn, params, batch, k: int, rng):
    """loss_fn(params, microbatch, rng) -> scalar mean over the microbatch.

    Returns (mean loss, mean gradient) over the k microbatches of `batch` (a pytree of
    arrays with a leading batch dimension divisible by k); microbatch j gets
    fold_in(rng, j). k = 1 is a plain value_and_grad with `rng` itself.
    """
    if k == 1:
        return jax.value_and_grad(loss_fn)(params, batch, rng)
    micro = jax.tree_util.tree_map(lambda x: _microbatches(x, k), batch)

    def body(carry, xs):
        j, mb = xs
        loss, grads = jax.value_and_grad(loss_fn)(params, mb, jax.random.fold_in(rng, j))
        total, acc = carry
        return (total + loss / k, jax.tree_util.tree_map(lambda a, g: a + g / k, acc, grads)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(k), micro)
    )
    return loss, grads
