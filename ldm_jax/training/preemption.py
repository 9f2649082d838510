"""Preemption: SIGTERM (what TPU/GPU schedulers send before reclaiming a machine) asks the
run to stop; all processes agree on the step, save there and exit 0.

A signal may reach only some processes, so in a multi-process run the decision is
collective, made in one of two ways:
- "service": JAX's preemption service, which jax.distributed starts by default
  (`jax_enable_preemption_service`). The runtime's own SIGTERM notifier tells the
  coordination service, which picks the first step every process can still reach (the
  largest step any has reported, plus one); asking whether that step has come
  (`reached_preemption_sync_point`) is a local lookup, so it is asked every step.
- "allgather": where the service is off, each process's SIGTERM flag joins an all-gather
  every `check_every` steps (a host round trip each time; bench/preemption_check.py
  measures it) and all stop if any was signalled.
A single-process run ("local") reads its own flag each step.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


def _preemption_service() -> bool:
    """Whether this process runs JAX's preemption sync manager (multi-process, service on)."""
    from jax._src import distributed

    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class PreemptionWatch:
    def __init__(self, check_every: int = 1):
        self.check_every = max(1, int(check_every))
        self.requested = False
        self._previous = None
        if jax.process_count() > 1 and _preemption_service():
            self.mode = "service"  # the runtime holds SIGTERM; a Python handler would steal it
        else:
            self.mode = "allgather" if jax.process_count() > 1 else "local"
            if threading.current_thread() is threading.main_thread():
                self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """Whether every process stops after `step`. Multi-process runs call it at every
        step on all processes (both the service and the all-gather count on it)."""
        if self.mode == "service":
            return bool(multihost_utils.reached_preemption_sync_point(step))
        if self.mode == "local":
            return self.requested
        if step % self.check_every:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.any(flags))

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
