"""Learning-rate schedules of the diffusion stage (`config.optim.schedule`).

constant        linear warm-up from 0 over `warmup_steps` (none if 0), then constant;
                the reference's LambdaLinearScheduler with f_max = f_min = 1
warmup_cosine   the reference's LambdaWarmUpCosineScheduler (inpainting_big): the
                multiplier of the learning rate rises linearly from `lr_start` to
                `lr_max` over `warmup_steps`, then follows a half cosine down to
                `lr_min` at `max_decay_steps`, and stays there
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

from ldm_jax.errors import UserError

SCHEDULES = ("constant", "warmup_cosine")


def default_cosine() -> ml_collections.ConfigDict:
    """The reference inpainting model's multipliers."""
    return ml_collections.ConfigDict(
        dict(lr_start=0.001, lr_max=0.1, lr_min=0.0001, max_decay_steps=50000)
    )


def make(optim_cfg, learning_rate: float):
    """step -> learning rate, as an optax schedule."""
    name = optim_cfg.get("schedule", "constant")
    warmup = int(optim_cfg.warmup_steps)
    if name == "constant":
        return optax.linear_schedule(
            0.0 if warmup else learning_rate, learning_rate, max(warmup, 1)
        )
    if name == "warmup_cosine":
        c = optim_cfg.cosine
        if not 0 <= warmup < int(c.max_decay_steps):
            raise UserError(
                f"config.optim.warmup_steps={warmup} must be below "
                f"config.optim.cosine.max_decay_steps={c.max_decay_steps}."
            )
        return lambda step: learning_rate * warmup_cosine_multiplier(step, warmup, c)
    raise UserError(f"config.optim.schedule={name!r}; valid: {list(SCHEDULES)}")


def warmup_cosine_multiplier(step, warmup: int, c):
    n = jnp.asarray(step, jnp.float32)
    rise = c.lr_start + (c.lr_max - c.lr_start) * n / max(warmup, 1)
    t = jnp.clip((n - warmup) / (c.max_decay_steps - warmup), 0.0, 1.0)
    fall = c.lr_min + 0.5 * (c.lr_max - c.lr_min) * (1.0 + jnp.cos(t * jnp.pi))
    return jnp.where(n < warmup, rise, fall)
