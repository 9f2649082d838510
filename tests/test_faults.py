"""Checkpoints that survive anything: exact resume, restore onto another mesh, and
random SIGKILLs (some during asynchronous saves) that never leave an unreadable step."""

import json
import os
import random
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import linen as nn
from toy import AE_CONFIG, ROOT, run_module
from xla_flags import FAST_COMPILE

from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import step as step_lib
from ldm_jax.training import checkpoint as ckpt_lib

pytestmark = pytest.mark.slow  # real training runs, in subprocesses or on the trained run


def _rows(workdir):
    rows = map(json.loads, (workdir / "metrics.jsonl").open())
    return {r["step"]: r for r in rows if "loss" in r}  # training rows (not eval rows)


def _common(workdir, data_dir):
    return [
        f"--config={AE_CONFIG}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.train.progress_bar=False",
    ]


def test_exact_resume_is_bitwise(tiny_autoencoder_run, data_dir, tmp_path):
    """4 steps straight == 2 steps, restart, 2 more (the session fixture): every logged
    figure of steps 3 and 4, data order included, is bitwise equal."""
    resumed = tiny_autoencoder_run[0]
    straight = tmp_path / "straight"
    run_module("ldm_jax.train", *_common(straight, data_dir), "--config.train.num_steps=4")
    a, b = _rows(straight), _rows(resumed)
    for step in (3, 4):
        for key in ("loss", "nll", "disc_loss", "grad_norm_gen", "param_norm_gen"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
    ea = json.loads((straight / "metrics.json").read_text())["eval"]
    eb = json.loads((resumed / "metrics.json").read_text())["eval"]
    assert ea == eb
    # Every array of the final state (params, both optimizers, BatchNorm statistics).
    from ldm_jax import inspect_checkpoint

    da = inspect_checkpoint.main([f"--workdir={straight}", "--step=4"])
    db = inspect_checkpoint.main([f"--workdir={resumed}", "--step=4"])
    assert da["sha256"] == db["sha256"] and da["elements"] > 10_000


def test_restore_onto_other_meshes_is_bitwise(tiny_autoencoder_run):
    """The 2-step checkpoint restored onto 1 device and onto fsdp=8 (every large tensor
    split) holds identical values."""
    from ldm_jax.config_loader import load_config
    from ldm_jax.training.autoencoder import AutoencoderTask

    workdir = tiny_autoencoder_run[0]
    task = AutoencoderTask(load_config(AE_CONFIG))
    abstract = nn.unbox(jax.eval_shape(task.init_state, jax.random.PRNGKey(0)))
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=10, read_only=True)
    restored = {}
    for shape in [(1, 1, 1), (1, 8, 1), (2, 2, 2)]:
        devices = jax.devices()[: int(np.prod(shape))]
        mesh = mesh_lib.mesh_of(*shape, devices=devices)
        shardings = step_lib.state_shardings(task, mesh)
        target = ckpt_lib.abstract_with_shardings(abstract, shardings)
        state, data = ckpt.restore(2, target)
        assert data["next_batch"] == 2
        if shape == (1, 8, 1):
            split = [
                leaf for leaf in jax.tree_util.tree_leaves(state)
                if leaf.size >= 4096 and len(leaf.sharding.device_set) == 8
                and leaf.addressable_shards[0].data.size * 8 == leaf.size
            ]  # fmt: skip
            assert split, "no large tensor was split over fsdp"
        restored[shape] = jax.device_get(state)
    for shape in [(1, 8, 1), (2, 2, 2)]:
        jax.tree_util.tree_map(np.testing.assert_array_equal, restored[shape], restored[(1, 1, 1)])


def _committed_steps(workdir):
    try:
        names = [p.name for p in (workdir / "checkpoints").iterdir()]
    except FileNotFoundError:
        return []
    return sorted(int(n) for n in names if n.isdigit())


def _readable_steps(workdir):
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=100, read_only=True)
    steps = ckpt.manager.all_steps()
    for step in steps:
        meta = ckpt.read_metadata(step)
        assert meta["stage"] == "autoencoder"
    ckpt.close()
    return sorted(steps)


def test_random_sigkills_always_resume_from_a_committed_step(data_dir, tmp_path):
    """SIGKILL at random moments (checkpoints every step, saved asynchronously, so many
    kills land mid-save); each restart resumes from the last committed step and the run
    finishes. Figures: kills and clean resumes are printed."""
    workdir = tmp_path / "kill"
    num_steps = 14 + 2 * int(os.environ.get("LDM_JAX_TEST_KILLS", "4"))
    args = [
        sys.executable, "-m", "ldm_jax.train", *_common(workdir, data_dir),
        f"--config.train.num_steps={num_steps}", "--config.train.checkpoint_every=1",
        "--config.train.keep_checkpoints=2", "--config.train.image_every=1000",
        "--config.train.eval_every=1000",
    ]  # fmt: skip
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE)
    rng = random.Random(1234)
    planned = int(os.environ.get("LDM_JAX_TEST_KILLS", "4"))  # more for a longer drill
    kills, resumes, last_seen = 0, 0, -1
    for attempt in range(2 * planned):
        proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        if attempt < planned:
            # Wait until training runs (some step committed), then kill a little later.
            t0 = time.time()
            while time.time() - t0 < 240 and proc.poll() is None:
                # A listing only: the run deletes old steps (keep=2) while we look.
                steps = _committed_steps(workdir)
                if steps and steps[-1] > last_seen:
                    break
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.6))
            if proc.poll() is None:
                proc.kill()
                kills += 1
        out, err = proc.communicate(timeout=600)
        if "resumed from" in out:
            step = int(out.split("(step ")[1].split(")")[0])
            assert step >= last_seen, (step, last_seen)  # never behind a committed step
            resumes += 1
        steps = _readable_steps(workdir)  # every listed step is readable
        assert steps, err
        last_seen = steps[-1]
        if proc.returncode == 0:
            assert f"done: step {num_steps}" in out
            break
    else:
        raise AssertionError("the run never finished")
    print(f"SIGKILLs: {kills}, clean resumes: {resumes}, final steps kept: {steps}")
    assert kills >= planned - 1 and resumes >= kills and steps[-1] == num_steps
