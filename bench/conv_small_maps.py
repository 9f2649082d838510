"""XLA:CPU convolution on tiny feature maps vs the im2col path ldm_jax uses there.

    python bench/conv_small_maps.py

Prints, per shape, the time of `lax.conv_general_dilated` and of
`ldm_jax.models.layers.conv_general_dilated` (forward, best of 5, after compilation).
"""

import functools
import time

import jax
from jax import lax

from ldm_jax.models import layers

SHAPES = [  # (batch, side, in channels, out channels)
    (32, 32, 64, 64),
    (32, 8, 256, 256),
    (32, 4, 512, 512),
    (32, 2, 512, 512),
    (32, 1, 512, 512),
    (1, 2, 512, 512),
]


def best_time(f, *args, repeats=5):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    print(f"device: {jax.devices()[0].device_kind}, {len(jax.devices())} device(s)")
    print(f"{'shape':>28} {'xla conv ms':>12} {'ldm_jax ms':>11} {'speed-up':>9}")
    for b, s, c, o in SHAPES:
        x = jax.random.normal(jax.random.PRNGKey(0), (b, s, s, c))
        w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, c, o))
        dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        kw = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=dn)
        xla = jax.jit(functools.partial(lax.conv_general_dilated, **kw))
        ours = jax.jit(functools.partial(layers.conv_general_dilated, **kw))
        t_xla, t_ours = best_time(xla, x, w), best_time(ours, x, w)
        name = f"[{b},{s},{s},{c}]->{o}"
        print(f"{name:>28} {t_xla * 1e3:12.2f} {t_ours * 1e3:11.2f} {t_xla / t_ours:8.1f}x")


if __name__ == "__main__":
    main()
