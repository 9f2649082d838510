"""Samplers as pure functions: one `lax.scan` over a precomputed timestep grid each.

Every sampler has the signature

    sample(model_fn, sched, shape_or_x_T, rng, *, parameterization="eps", **opts) -> x_0

where `model_fn(x_t, t)` maps a batch [B, ...] and int32 training timesteps [B] to the
raw model output (eps, x0 or v, as `parameterization` says) and `shape_or_x_T` is either
a shape (x_T ~ N(0, I) drawn from `rng`) or x_T itself. Per-step noise comes from
`fold_in(rng, step)`, so a seed fixes the samples. The timestep grids depend only on
Python ints, so a whole sampler traces into one jit-able graph; batch sharding is left
to the caller's jit shardings (nothing here assumes one device).

`skip` (keyword, every sampler) starts partway down the grid: the first `skip` grid steps
are left out and `shape_or_x_T` is x at grid point `skip`, i.e. at `timesteps(...)[skip]`.
That is image-to-image ("SDEdit"): noise an encoded image to that timestep, then denoise;
`img2img_start` turns a strength in (0, 1] into (skip, timestep) as diffusers does.

`known` (keyword, every sampler) is mask guidance, the reference DDIM's `mask`/`x0`
options for any sampler: a `Known(keep, x0)` replaces, at the start of every step at
timestep t, the kept region (keep = 1) of x by x0 noised to t with fresh noise, and at
the end by x0 itself; so an unconditional model fills the rest consistently (inpainting).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.objectives import model_output_to_eps_x0
from ldm_jax.diffusion.schedules import DiffusionSchedule

DDIM_SPACINGS = ("uniform", "quad", "leading")
FINAL_SIGMAS = ("zero", "sigma_min")

# Adams-Bashforth coefficients of PLMS for (e_t, e_{t-1}, e_{t-2}, e_{t-3}), by how many
# earlier eps are available (1, 2, 3+); the first step uses pseudo improved Euler.
_PLMS_COEFS = np.array(
    [
        [3 / 2, -1 / 2, 0.0, 0.0],
        [23 / 12, -16 / 12, 5 / 12, 0.0],
        [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    ],
    dtype=np.float32,
)


class Known(NamedTuple):
    """Mask guidance: `keep` (broadcastable to x, in {0, 1}; 1 where x0 is known) and the
    known clean sample `x0` (x's shape)."""

    keep: jax.Array
    x0: jax.Array


_KNOWN_TAG = 2  # fold_in tag of the mask guidance's noise (beside _start's split)


def _impose(known: Known | None, sched, x, t, rng):
    """x with its kept region replaced by known.x0 noised to timestep t (q_sample)."""
    if known is None:
        return x
    noise = jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(rng, _KNOWN_TAG), t), x.shape, x.dtype
    )
    abar = sched.alphas_cumprod[t]
    noised = jnp.sqrt(abar) * known.x0 + jnp.sqrt(1.0 - abar) * noise
    return known.keep * noised + (1.0 - known.keep) * x


def _finish(known: Known | None, x):
    """The sample with its kept region exactly known.x0."""
    if known is None:
        return x
    return known.keep * known.x0 + (1.0 - known.keep) * x


def _start(shape_or_x_T, rng):
    """(x_T, key for per-step noise)."""
    key_T, key_steps = jax.random.split(rng)
    if isinstance(shape_or_x_T, tuple | list):
        x = jax.random.normal(key_T, tuple(shape_or_x_T), dtype=jnp.float32)
    else:
        x = jnp.asarray(shape_or_x_T)
    return x, key_steps


def _predict(model_fn, sched, x, t, parameterization):
    """(eps, x0) predictions at the scalar timestep t for the whole batch."""
    tb = jnp.full((x.shape[0],), t, dtype=jnp.int32)
    out = model_fn(x, tb).astype(x.dtype)
    return model_output_to_eps_x0(sched, out, x, tb, parameterization)


def _check_steps(num_steps: int, num_timesteps: int) -> None:
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")


