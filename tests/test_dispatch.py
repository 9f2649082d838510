"""The training loop's bound on queued steps (training/dispatch.py)."""

import jax.numpy as jnp

from ldm_jax.training import dispatch


def test_the_window_waits_for_the_oldest_step_beyond_its_size():
    waited = []
    window = dispatch.DispatchWindow(3, wait=waited.append)
    for step in range(10):
        window.push(step)
        assert waited == list(range(max(0, step - 2)))  # steps queued: at most 3


def test_size_zero_never_waits():
    waited = []
    window = dispatch.DispatchWindow(0, wait=waited.append)
    for step in range(100):
        window.push(step)
    assert waited == []


def test_the_default_wait_takes_jax_arrays():
    window = dispatch.DispatchWindow(1)
    for step in range(3):
        window.push({"loss": jnp.float32(step) * 2})
    assert len(window._queued) == 1


def test_compiling_together_is_for_cpu_jobs_of_several_processes_only():
    class Untouchable:
        def lower(self, *args):
            raise AssertionError("a one-process run compiles at its first call, as before")

    dispatch.compile_together(Untouchable(), ())  # this process is a one-process job
