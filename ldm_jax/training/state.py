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
    """`pred ? on_true : on_false` for two trees of equal structure (pred a scalar).

    A `lax.cond`, not a `jnp.where` per leaf: XLA fuses a per-leaf select with the
    computation of its inputs and, with a predicate that depends on every gradient,
    compiles the diffusion step 3-4x slower (45 s vs 13 s for the toy UNet on CPU).
    """
    return jax.lax.cond(pred, lambda: on_true, lambda: on_false)


def record_nonfinite(bad_step, step, finite):
    """First step whose loss or gradients were not finite (-1 while none was)."""
    return jnp.where((bad_step < 0) & ~finite, step, bad_step)


def advance(state, candidate, finite):
    """The next train state: `candidate` if the step was finite, else `state` unchanged,
    with the step counted and a non-finite step recorded (`bad_step`, `skipped`).
    A non-finite step thus never reaches the parameters."""
    return select_tree(finite, candidate, state).replace(
        step=state.step + 1,
        bad_step=record_nonfinite(state.bad_step, state.step, finite),
        skipped=state.skipped + (~finite).astype(jnp.int32),
    )
