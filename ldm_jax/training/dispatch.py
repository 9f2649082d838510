"""How far the host may run ahead of the devices.

Steps are dispatched asynchronously: the host queues step n+1 while step n runs, which hides
its own time (making the batch, Python). A few queued steps are all that takes. An unbounded
queue holds every queued batch in device memory and, on XLA:CPU across processes (gloo
collectives), deadlocks once some 20-30 steps are queued: measured with
bench/preemption_check.py at 2 processes x 4 devices, 20 queued ran and 32 hung, in the
collectives, with no CPU in use. So the loop waits for step n - size before it goes on.
"""

from __future__ import annotations

import collections

import jax


class DispatchWindow:
    """At most `size` dispatched steps not yet known to be finished (0: no bound)."""

    def __init__(self, size: int, wait=jax.block_until_ready):
        self.size = int(size)
        self._wait = wait
        self._queued = collections.deque()

    def push(self, result) -> None:
        """Record a dispatched step's result (a small output, never donated); waits for
        the oldest recorded one when more than `size` are queued."""
        if self.size <= 0:
            return
        self._queued.append(result)
        while len(self._queued) > self.size:
            self._wait(self._queued.popleft())


def compile_together(fn, args, barrier: str = "ldm_jax_first_step") -> None:
    """On XLA:CPU across processes: compile `fn` for `args` before its first call, then
    wait for every process at a coordination-service barrier (up to 30 min).

    Gloo sets up a group's connections at its first collective and waits only 30 s for
    the other processes to arrive; processes sharing a machine's cores can finish a cold
    compile further apart than that (seen with 4 processes on 2 cores: "Gloo context
    initialization failed ... GetKeyValue() timed out"). The call after the barrier finds
    the program in the persistent compilation cache. Accelerators (NCCL, TPU ICI) and
    single-process runs skip this.
    """
    if jax.process_count() == 1 or jax.default_backend() != "cpu":
        return
    from jax._src import distributed

    fn.lower(*args).compile()
    distributed.global_state.client.wait_at_barrier(barrier, 30 * 60 * 1000)