def ddpm(
    model_fn: Callable,
    sched: DiffusionSchedule,
    shape_or_x_T,
    rng,
    *,
    parameterization: str = "eps",
    clip_denoised: bool = False,
    skip: int = 0,
    known: Known | None = None,
):
    """Ancestral sampling through all T steps with the posterior q(x_{t-1} | x_t, x0_hat).

    clip_denoised=False is LatentDiffusion's choice (latents are not bounded to [-1, 1]).
    The last step (t = 0) adds no noise and returns the posterior mean.
    """
    x, key = _start(shape_or_x_T, rng)
    _check_skip(skip, sched.num_timesteps)

    def step(x, t):
        x = _impose(known, sched, x, t, rng)
        _, x0 = _predict(model_fn, sched, x, t, parameterization)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
        mean = sched.posterior_mean_coef1[t] * x0 + sched.posterior_mean_coef2[t] * x
        std = jnp.where(t > 0, jnp.exp(0.5 * sched.posterior_log_variance_clipped[t]), 0.0)
        noise = jax.random.normal(jax.random.fold_in(key, t), x.shape, x.dtype)
        return mean + std * noise, None

    ts = jnp.arange(sched.num_timesteps - 1 - skip, -1, -1, dtype=jnp.int32)
    x, _ = jax.lax.scan(step, x, ts)
    return _finish(known, x)


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: str = "uniform") -> np.ndarray:
    """Ascending training timesteps of the DDIM grid, as LDM's `make_ddim_timesteps`.

    "uniform" is range(0, T, T // num_steps) + 1, so it has more than num_steps entries
    when num_steps does not divide T (the reference's behaviour: 31 steps for 30);
    "leading" is diffusers' spacing, arange(num_steps) * (T // num_steps) + 1 (its
    steps_offset of 1), exactly num_steps entries, the same grid when num_steps divides T;
    "quad" is int(linspace(0, sqrt(0.8 T), num_steps)^2) + 1 and may repeat small
    timesteps.
    """
    _check_steps(num_steps, num_timesteps)
    if spacing == "uniform":
        ts = np.arange(0, num_timesteps, num_timesteps // num_steps)
    elif spacing == "leading":
        ts = np.arange(num_steps) * (num_timesteps // num_steps)
    elif spacing == "quad":
        ts = (np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(np.int64)
    else:
        raise ValueError(f"unknown DDIM spacing {spacing!r}; valid: {', '.join(DDIM_SPACINGS)}")
    # The +1 makes the last step land on abar_0 (the reference's "final alpha" offset).
    ts = ts + 1
    if ts[-1] >= num_timesteps:
        raise ValueError(
            f"{spacing} DDIM grid for T={num_timesteps}, num_steps={num_steps} reaches t={ts[-1]}"
            " after the reference's +1 offset (past the last timestep); use other num_steps"
        )
    return ts.astype(np.int32)


def _ddim_alphas(sched, ts):
    """(abar_t, abar_prev) on the grid, the last step ending at abar_0 as in LDM."""
    abar = sched.alphas_cumprod
    a_t = abar[ts]
    a_prev = jnp.concatenate([abar[:1], abar[ts[:-1]]])
    return a_t, a_prev


def ddim(
    model_fn: Callable,
    sched: DiffusionSchedule,
    shape_or_x_T,
    rng,
    *,
    parameterization: str = "eps",
    num_steps: int = 50,
    eta: float = 0.0,
    spacing: str = "uniform",
    skip: int = 0,
    known: Known | None = None,
):
    """DDIM (Song et al. 2021); eta = 0 deterministic, eta = 1 DDPM-like variance."""
    ts = ddim_timesteps(sched.num_timesteps, num_steps, spacing)
    _check_skip(skip, len(ts))
    a_t, a_prev = _ddim_alphas(sched, ts)
    sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
    deterministic = isinstance(eta, int | float) and eta == 0
    x, key = _start(shape_or_x_T, rng)

    def step(x, xs):
        i, t, a_t, a_prev, sigma = xs
        x = _impose(known, sched, x, t, rng)
        eps, x0 = _predict(model_fn, sched, x, t, parameterization)
        # Rounding can push 1 - a_prev - sigma^2 a hair below 0 when they are equal.
        dir_coef = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0))
        x = jnp.sqrt(a_prev) * x0 + dir_coef * eps
        if not deterministic:
            x = x + sigma * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return x, None

    n = len(ts)
    xs = (
        jnp.arange(n, dtype=jnp.int32),
        jnp.asarray(ts[::-1]),
        a_t[::-1],
        a_prev[::-1],
        sigma[::-1],
    )
    x, _ = jax.lax.scan(step, x, jax.tree.map(lambda a: a[skip:], xs))
    return _finish(known, x)


def plms(
    model_fn: Callable,
    sched: DiffusionSchedule,
    shape_or_x_T,
    rng,
    *,
    parameterization: str = "eps",
    num_steps: int = 50,
    spacing: str = "uniform",
    skip: int = 0,
    known: Known | None = None,
):
    """Pseudo linear multistep (Liu et al. 2022), as LDM's PLMSSampler.

    Step 1 is pseudo improved Euler (two model calls: the DDIM step's eps averaged with
    the eps at its result); later steps are Adams-Bashforth of order 2, 3, then 4 on
    the stored eps, each applied through the DDIM (eta = 0) update.
    """
    ts = ddim_timesteps(sched.num_timesteps, num_steps, spacing)
    _check_skip(skip, len(ts))
    a_t, a_prev = _ddim_alphas(sched, ts)
    t_rev, a_t, a_prev = jnp.asarray(ts[::-1])[skip:], a_t[::-1][skip:], a_prev[::-1][skip:]
    ts = ts[: len(ts) - skip]  # the grid points still to visit
    x, _ = _start(shape_or_x_T, rng)

    def eps_at(x, t):
        return _predict(model_fn, sched, x, t, parameterization)[0]

    def ddim_update(x, e, a_t, a_prev):
        x0 = (x - jnp.sqrt(1.0 - a_t) * e) / jnp.sqrt(a_t)
        return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * e

    # First step; the reference's t_next is the next grid point (itself if there is none).
    x = _impose(known, sched, x, t_rev[0], rng)
    e0 = eps_at(x, t_rev[0])
    t_next = t_rev[1] if len(ts) > 1 else t_rev[0]
    e_next = eps_at(ddim_update(x, e0, a_t[0], a_prev[0]), t_next)
    x = ddim_update(x, 0.5 * (e0 + e_next), a_t[0], a_prev[0])

    def step(carry, xs):
        x, e1, e2, e3 = carry  # the three most recent eps, newest first
        t, a_t, a_prev, c = xs
        x = _impose(known, sched, x, t, rng)
        e = eps_at(x, t)
        e_prime = c[0] * e + c[1] * e1 + c[2] * e2 + c[3] * e3
        return (ddim_update(x, e_prime, a_t, a_prev), e, e1, e2), None

    n_rest = len(ts) - 1
    coefs = _PLMS_COEFS[np.minimum(np.arange(1, n_rest + 1), 3) - 1]
    zeros = jnp.zeros_like(e0)
    xs = (t_rev[1:], a_t[1:], a_prev[1:], jnp.asarray(coefs))
    (x, *_), _ = jax.lax.scan(step, (x, e0, zeros, zeros), xs)
    return _finish(known, x)


def dpm_solver_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """Descending grid of diffusers' "linspace" spacing: round(linspace(0, T-1, n+1))[::-1][:-1]."""
    _check_steps(num_steps, num_timesteps)
    grid = np.linspace(0, num_timesteps - 1, num_steps + 1).round()[::-1][:-1]
    return grid.astype(np.int32)


def dpm_solver_pp_2m(
    model_fn: Callable,
    sched: DiffusionSchedule,
    shape_or_x_T,
    rng,
    *,
    parameterization: str = "eps",
    num_steps: int = 20,
    final_sigma: str = "zero",
    skip: int = 0,
    known: Known | None = None,
):
    """DPM-Solver++(2M) (Lu et al. 2022) in data prediction, as diffusers'
    DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint", lower_order_final=True, timestep_spacing="linspace").

    Steps are uniform in t and sized in lambda = log(alpha / sigma). The first step is
    first order (no history); so is the last when final_sigma == "zero" (diffusers'
    default: the last step lands on sigma = 0, i.e. returns that step's x0 prediction)
    or when fewer than 15 steps are taken. final_sigma="sigma_min" ends at abar_0.
    """
    if final_sigma not in FINAL_SIGMAS:
        raise ValueError(f"unknown final_sigma {final_sigma!r}; valid: {', '.join(FINAL_SIGMAS)}")
    ts = dpm_solver_timesteps(sched.num_timesteps, num_steps)
    _check_skip(skip, len(ts))
    n = len(ts)
    abar = sched.alphas_cumprod
    alpha_s, sigma_s = jnp.sqrt(abar[ts]), jnp.sqrt(1.0 - abar[ts])
    if final_sigma == "zero":
        alpha_end, sigma_end = jnp.ones((1,)), jnp.zeros((1,))
    else:
        alpha_end, sigma_end = jnp.sqrt(abar[:1]), jnp.sqrt(1.0 - abar[:1])
    alpha_t = jnp.concatenate([alpha_s[1:], alpha_end])
    sigma_t = jnp.concatenate([sigma_s[1:], sigma_end])
    lam_s = jnp.log(alpha_s) - jnp.log(sigma_s)
    lam_t = jnp.log(alpha_t) - jnp.log(sigma_t)  # +inf at a zero final sigma
    h = lam_t - lam_s
    h_prev = lam_s - jnp.concatenate([lam_s[:1], lam_s[:-1]])  # step before; unused at i=0

    idx = np.arange(n)
    last_first_order = final_sigma == "zero" or n < 15
    # The first step taken has no history: first order, also after a skip (diffusers'
    # img2img counts the steps taken, while "n < 15" is the whole grid's length).
    second = (idx >= skip + 1) & ~((idx == n - 1) & last_first_order)
    phi = jnp.expm1(-h)  # exp(-h) - 1, exactly -1 at h = inf
    c_x = sigma_t / sigma_s
    c_d0 = -alpha_t * phi
    # Midpoint correction -0.5 alpha_t phi D1 with D1 = (h / h_prev)(m0 - m1); the masked
    # entries may be inf (h = inf) and are discarded by the where.
    safe_prev = jnp.where(second, h_prev, 1.0)
    c_d1 = jnp.where(second, -0.5 * alpha_t * phi * h / safe_prev, 0.0)
    x, _ = _start(shape_or_x_T, rng)

    def step(carry, xs):
        x, m_prev = carry
        t, c_x, c_d0, c_d1 = xs
        x = _impose(known, sched, x, t, rng)
        _, m = _predict(model_fn, sched, x, t, parameterization)
        x = c_x * x + c_d0 * m + c_d1 * (m - m_prev)
        return (x, m), None

    xs = jax.tree.map(lambda a: a[skip:], (jnp.asarray(ts), c_x, c_d0, c_d1))
    (x, _), _ = jax.lax.scan(step, (x, jnp.zeros_like(x)), xs)
    return _finish(known, x)


def _check_skip(skip: int, n: int) -> None:
    if not 0 <= skip < n:
        raise ValueError(f"skip must be in [0, {n - 1}] for this grid of {n} steps, got {skip}")


def timesteps(name: str, num_timesteps: int, *, num_steps: int = 50, spacing: str = "uniform"):
    """The descending training timesteps at which sampler `name` calls the model (the
    first call of each step; PLMS's first step also calls it at the next grid point)."""
    if name == "ddpm":
        return np.arange(num_timesteps - 1, -1, -1, dtype=np.int32)
    if name in ("ddim", "plms"):
        return ddim_timesteps(num_timesteps, num_steps, spacing)[::-1]
    if name == "dpm_solver_pp_2m":
        return dpm_solver_timesteps(num_timesteps, num_steps)
    get_sampler(name)  # unknown name -> the error listing the valid ones
    raise ValueError(f"no timestep grid for sampler {name!r}")


def img2img_start(grid: np.ndarray, strength: float) -> tuple[int, int]:
    """(skip, timestep) for image-to-image at `strength` in (0, 1]: the last
    int(len(grid) x strength) steps of the descending grid are taken, starting from the
    image noised to the first of them (diffusers' img2img rule; strength 1 starts from
    the grid's top, close to pure noise)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    taken = int(len(grid) * strength)
    if taken < 1:
        raise ValueError(
            f"strength {strength} takes no step of {len(grid)}: raise it to at least "
            f"{1 / len(grid):.3g} or sample with more steps"
        )
    skip = len(grid) - taken
    return skip, int(grid[skip])


SAMPLERS: dict[str, Callable] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "plms": plms,
    "dpm_solver_pp_2m": dpm_solver_pp_2m,
}


def get_sampler(name: str) -> Callable:
    """The sampler registered under `name`; the error lists the valid names."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(
            f"unknown sampler {name!r}; valid: {', '.join(sorted(SAMPLERS))}"
        ) from None


def options(sampling) -> dict:
    """The keyword options sampler `sampling.sampler` takes from a sampling config: the
    step count for all but DDPM (which runs every training timestep), the grid's spacing
    for DDIM and PLMS (configs from before it existed have the reference's), eta for DDIM."""
    opts = {}
    if sampling.sampler != "ddpm":
        opts["num_steps"] = int(sampling.steps)
    if sampling.sampler in ("ddim", "plms"):
        opts["spacing"] = str(sampling.get("spacing", "uniform"))
    if sampling.sampler == "ddim":
        opts["eta"] = float(sampling.eta)
    return opts


def sampling_grid(sampling, num_timesteps: int) -> np.ndarray:
    """The timestep grid a sampling config runs (see `timesteps`)."""
    opts = {k: v for k, v in options(sampling).items() if k != "eta"}
    return timesteps(sampling.sampler, num_timesteps, **opts)
