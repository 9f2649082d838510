"""Train-step time of the quickstart UNet against the number of (fake CPU) devices.

    python bench/step_vs_devices.py [--devices 1 2 4 8] [--batch 32]

The same global batch on a data-parallel mesh of 1..8 fake devices on this machine's
cores: the figure is the overhead of partitioning and collectives, not a speed-up (fake
devices share the same cores). Each count runs in its own process (the device count is
fixed when JAX starts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(n: int, batch: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import linen as nn

    from ldm_jax import runtime
    from ldm_jax.config_loader import load_config
    from ldm_jax.diffusion import objectives, schedules
    from ldm_jax.models import unet_configs
    from ldm_jax.parallel import mesh as mesh_lib

    runtime.setup()
    u = load_config("configs/diffusion/quickstart_digits.py", lock=False).model
    u.in_channels, u.out_channels, u.context_dim = 3, 3, 64
    model = unet_configs.from_config(u)
    mesh = mesh_lib.mesh_of()
    sched = schedules.make_schedule({})
    x = jnp.zeros((batch, 8, 8, 3))
    ctx = jnp.zeros((batch, 1, 64))
    t0 = jnp.zeros((batch,), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t0, context=ctx))
    shard = mesh_lib.logical_to_sharding(boxed, mesh)["params"]
    tx = optax.adamw(1e-4)
    data, rep = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
    with jax.set_mesh(mesh):
        params = jax.jit(lambda r: nn.unbox(model.init(r, x, t0, context=ctx))["params"],
                         out_shardings=shard)(jax.random.PRNGKey(0))  # fmt: skip
        opt = tx.init(params)

        @jax.jit
        def step(params, opt, z0, ctx, rng):
            r1, r2 = jax.random.split(rng)
            tt = objectives.sample_timesteps(r1, batch, 1000)
            noise = jax.random.normal(r2, z0.shape)

            def loss_fn(p):
                out = model.apply({"params": p}, objectives.q_sample(sched, z0, tt, noise), tt, ctx)
                return objectives.diffusion_loss(sched, out, z0, noise, tt)[0]

            loss, g = jax.value_and_grad(loss_fn)(params)
            u, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, u), opt, loss

        z0 = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), x.shape), data)
        ctx = jax.device_put(ctx, data)
        rng = jax.device_put(jax.random.PRNGKey(2), rep)
        params, opt, loss = step(params, opt, z0, ctx, rng)
        jax.block_until_ready(loss)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            params, opt, loss = step(params, opt, z0, ctx, rng)
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - t)
    return {"devices": n, "step_s": statistics.median(times)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.batch, args.repeats)))
        return
    print(f"quickstart UNet train step, global batch {args.batch}, data-parallel fake devices")
    print(f"{'devices':>7} {'step s':>7} {'vs 1':>6}")
    base = None
    for n in args.devices:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        cmd = [sys.executable, __file__, f"--child={n}", f"--batch={args.batch}",
               f"--repeats={args.repeats}"]  # fmt: skip
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        base = base or r["step_s"]
        print(f"{n:>7} {r['step_s']:7.3f} {r['step_s'] / base:6.2f}", flush=True)


if __name__ == "__main__":
    main()
