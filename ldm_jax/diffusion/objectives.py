"""Forward process, parameterisation conversions (eps / x0 / v) and the training loss.

All functions take integer training timesteps `t` [B] and broadcast per-timestep
constants over the remaining axes of `x` [B, ...].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.schedules import DiffusionSchedule

PARAMETERIZATIONS = ("eps", "x0", "v")
LOSS_TYPES = ("l2", "l1")


def extract(arr: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """arr[t] reshaped to [B, 1, ..., 1] so it broadcasts against an ndim-array."""
    return jnp.take(arr, t, axis=0).reshape((-1,) + (1,) * (ndim - 1))


def _check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown parameterization {parameterization!r}; valid: {', '.join(PARAMETERIZATIONS)}"
        )


def q_sample(sched: DiffusionSchedule, x0, t, noise):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    a = extract(sched.sqrt_alphas_cumprod, t, x0.ndim)
    s = extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    return a * x0 + s * noise


def eps_to_x0(sched: DiffusionSchedule, x_t, t, eps):
    return (
        extract(sched.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
    )


def x0_to_eps(sched: DiffusionSchedule, x_t, t, x0):
    return (extract(sched.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0) / extract(
        sched.sqrt_recipm1_alphas_cumprod, t, x_t.ndim
    )


def v_target(sched: DiffusionSchedule, x0, t, noise):
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, as in SD 2)."""
    a = extract(sched.sqrt_alphas_cumprod, t, x0.ndim)
    s = extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    return a * noise - s * x0


def v_to_eps(sched: DiffusionSchedule, x_t, t, v):
    a = extract(sched.sqrt_alphas_cumprod, t, x_t.ndim)
    s = extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    return a * v + s * x_t


def v_to_x0(sched: DiffusionSchedule, x_t, t, v):
    a = extract(sched.sqrt_alphas_cumprod, t, x_t.ndim)
    s = extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    return a * x_t - s * v


def model_output_to_eps_x0(sched: DiffusionSchedule, out, x_t, t, parameterization: str):
    """(eps, x0) predictions from a raw model output of the given parameterisation."""
    _check_parameterization(parameterization)
    if parameterization == "eps":
        return out, eps_to_x0(sched, x_t, t, out)
    if parameterization == "x0":
        return x0_to_eps(sched, x_t, t, out), out
    return v_to_eps(sched, x_t, t, out), v_to_x0(sched, x_t, t, out)


def snr(sched: DiffusionSchedule, t):
    """Signal-to-noise ratio abar_t / (1 - abar_t), [B]."""
    abar = jnp.take(sched.alphas_cumprod, t, axis=0)
    return abar / (1.0 - abar)


def min_snr_weight(sched: DiffusionSchedule, t, gamma: float, parameterization: str):
    """Min-SNR-gamma loss weight (Hang et al. 2023) expressed for each target, [B].

    The x0 loss weighted by min(SNR, gamma) equals the eps loss weighted by
    min(SNR, gamma) / SNR and the v loss weighted by min(SNR, gamma) / (SNR + 1).
    """
    _check_parameterization(parameterization)
    s = snr(sched, t)
    clipped = jnp.minimum(s, gamma)
    if parameterization == "eps":
        return clipped / s
    if parameterization == "v":
        return clipped / (s + 1.0)
    return clipped


def diffusion_loss(
    sched: DiffusionSchedule,
    model_output,
    x0,
    noise,
    t,
    *,
    parameterization: str = "eps",
    loss_type: str = "l2",
    min_snr_gamma: float | None = None,
):
    """(scalar loss, per-example loss [B]).

    Per-example loss is the mean over all non-batch axes of |target - pred| (l1) or its
    square (l2), the reference's loss_simple, times the min-SNR weight when gamma is set;
    the scalar is always the batch mean of the per-example values. Computed in float32
    whatever the model's output dtype.
    """
    _check_parameterization(parameterization)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    x0 = x0.astype(jnp.float32)
    noise = noise.astype(jnp.float32)
    pred = model_output.astype(jnp.float32)
    if parameterization == "eps":
        target = noise
    elif parameterization == "x0":
        target = x0
    else:
        target = v_target(sched, x0, t, noise)
    diff = pred - target
    err = jnp.abs(diff) if loss_type == "l1" else jnp.square(diff)
    per_example = jnp.mean(err, axis=tuple(range(1, err.ndim)))
    if min_snr_gamma is not None:
        per_example = per_example * min_snr_weight(sched, t, min_snr_gamma, parameterization)
    return jnp.mean(per_example), per_example


def sample_timesteps(rng: jax.Array, batch: int, num_timesteps: int) -> jnp.ndarray:
    """Uniform training timesteps in [0, num_timesteps), int32 [batch]."""
    return jax.random.randint(rng, (batch,), 0, num_timesteps, dtype=jnp.int32)
