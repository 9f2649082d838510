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
    """argparse with the project's error path (a bad flag is one line on stderr, exit 2)
    and, with `config_overrides`, the training command's `--config.KEY=VALUE` overrides
    of the run's stored config, collected into `args.config_overrides` for
    `apply_config_overrides`."""

    def __init__(self, *args, config_overrides: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.takes_overrides = config_overrides
        if config_overrides:
            self.epilog = "--config.KEY=VALUE overrides a key of the run's stored config."

    def parse_args(self, args=None, namespace=None):
        known, rest = self.parse_known_args(args, namespace)
        overrides, unknown = [], []
        for arg in rest:
            key, sep, value = arg.partition("=")
            if self.takes_overrides and key.startswith("--config.") and sep:
                overrides.append((key.removeprefix("--config."), value))
            else:
                unknown.append(arg)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        known.config_overrides = overrides
        return known

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")


def _literal(text: str):
    """A command-line value as Python: numbers, booleans, tuples, None; else the text."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(text.lower(), text)


def apply_config_overrides(config, overrides) -> None:
    """Sets each (dotted key, text) of `overrides` on `config`, whose keys must exist and
    whose field types are kept (ml_collections checks them): the same --config.KEY=VALUE
    as the training command's, for the commands that read a run's stored config."""
    from ldm_jax.errors import UserError

    for key, text in overrides:
        *parents, leaf = key.split(".")
        node = config
        try:
            for name in parents:
                node = node[name]
            if leaf not in node:
                raise KeyError(leaf)
            value = _literal(text)
            if isinstance(node[leaf], str) and not isinstance(value, str):
                value = text  # e.g. a dataset named by digits
            elif isinstance(node[leaf], float) and isinstance(value, int):
                value = float(value)
            node[leaf] = value
        except (KeyError, AttributeError, TypeError) as e:
            problem = "no such key" if isinstance(e, KeyError | AttributeError) else str(e)
            raise UserError(
                f"--config.{key}={text}: {problem}; override a key the run's config has, "
                "with a value of its type."
            ) from None


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
