"""A run with a dense condition resumes exactly: its per-example conditions (large masks
here) are drawn from seeds of the example's position, so 2 steps, a restart and 2 more log
the same figures as 4 steps straight."""

import json

import pytest
from toy import run_module

pytestmark = pytest.mark.slow  # real training runs in subprocesses

CONFIG = "configs/diffusion/photo_inpaint.py:runlocal"


def _rows(workdir):
    rows = map(json.loads, (workdir / "metrics.jsonl").open())
    return {r["step"]: r for r in rows if "loss" in r}


def test_inpainting_run_resumes_bitwise(tiny_autoencoder_run, data_dir, tmp_path):
    common = [
        f"--config={CONFIG}",
        f"--config.first_stage.workdir={tiny_autoencoder_run[0]}",
        f"--config.data.data_dir={data_dir}",
        "--config.train.progress_bar=False",
        "--config.train.eval_every=100",  # no evaluator: the losses are the figures here
        "--config.train.image_every=100",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_module("ldm_jax.train", *common, f"--workdir={straight}", "--config.train.num_steps=4")
    run_module("ldm_jax.train", *common, f"--workdir={resumed}", "--config.train.num_steps=2")
    run_module("ldm_jax.train", *common, f"--workdir={resumed}", "--config.train.num_steps=4")
    a, b = _rows(straight), _rows(resumed)
    for step in (3, 4):
        for key in ("loss", "grad_norm", "param_norm", "latent_std"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
