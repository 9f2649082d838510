"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a model function."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def guided_model_fn(model_fn: Callable, cond, uncond, scale) -> Callable:
    """A function of (x, t) returning uncond + scale * (cond - uncond).

    `model_fn(x, t, c)` takes a batch [B, ...], timesteps [B] and a pytree of conditioning
    whose leaves are batched along axis 0 (context arrays, class ids, ...); `uncond` has
    the same structure. Both branches run in ONE call on a doubled batch, as the
    reference does, so the network sees one large batch instead of two half-used ones.
    `scale` is a scalar or a per-example [B] array. A Python 1.0 skips the
    unconditional branch entirely.
    """
    if isinstance(scale, int | float) and float(scale) == 1.0:
        return lambda x, t: model_fn(x, t, cond)

    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)

    def fn(x, t):
        b = x.shape[0]
        out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
        out_c, out_u = out[:b], out[b:]
        s = jnp.asarray(scale, dtype=out.dtype)
        if s.ndim == 1:
            s = s.reshape((-1,) + (1,) * (out.ndim - 1))
        return out_u + s * (out_c - out_u)

    return fn
