"""Toy-size experiment configs and weight files shared by tests (full-size inits cost
13-45 s on CPU)."""

import os
import pathlib
import subprocess
import sys

from xla_flags import FAST_COMPILE

from ldm_jax.config_loader import load_config


def tiny_autoencoder_config(kind: str = "kl", *, image_size: int = 16, batch_size: int = 8):
    c = load_config("configs/autoencoder/photo_f4.py:runlocal", lock=False)
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
AE_CONFIG = "configs/autoencoder/photo_f4.py:runlocal"
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
    env["XLA_FLAGS"] = FAST_COMPILE
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
    env["XLA_FLAGS"] = FAST_COMPILE
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


# A tiny but SD-1-shaped release: GroupNorm(32) everywhere as in CompVis, 64-wide CLIP
# heads, the real CLIP vocabulary (the tokenizer's ids), 32 px images -> 16x16x4 latents.
SD_UNET = dict(
    in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
    num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
    transformer_depth=1, context_dim=64, legacy=False,
)  # fmt: skip
SD_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0,
)  # fmt: skip
SD_CLIP = dict(width=64, num_layers=2, num_heads=1, mlp_dim=128, vocab_size=49408,
               context_length=77, activation="quick_gelu", output="last")  # fmt: skip


def write_tiny_sd1(directory: pathlib.Path):
    """A random SD-1-layout single file `tiny-sd1.safetensors` and its CompVis inference
    YAML `tiny-sd1.yaml` in `directory`: (checkpoint path, YAML path, {unet, vae, clip}
    params written into it)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import yaml
    from helpers import jit_init, noisy_params

    from ldm_jax.interop import clip_weights, tensor_files, unet_weights, vae_weights
    from ldm_jax.interop import stable_diffusion as sd
    from ldm_jax.models import autoencoder, clip, unet_configs

    unet_model = unet_configs.from_config(SD_UNET)
    vae_model = autoencoder.from_config(sd.kl_f8_vae() | {**SD_DDCONFIG, "embed_dim": 4})
    encoder = clip.CLIPTextEncoder(**SD_CLIP)
    r = jax.random.PRNGKey(0)
    x, t = jnp.zeros((1, 16, 16, 4)), jnp.zeros((1,), jnp.int32)
    vae_rngs = {"params": r, "sample": r}
    params = {
        "unet": noisy_params(jit_init(unet_model, r, x, t, context=jnp.zeros((1, 77, 64))), 1),
        "vae": noisy_params(jit_init(vae_model, vae_rngs, jnp.zeros((1, 32, 32, 3))), 2),
        "clip": noisy_params(jit_init(encoder, r, jnp.zeros((1, 77), jnp.int32)), 3),
    }
    tensors = unet_weights.unet_to_compvis(params["unet"], unet_model, prefix=sd.UNET_PREFIX)
    tensors |= vae_weights.vae_to_compvis(params["vae"], vae_model, prefix=sd.VAE_PREFIX)
    tensors |= clip_weights.export_hf_clip(params["clip"], prefix=sd.SD1_CLIP_PREFIX)
    tensors["model_ema.decay"] = np.float32(0.9999)  # unrelated keys are ignored
    path = directory / "tiny-sd1.safetensors"
    tensor_files.save_safetensors(path, tensors)
    config = {"model": {"params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": 16,
        "channels": 4, "scale_factor": 0.18215,
        "unet_config": {"params": SD_UNET},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": SD_DDCONFIG}},
    }}}  # fmt: skip
    yaml_path = directory / "tiny-sd1.yaml"
    yaml_path.write_text(yaml.safe_dump(config))
    return path, yaml_path, params
