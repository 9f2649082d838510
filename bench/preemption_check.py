"""What the multi-process preemption check costs a training step, by way of checking.

    python launch/local.py --num_processes 2 --devices_per_process 4 -- \
        python bench/preemption_check.py [--steps 50] [--rounds 5] [--width 512]

Each process runs the same data-parallel step (an MLP's SGD update, the batch split over
all 8 devices of the job) in a loop of --steps steps, dispatched asynchronously as the
training loop does (at most --in_flight queued, train.max_steps_in_flight), and reads the
step's result once at the end. Interleaved rounds time the loop with no check, with PreemptionWatch's all-gather every N steps, and with JAX's
preemption service asked every step. Process 0 prints the median ms per step of each and
the cost of the check per step beside the plain step. The all-gather costs more than its
round trip: it waits for the queued steps to finish, so the host stops running ahead.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from ldm_jax.parallel import distributed
from ldm_jax.training import dispatch, preemption


def make_step(mesh, width: int):
    def loss(w, x):
        h = jnp.tanh(x @ w[0])
        return jnp.mean((h @ w[1]) ** 2)

    @jax.jit
    def step(w, x):
        return w - 1e-3 * jax.grad(loss)(w, x)

    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec("data"))
    rng = np.random.default_rng(0)
    w = jax.device_put(rng.standard_normal((2, width, width), np.float32) / width**0.5, replicated)
    batch = 8 * 16
    local = rng.standard_normal((batch // jax.process_count(), width), np.float32)
    x = multihost_utils.host_local_array_to_global_array(local, mesh, PartitionSpec("data"))
    assert x.sharding.is_equivalent_to(split, 2)
    return step, w, x


def loop(step, w, x, steps: int, check, in_flight: int) -> float:
    """Seconds per step of `steps` steps, `check(done)` after each (None: no check), with at
    most `in_flight` steps dispatched ahead of the last one finished (0: unbounded)."""
    t = time.perf_counter()
    window = dispatch.DispatchWindow(in_flight)
    for done in range(1, steps + 1):
        w = step(w, x)
        window.push(w)
        if check is not None and check(done):
            raise AssertionError("no process was signalled")
    jax.block_until_ready(w)
    return (time.perf_counter() - t) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--width", type=int, default=512)
    p.add_argument(
        "--in_flight",
        type=int,
        default=4,
        help="queued steps at most, as the training loop "
        "(train.max_steps_in_flight); 0: no bound, which deadlocks XLA:CPU's collectives",
    )
    p.add_argument("--every", default="1,10,100", help="all-gather intervals to time")
    args = p.parse_args()
    distributed.initialize()
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    step, w, x = make_step(mesh, args.width)
    jax.block_until_ready(step(w, x))
    watches = {"none": None}
    for n in (int(v) for v in args.every.split(",")):
        watch = preemption.PreemptionWatch(n)
        watch.mode = "allgather"  # measured as where the service is off
        watches[f"all-gather every {n}"] = watch.should_stop
    service = preemption.PreemptionWatch(1)
    if service.mode == "service":
        watches["preemption service, every step"] = service.should_stop
    times = {name: [] for name in watches}
    for _ in range(args.rounds):
        for name, check in watches.items():
            times[name].append(loop(step, w, x, args.steps, check, args.in_flight))
    if jax.process_index() == 0:
        print(f"{jax.process_count()} processes x {jax.local_device_count()} devices, "
              f"width {args.width}, {args.steps} steps x {args.rounds} rounds (median)")  # fmt: skip
        base = statistics.median(times["none"])
        for name, ts in times.items():
            ms = statistics.median(ts) * 1e3
            print(f"{name:>32}: {ms:7.2f} ms/step  (+{ms - base * 1e3:6.2f} ms, "
                  f"{100 * (ms / (base * 1e3) - 1):+5.1f}%)")  # fmt: skip


if __name__ == "__main__":
    main()
