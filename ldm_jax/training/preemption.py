"""Preemption: SIGTERM (what TPU/GPU schedulers send before reclaiming a machine) asks the
run to stop; all processes agree on the step, save there and exit 0.

A signal may reach only some processes, so the decision is collective: every
`check_every` steps each process contributes its flag to an all-gather and all stop if
any was signalled. A single-process run reads its own flag each step.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class PreemptionWatch:
    def __init__(self, check_every: int = 1):
        self.check_every = max(1, int(check_every))
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """Whether every process stops after `step` (a collective in multi-process runs:
        call it at the same steps on all of them)."""
        if jax.process_count() == 1:
            return self.requested
        if step % self.check_every:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.any(flags))

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
