"""Worker for test_frechet: run as `python -m tests.mp_stats_worker OUT` in each process
of a launch/local.py job; process 0 writes the combined statistics to OUT (JSON)."""

import json
import sys

import numpy as np

from ldm_jax.parallel import distributed

distributed.initialize()

import jax  # noqa: E402

from ldm_jax.evaluation.frechet import FeatureStats  # noqa: E402

x = np.random.default_rng(7).standard_normal((37, 6)) * 1e3 + 1e-3
stats = FeatureStats(6)
if jax.process_index() == 0:
    stats.update(x[:20])
else:  # 17 real rows padded to 20 with junk, masked out
    rows = np.concatenate([x[20:], np.full((3, 6), 1e9)])
    stats.update(rows, mask=np.arange(20) < 17)
total = stats.all_processes()
if jax.process_index() == 0:
    out = {"count": total.count, "sum": total.sum.tolist(), "outer": total.outer.tolist()}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
