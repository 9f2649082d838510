"""Rebuild a run from its workdir alone: the config comes from the checkpoint's metadata,
so commands that read a run (sample, evaluate) need nothing but its path."""

from __future__ import annotations

import pathlib

import jax
import ml_collections
from flax import linen as nn

from ldm_jax.errors import UserError
from ldm_jax.training import checkpoint as ckpt_lib


def _open(workdir: pathlib.Path, step: int, stage: str | None):
    """-> (read-only Checkpointer, step, its metadata holding the run's config)."""
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=1000, read_only=True)
    steps = ckpt.manager.all_steps()
    if not steps:
        raise UserError(f"{workdir / 'checkpoints'} holds no checkpoint.")
    step = max(steps) if step == -1 else step
    if step not in steps:
        raise UserError(f"no checkpoint at step {step} in {workdir}; steps: {sorted(steps)}")
    meta = ckpt.read_metadata(step)
    if stage is not None and meta.get("stage") != stage:
        raise UserError(f"{workdir} is a {meta.get('stage')!r} run; this needs a {stage} run.")
    if "config" not in meta:
        raise UserError(
            f"checkpoint {workdir / 'checkpoints' / str(step)} was written by an older ldm_jax "
            "that did not store the run's config with it; it can still be a diffusion run's "
            "first stage, but commands that rebuild the run need a checkpoint of this version."
        )
    return ckpt, step, meta


def stored_config(workdir) -> dict:
    """The config stored with the latest checkpoint of `workdir`, as a plain dict."""
    _, _, meta = _open(pathlib.Path(workdir).absolute(), -1, None)
    return meta["config"]


def load_run(workdir, step: int = -1, stage: str | None = None, overrides=None, sharded=False):
    """-> (config, task, state, step). `stage` ('autoencoder' / 'diffusion') is required
    of the run when given; `overrides(config)` may edit the config before the task is
    built (e.g. sampling settings or the mesh). With `sharded`, the state is restored
    onto the mesh of `config.mesh` with the training shardings (its arrays' `.sharding.mesh`);
    otherwise onto this process's default device."""
    from ldm_jax.training.loop import make_task

    workdir = pathlib.Path(workdir).absolute()
    ckpt, step, meta = _open(workdir, step, stage)
    config = ml_collections.ConfigDict(meta["config"])
    if overrides is not None:
        overrides(config)
    task = make_task(config)
    abstract = nn.unbox(jax.eval_shape(task.init_state, jax.random.PRNGKey(0)))
    if sharded:
        from ldm_jax.parallel import mesh as mesh_lib
        from ldm_jax.parallel import step as step_lib

        mesh = mesh_lib.make_mesh(config.mesh)
        with jax.set_mesh(mesh):
            shardings = step_lib.state_shardings(task, mesh)
            abstract = ckpt_lib.abstract_with_shardings(abstract, shardings)
            state, _ = ckpt.restore(step, abstract)
    else:
        state, _ = ckpt.restore(step, abstract)
    ckpt.close()
    return config, task, state, step
