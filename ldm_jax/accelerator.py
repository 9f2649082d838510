"""Check that JAX sees the accelerator a job asked for, before the job starts.

    python -m ldm_jax.accelerator --expect gpu [--min_devices 8]

The launchers run this first on every node: JAX quietly falls back to the CPU when its
GPU or TPU plugin is missing (a CPU-only install) or the chip is held by another process,
and a pod job would then "train" on the hosts' CPUs. Prints one line with what it found;
exits 2, naming the fix, when the kind or the count is wrong.
"""

from __future__ import annotations

KINDS = ("cpu", "gpu", "tpu")
_INSTALL = {"gpu": "cuda12", "tpu": "tpu", "cpu": "cpu"}


def found(devices) -> str:
    """`8 x gpu (NVIDIA H200)`: the count, platform and device kind of `devices`."""
    kinds = sorted({getattr(d, "device_kind", "?") for d in devices})
    platform = devices[0].platform if devices else "none"
    return f"{len(devices)} x {platform} ({', '.join(kinds)})"


def check(expect: str, min_devices: int = 1) -> str:
    """The found() line of this process's devices; UserError when they are not
    at least `min_devices` of the kind `expect`."""
    import jax

    from ldm_jax.errors import UserError

    devices = jax.local_devices()
    line = found(devices)
    if jax.default_backend() != expect:
        raise UserError(
            f"asked for {expect} but JAX sees {line}: install its plugin with "
            f"`bash scripts/install.sh --accelerator {_INSTALL[expect]}`, run on a "
            f"{expect} machine, or stop the process that holds the {expect}"
        )
    if len(devices) < min_devices:
        raise UserError(
            f"asked for at least {min_devices} {expect} devices per process but JAX sees "
            f"{line}: check the scheduler's device request (CUDA_VISIBLE_DEVICES, --gpus)"
        )
    return line


def run(args) -> str:
    line = check(args.expect, args.min_devices)
    print(f"ok: {line}", flush=True)
    return line


def main(argv=None) -> str:
    from ldm_jax import runtime

    p = runtime.CommandParser(description=__doc__.splitlines()[0])
    p.add_argument("--expect", required=True, choices=KINDS, help="the platform JAX must use")
    p.add_argument("--min_devices", type=int, default=1, help="local devices at least")
    return runtime.run_command(run, p, argv)


if __name__ == "__main__":
    main()
