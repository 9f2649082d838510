"""Loads an experiment file `configs/....py[:ARG]` the same way `--config` does."""

from __future__ import annotations

import importlib.util
import pathlib

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS_DIR = PROJECT_ROOT / "configs"


def load_config(spec: str, *, lock: bool = True):
    """`spec` is a path (absolute, relative to cwd, or to the project root) plus `:ARG`."""
    path_str, _, arg = spec.partition(":")
    path = pathlib.Path(path_str)
    if not path.exists() and (PROJECT_ROOT / path).exists():
        path = PROJECT_ROOT / path
    if not path.exists():
        raise FileNotFoundError(
            f"config file {path_str} not found (looked in . and {PROJECT_ROOT})"
        )
    module_spec = importlib.util.spec_from_file_location(f"ldm_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    if lock:
        config.lock()
    return config
