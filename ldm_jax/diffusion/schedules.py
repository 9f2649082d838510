"""Noise schedules: betas and every derived per-timestep array, precomputed once.

Everything is computed in float64 numpy (as the reference does) and stored as float32
jax arrays in a frozen pytree, so a schedule can be passed through `jax.jit` as an
ordinary argument while `num_timesteps` stays static.
"""

from __future__ import annotations

import math

import flax.struct
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "sqrt_linear", "sqrt", "cosine")


def make_betas(
    kind: str,
    num_timesteps: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Betas [T] in float64, following the LDM reference's `make_beta_schedule`.

    "linear" is LDM's "scaled linear" (linspace of square roots, squared), "sqrt_linear"
    the plain linspace, "sqrt" its square root, "cosine" Nichol & Dhariwal clipped at 0.999.
    """
    n = int(num_timesteps)
    if n < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if kind == "linear":
        betas = (
            np.linspace(math.sqrt(linear_start), math.sqrt(linear_end), n, dtype=np.float64) ** 2
        )
    elif kind == "sqrt_linear":
        betas = np.linspace(linear_start, linear_end, n, dtype=np.float64)
    elif kind == "sqrt":
        betas = np.linspace(linear_start, linear_end, n, dtype=np.float64) ** 0.5
    elif kind == "cosine":
        steps = np.arange(n + 1, dtype=np.float64) / n + cosine_s
        f = np.cos(steps / (1.0 + cosine_s) * np.pi / 2.0) ** 2
        abar = f / f[0]
        betas = np.clip(1.0 - abar[1:] / abar[:-1], 0.0, 0.999)
    else:
        raise ValueError(f"unknown beta schedule {kind!r}; valid: {', '.join(BETA_SCHEDULES)}")
    return betas


@flax.struct.dataclass
class DiffusionSchedule:
    """Per-timestep constants of a discrete DDPM, each float32 [T]."""

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray
    # Static: array shapes and sampler timestep grids are derived from it at trace time.
    num_timesteps: int = flax.struct.field(pytree_node=False, default=1000)

    @classmethod
    def from_betas(cls, betas, v_posterior: float = 0.0) -> DiffusionSchedule:
        """All derived arrays from betas [T]; v_posterior 0 gives beta_tilde (the LDM default)."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or np.any(betas <= 0) or np.any(betas >= 1):
            raise ValueError("betas must be a 1-D array with values in (0, 1)")
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = (1.0 - v_posterior) * betas * (1.0 - abar_prev) / (
            1.0 - abar
        ) + v_posterior * betas
        arrays = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=np.sqrt(abar),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
            posterior_variance=post_var,
            # beta_tilde_0 is 0: the floor keeps log finite, as the reference does.
            posterior_log_variance_clipped=np.log(np.maximum(post_var, 1e-20)),
            posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
            posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        )
        arrays = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in arrays.items()}
        return cls(**arrays, num_timesteps=int(betas.shape[0]))


def make_schedule(cfg) -> DiffusionSchedule:
    """Schedule from a ConfigDict (or dict) with the LDM keys.

    Keys: beta_schedule ("linear"), timesteps (1000), linear_start (1e-4),
    linear_end (2e-2), cosine_s (8e-3), v_posterior (0.0); defaults are the reference's.
    """
    get = cfg.get
    betas = make_betas(
        get("beta_schedule", "linear"),
        int(get("timesteps", 1000)),
        float(get("linear_start", 1e-4)),
        float(get("linear_end", 2e-2)),
        float(get("cosine_s", 8e-3)),
    )
    return DiffusionSchedule.from_betas(betas, float(get("v_posterior", 0.0)))
