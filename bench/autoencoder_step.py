"""First-stage train-step throughput: images/s and step time.

    python bench/autoencoder_step.py                 # quickstart (batch 16, 32^2) and kl_f8 (batch 1, 256^2)
    python bench/autoencoder_step.py --only quickstart --steps 20

Times the full jitted step (autoencoder + LPIPS-VGG16 + PatchGAN, GAN terms on) on the
default devices, after compilation, and prints compile time, median step time and img/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import linen as nn

from ldm_jax import runtime
from ldm_jax.config_loader import load_config
from ldm_jax.models import lpips as lpips_lib
from ldm_jax.training.autoencoder import AutoencoderTask

CASES = {
    "quickstart": ("configs/autoencoder/quickstart.py", {}),
    "kl_f8": ("configs/autoencoder/kl_f8.py", {"batch_size": 1}),
}


def bench_case(name: str, steps: int) -> dict:
    path, overrides = CASES[name]
    config = load_config(path, lock=False)
    config.update(overrides)
    task = AutoencoderTask(config)
    t = time.perf_counter()
    state = jax.jit(lambda r: nn.unbox(task.init_state(r)))(jax.random.PRNGKey(0))
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t
    state = state.replace(step=jnp.asarray(config.loss.disc_start, jnp.int32))  # GAN on
    size, b = config.data.image_size, config.batch_size
    batch = {"image": jax.random.uniform(jax.random.PRNGKey(1), (b, size, size, 3), minval=-1)}
    frozen = {"lpips": lpips_lib.load_lpips_params()}
    step = jax.jit(task.train_step, donate_argnums=0)
    rng = jax.random.PRNGKey(2)
    t = time.perf_counter()
    state, metrics = step(state, batch, rng, frozen)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = step(state, batch, rng, frozen)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return dict(
        case=name, batch=b, size=size, init_s=init_s, compile_s=compile_s, step_s=med, img_s=b / med
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=sorted(CASES), action="append")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    runtime.setup()
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}")
    print(
        f"{'case':>11} {'batch':>5} {'size':>5} {'init s':>7} {'compile s':>9} {'step s':>7} {'img/s':>7}"
    )
    for name in args.only or list(CASES):
        r = bench_case(name, args.steps)
        print(
            f"{r['case']:>11} {r['batch']:>5} {r['size']:>5} {r['init_s']:7.1f} "
            f"{r['compile_s']:9.1f} {r['step_s']:7.3f} {r['img_s']:7.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
