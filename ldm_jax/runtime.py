"""Process-level JAX settings applied by every entry point."""

from __future__ import annotations

import os
import pathlib

import jax
from absl import logging as absl_logging


def setup(cache_dir: str | None = None) -> None:
    """Persistent compilation cache (a second run compiles in a fraction of the time), and
    quiet library logs (orbax reports every checkpoint phase at INFO)."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    cache_dir = cache_dir or os.environ.get(
        "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path.home() / ".cache" / "ldm_jax" / "xla")
    )
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_command(fn, args):
    """Runs a command's `fn(args)` after `setup()`; a UserError becomes one line on stderr
    and exit code 2 (bad input, nothing done), whatever the command."""
    import sys

    from ldm_jax.errors import UserError

    setup()
    try:
        return fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
