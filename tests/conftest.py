"""Test session setup: 8 fake CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, so this runs first. Tests that
want one device build a mesh over `jax.devices()[:1]` explicitly.
"""

import os
import pathlib

from xla_flags import FAST_COMPILE  # an import-free module

TEST_XLA_FLAGS = f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"
os.environ.setdefault("XLA_FLAGS", TEST_XLA_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".cache" / "jax"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"]).mkdir(parents=True, exist_ok=True)

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import pytest  # noqa: E402

# Session fixtures that train real runs through the CLI, in subprocesses.
_TRAINED_RUNS = {"tiny_autoencoder_run", "diffusion_run"}


def pytest_collection_modifyitems(items):
    """A test on a trained run (directly or through another fixture) is end to end by
    nature: it is marked slow, so that `-m "not slow"` trains none of these runs."""
    for item in items:
        if _TRAINED_RUNS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Both embedded datasets, prepared once per test session."""
    from ldm_jax.data.datasets import prepare

    path = str(tmp_path_factory.mktemp("tfds"))
    prepare("digits", path)
    prepare("photo_crops", path)
    return path


SMALL_SCENES = {"train": 24, "test": 16}  # digit_scenes counts of `scenes_dir`


@pytest.fixture(scope="session")
def scenes_dir(tmp_path_factory):
    """A small digit_scenes build through the prepare command (scene i of a split does
    not depend on the split's size)."""
    from ldm_jax.data.builders import digit_scenes
    from ldm_jax.data.prepare import main as prepare_main

    path = str(tmp_path_factory.mktemp("digit_scenes"))
    with pytest.MonkeyPatch.context() as mp:
        for split, count in SMALL_SCENES.items():
            mp.setitem(digit_scenes.NUM_SCENES, split, count)
        assert prepare_main(["--dataset", "digit_scenes", "--data_dir", path]) == 0
    return path


@pytest.fixture(scope="session")
def tiny_autoencoder_run(tmp_path_factory, data_dir):
    """The tiny autoencoder trained by the real CLI for 2 steps, then resumed to 4.

    Returns (workdir, first run, resumed run); diffusion tests use it as their first stage.
    """
    from toy import AE_CONFIG, run_module

    workdir = tmp_path_factory.mktemp("ae") / "run"
    common = [
        f"--config={AE_CONFIG}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
    ]
    quiet = "--config.train.progress_bar=False"
    first = run_module("ldm_jax.train", *common, quiet, "--config.train.num_steps=2")
    # The resumed run also traces steps 3-4, reports MFU against a stated peak, and shows
    # its progress into a pipe (test_telemetry reads all three).
    telemetry = ["--config.train.profile_steps=(3, 4)", "--config.train.peak_flops_per_device=1e11"]
    second = run_module("ldm_jax.train", *common, "--config.train.num_steps=4", *telemetry)
    return workdir, first, second


@pytest.fixture(scope="session")
def diffusion_run(tmp_path_factory, data_dir, tiny_autoencoder_run, pytorch_fid_weights):
    """The tiny class-conditional digits LDM on the tiny autoencoder, trained by the real
    CLI for 2 steps, then resumed to 4 with the training loop's evaluator at step 4.

    Returns (workdir, first run, resumed run).
    """
    from toy import EVAL_METRICS, LDM_CONFIG, eval_settings, run_module

    workdir = tmp_path_factory.mktemp("ldm") / "run"
    common = [
        f"--config={LDM_CONFIG}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        f"--config.first_stage.workdir={tiny_autoencoder_run[0]}",
        "--config.train.progress_bar=False",
    ]
    first = run_module("ldm_jax.train", *common, "--config.train.num_steps=2")
    settings = eval_settings(workdir.parent, pytorch_fid_weights[0])
    evaluation = [f"--config.evaluation.{k}={v}" for k, v in settings.items()]
    evaluation += ["--config.evaluation.every=4", f"--config.evaluation.metrics={EVAL_METRICS}"]
    second = run_module("ldm_jax.train", *common, "--config.train.num_steps=4", *evaluation)
    return workdir, first, second


@pytest.fixture(scope="session")
def pytorch_fid_weights(tmp_path_factory):
    """A weights file in pytorch-fid's layout: the packaged network's real TF 2015-12-05
    conv weights, plus a seeded random 2048 -> 1008 head standing in for the real
    classifier (the packaged network has none). Needs torch (test extra)."""
    import numpy as np
    import torch

    from ldm_jax.interop import inception_weights
    from ldm_jax.models import inception

    params = inception_weights.load_fid_params(inception.packaged_torchscript())
    rng = np.random.default_rng(0)
    params[inception.LOGITS] = {
        "kernel": rng.normal(0.0, 0.05, (2048, 1008)).astype(np.float32),
        "bias": rng.normal(0.0, 0.1, (1008,)).astype(np.float32),
    }
    state = inception_weights.pytorch_fid_state_from_params(params)
    path = tmp_path_factory.mktemp("inception") / inception.PYTORCH_FID_FILE
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
    return path, params
