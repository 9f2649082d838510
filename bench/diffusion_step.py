"""UNet train-step throughput and DDIM-50 sampling time, for the quickstart and SD-size UNets.

    python bench/diffusion_step.py                  # both
    python bench/diffusion_step.py --only quickstart

The train step is the UNet part of the second stage (eps loss, AdamW; no EMA copy, so
that the SD-size UNet's fp32 params + grads + moments fit in 24 GiB) on random
latents and context; sampling is 50 DDIM steps with classifier-free guidance (one doubled
batch per step), one jitted lax loop. Figures exclude compilation.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from ldm_jax import runtime
from ldm_jax.config_loader import load_config
from ldm_jax.diffusion import guidance, objectives, samplers, schedules
from ldm_jax.models import unet_configs

CASES = {
    # name: (unet config, latent side, channels, context (len, dim), train batch)
    "quickstart": ("quickstart", 8, 3, (1, 64), 32),
    "sd_unet": ("sd-v1", 32, 4, (77, 768), 1),
}


def _unet(name):
    if name == "quickstart":
        u = load_config("configs/diffusion/quickstart_digits.py", lock=False).model
        u.in_channels, u.out_channels, u.context_dim = 3, 3, 64
        return unet_configs.from_config(u)
    kw = dict(unet_configs.PAPER_UNETS[name])
    kw.pop("image_size")
    return unet_configs.from_config(kw)


def _timed(fn, *args, repeats):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_case(name, repeats):
    unet_name, side, ch, (ctx_len, ctx_dim), batch = CASES[name]
    model = _unet(unet_name)
    sched = schedules.make_schedule({"linear_start": 0.00085, "linear_end": 0.012})
    x = jnp.zeros((batch, side, side, ch))
    ctx = jnp.zeros((batch, ctx_len, ctx_dim))
    t0 = jnp.zeros((batch,), jnp.int32)
    t = time.perf_counter()
    params = jax.jit(lambda r: nn.unbox(model.init(r, x, t0, context=ctx))["params"])(
        jax.random.PRNGKey(0)
    )
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t
    tx = optax.adamw(1e-4, weight_decay=0.01)
    opt = tx.init(params)

    # Donated params and moments: the SD-size UNet's fp32 params, grads and two Adam
    # moments take ~14 GiB, and a second copy of params + moments would not fit in 24.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt, rng):
        r1, r2, r3 = jax.random.split(rng, 3)
        z0 = jax.random.normal(r1, x.shape)
        tt = objectives.sample_timesteps(r2, batch, 1000)
        noise = jax.random.normal(r3, x.shape)

        def loss_fn(p):
            out = model.apply({"params": p}, objectives.q_sample(sched, z0, tt, noise), tt, ctx)
            return objectives.diffusion_loss(sched, out, z0, noise, tt)[0]

        loss, g = jax.value_and_grad(loss_fn)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, loss

    t = time.perf_counter()
    params, opt, loss = step(params, opt, jax.random.PRNGKey(1))
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        params, opt, loss = step(params, opt, jax.random.PRNGKey(i))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    del opt

    def model_fn(z, tt, c):
        return model.apply({"params": params}, z, tt, c)

    @jax.jit
    def sample(rng):
        fn = guidance.guided_model_fn(model_fn, ctx[:1], jnp.zeros_like(ctx[:1]), 3.0)
        return samplers.ddim(fn, sched, (1, side, side, ch), rng, num_steps=50)

    sample_s = _timed(sample, jax.random.PRNGKey(2), repeats=max(1, repeats // 3))
    return dict(
        case=name,
        batch=batch,
        init_s=init_s,
        compile_s=compile_s,
        step_s=step_s,
        img_s=batch / step_s,
        sample_s=sample_s,
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=sorted(CASES), action="append")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runtime.setup()
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}")
    head = f"{'case':>11} {'batch':>5} {'init s':>7} {'compile s':>9} {'step s':>7} {'img/s':>7}"
    print(head + f" {'DDIM-50 s/img':>13}")
    for name in args.only or list(CASES):
        r = bench_case(name, args.repeats)
        print(
            f"{r['case']:>11} {r['batch']:>5} {r['init_s']:7.1f} {r['compile_s']:9.1f} "
            f"{r['step_s']:7.3f} {r['img_s']:7.2f} {r['sample_s']:13.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
