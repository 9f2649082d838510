"""Toy-size experiment configs shared by tests (full-size inits cost 13-45 s on CPU)."""

import os
import pathlib
import subprocess
import sys

from ldm_jax.config_loader import load_config


def tiny_autoencoder_config(kind: str = "kl", *, image_size: int = 16, batch_size: int = 8):
    c = load_config("configs/autoencoder/quickstart.py:runlocal", lock=False)
    c.model.type = kind
    c.model.ch = 8
    c.model.ch_mult = (1, 2)
    c.model.norm_groups = 4
    c.model.resolution = image_size
    c.model.attn_resolutions = (image_size // 2,)
    c.model.z_channels = 3
    c.model.embed_dim = 3
    c.model.double_z = kind == "kl"
    c.model.n_embed = 16
    c.loss.disc_ndf = 8
    c.loss.disc_num_layers = 2
    c.loss.disc_start = 0
    c.loss.learn_logvar = True
    c.batch_size = batch_size
    c.data.image_size = image_size
    return c


ROOT = pathlib.Path(__file__).resolve().parents[1]
AE_CONFIG = "configs/autoencoder/quickstart.py:runlocal"
LDM_CONFIG = "configs/diffusion/quickstart_digits.py:runlocal"


def tiny_diffusion_config(ae_workdir, data_dir=None, **overrides):
    """LDM_CONFIG on the tiny autoencoder in `ae_workdir` (e.g. conftest.tiny_autoencoder_run).

    Each override `section__name=value` sets config.section.name; a key without `__` sets
    a top-level field (e.g. `batch_size=8`, a multiple of the 8 test devices).
    """
    c = load_config(LDM_CONFIG, lock=False)
    c.first_stage.workdir = str(ae_workdir)
    if data_dir is not None:
        c.data.data_dir = data_dir
    for key, value in overrides.items():
        *sections, name = key.split("__")
        node = c
        for section in sections:
            node = node[section]
        node[name] = value
    return c


# The sample metrics of the session's tiny diffusion run (conftest.diffusion_run).
EVAL_METRICS = ("accuracy", "digits_is", "fid", "is", "precision_recall")


def eval_settings(tmp, weights) -> dict:
    """Sample-metric settings shared by the training loop's evaluator and the command."""
    return dict(
        num_samples=8, num_reference=8, batch_size=8, steps=4, pr_k=3, is_splits=2,
        stats_dir=str(tmp / "stats"), inception=str(weights),
    )  # fmt: skip


def run_module(module, *args, check=True, devices=1):
    """`python -m module args` from the project root on `devices` fake CPU devices (one by
    default), as a user runs it."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # fast compiles
    if devices > 1:
        env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    cmd = [sys.executable, "-m", module, *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def launch_command(num_processes, devices_per_process, module, *args):
    """The local launcher's command line for `python -m module args` in N processes."""
    return [
        sys.executable,
        str(ROOT / "launch" / "local.py"),
        f"--num_processes={num_processes}",
        f"--devices_per_process={devices_per_process}",
        "--grace_s=60",
        "--",
        sys.executable,
        "-m",
        module,
        *map(str, args),
    ]


def launch_env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    return env


def run_launched(num_processes, devices_per_process, module, *args, check=True, timeout=600):
    """Runs `module` as a job of N real JAX processes on localhost (launch/local.py)."""
    cmd = launch_command(num_processes, devices_per_process, module, *args)
    proc = subprocess.run(
        cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
