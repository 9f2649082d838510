"""Helpers shared by the train states of both stages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def tree_norm(tree) -> jax.Array:
    return optax.tree.norm(tree)


def all_finite(*trees) -> jax.Array:
    leaves = [x for t in trees for x in jax.tree_util.tree_leaves(t)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def select_tree(pred, on_true, on_false):
    """Element-wise `pred ? on_true : on_false` over two trees of equal structure."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def record_nonfinite(bad_step, step, finite):
    """First step whose loss or gradients were not finite (-1 while none was)."""
    return jnp.where((bad_step < 0) & ~finite, step, bad_step)
