"""Process-level JAX settings applied by every entry point."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

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


class CommandParser(argparse.ArgumentParser):
    """argparse with the project's error path: a bad flag is one line on stderr, exit 2."""

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")


def fail(message: str, code: int = 2):
    """One line on stderr naming the problem and the fix; exit `code` (2: bad input)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _os_error_message(e: OSError) -> str:
    where = f" {e.filename}" if e.filename else ""
    return f"{e.strerror or e}:{where}; check the path (nothing was changed)."


def run_command(fn, parser, argv=None):
    """Parses `argv` with `parser` (or takes an argparse Namespace as it is) and runs
    `fn(args)` after `setup()`. Bad input, whether the command or a library finds it, ends
    as one line on stderr and exit code 2, with no traceback and nothing written."""
    from ldm_jax.errors import UserError

    args = parser if isinstance(parser, argparse.Namespace) else parser.parse_args(argv)
    setup()
    try:
        return fn(args)
    except UserError as e:
        fail(str(e))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        fail(_os_error_message(e))
