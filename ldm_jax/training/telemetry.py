"""Throughput telemetry of the training loop: step time, images/s, MFU, host input time,
device memory, and jax.profiler traces of chosen steps.

Steps are dispatched asynchronously, so the loop's only honest clocks are the points where
it waits for a result (each logged step reads its metrics). Every figure here is a mean
over the steps between two such points:
- `step_ms`, `images_per_sec` (the global batch), `images_per_sec_per_device`;
- `input_ms`: host time per step spent making the batch (reading, decoding, augmenting,
  placing it on the devices) and `input_share` of the step time: near 1 the run is bound
  by its input pipeline, not by the devices;
- `mfu`: the compiled step's FLOPs per device (XLA's cost analysis of the partitioned
  program) per second, over the device's peak (`train.peak_flops_per_device`, or the
  table below by device kind; on a CPU, or a chip not in it, it is not reported);
- `memory_gb` / `peak_memory_gb`: bytes in use on the first local device, where the
  backend reports them (GPU and TPU do, the CPU does not).
"""

from __future__ import annotations

import time

import jax

from ldm_jax import storage

# Dense bf16 peak FLOP/s per chip (vendors' data sheets), by the start of jax's device_kind;
# the first match wins, so longer names come before their prefixes.
PEAK_BF16_FLOPS = (
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5", 459e12),  # v5p
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU7x", 2307e12),  # Ironwood
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100", 989e12),  # SXM
    ("NVIDIA H200", 989e12),
    ("NVIDIA H800", 989e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA B200", 2250e12),
    ("NVIDIA GB200", 2500e12),
    ("NVIDIA L4", 121e12),
)


def peak_flops(device, override: float = 0.0) -> float | None:
    """The device's peak FLOP/s: `override` if set, else the table's, else None."""
    if override:
        return float(override)
    kind = getattr(device, "device_kind", "")
    return next((peak for name, peak in PEAK_BF16_FLOPS if kind.startswith(name)), None)


def step_flops(jitted, *args) -> float | None:
    """FLOPs per device of one call of `jitted` on `args`, from XLA's cost analysis of the
    compiled (partitioned) program. Called after the first step, so lowering and compiling
    hit jit's caches: nothing is traced or compiled again."""
    try:
        cost = jitted.lower(*args).compile().cost_analysis()
    except Exception:  # a backend without cost analysis: no MFU, training goes on
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def device_memory(device) -> dict:
    """{'memory_gb', 'peak_memory_gb'} of `device` where its backend reports them, else {}."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # not every backend implements it
        return {}
    out = {}
    if "bytes_in_use" in stats:
        out["memory_gb"] = stats["bytes_in_use"] / 2**30
    if "peak_bytes_in_use" in stats:
        out["peak_memory_gb"] = stats["peak_bytes_in_use"] / 2**30
    return out


class StepTelemetry:
    """The loop's clocks: `input()` around making each batch, `started()` once the first
    (compiling) step is done, `interval(done)` at each logged step."""

    def __init__(self, batch_size: int, peak_flops_override: float = 0.0):
        self.batch_size = batch_size
        self.device = jax.local_devices()[0]
        self.num_devices = jax.device_count()
        self.peak = peak_flops(self.device, peak_flops_override)
        self.flops = None  # per device and step, set by measure_flops
        self._t, self._steps, self._input = None, 0, 0.0
        self._input_started = self._paused_at = None

    def measure_flops(self, jitted, *args) -> None:
        self.flops = step_flops(jitted, *args)

    def input_started(self) -> None:
        self._input_started = time.perf_counter()

    def input_done(self) -> None:
        self._input += time.perf_counter() - self._input_started

    def started(self) -> None:
        """The clock starts after the first step (its compilation is not throughput)."""
        self._t, self._steps, self._input = time.perf_counter(), 0, 0.0

    def step_done(self) -> None:
        self._steps += 1

    def pause(self, state) -> None:
        """Stop the clock for work between steps (images, evaluation, checkpoints), once
        the steps dispatched so far are done: they count, the work does not."""
        jax.block_until_ready(state)
        self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._t is not None:
            self._t += time.perf_counter() - self._paused_at

    def interval(self) -> dict:
        """Means over the steps since the last call (or since started()); {} before."""
        if self._t is None or not self._steps:
            return {}
        now = time.perf_counter()
        seconds = (now - self._t) / self._steps
        out = {
            "step_ms": 1e3 * seconds,
            "images_per_sec": self.batch_size / seconds,
            "images_per_sec_per_device": self.batch_size / seconds / self.num_devices,
            "input_ms": 1e3 * self._input / self._steps,
            "input_share": min(1.0, self._input / self._steps / seconds),
        }
        if self.flops:
            out["tflops_per_device"] = self.flops / seconds / 1e12
            if self.peak:
                out["mfu"] = self.flops / seconds / self.peak
        out |= device_memory(self.device)
        self._t, self._steps, self._input = now, 0, 0.0
        return out


class Profiler:
    """A jax.profiler trace of steps `first`..`last` (1-based, inclusive) into
    <workdir>/profile/process_<i> (TensorBoard's profile plugin or Perfetto reads it).
    Traces are written locally and copied when the workdir is remote."""

    def __init__(self, workdir: storage.Path, steps):
        steps = tuple(steps or ())
        if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
            from ldm_jax.errors import UserError

            raise UserError(
                f"config.train.profile_steps={steps}: give (first, last) steps to trace, "
                "1 <= first <= last, e.g. (10, 12); () traces none."
            )
        self.first, self.last = steps if steps else (0, -1)
        self.target = workdir / "profile" / f"process_{jax.process_index()}"
        self.active = False

    def before_step(self, done_after: int) -> None:
        if done_after == self.first:
            self.local = (
                storage.local_mirror(self.target) if storage.is_remote(self.target) else self.target
            )
            self.local.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.local))
            self.active = True

    def after_step(self, done: int, state) -> None:
        if self.active and done >= self.last:
            self.stop(state)

    def stop(self, state=None) -> None:
        if not self.active:
            return
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self.active = False
        if self.local != self.target:
            storage.copy_tree(self.local, self.target)
