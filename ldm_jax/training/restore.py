"""Rebuild a run from its workdir alone: the config comes from the checkpoint's metadata,
so commands that read a run (sample, evaluate) need nothing but its path."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from flax import linen as nn

from ldm_jax import storage
from ldm_jax.errors import UserError
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel.mesh_run import MeshRun
from ldm_jax.training import checkpoint as ckpt_lib
from ldm_jax.training.task import make_task


def _open(workdir: storage.Path, step: int, stage: str | None):
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
    _, _, meta = _open(storage.path(workdir), -1, None)
    return meta["config"]


@dataclasses.dataclass
class RestoredRun:
    """A run rebuilt from its workdir and restored onto its mesh, frozen params placed."""

    config: ml_collections.ConfigDict
    task: Any
    state: Any  # sharded over `mesh_run.mesh` with the training shardings; for inference,
    #             only `Task.inference_fields` (the others None)
    step: int
    mesh_run: MeshRun  # its `frozen` holds the task's frozen params on the mesh


def _restore(ckpt, step: int, task, mesh_run: MeshRun | None):
    """The state at `step`: on the mesh with the training shardings, or on this
    process's default device without a mesh run."""
    boxed = jax.eval_shape(task.init_state, jax.random.PRNGKey(0))
    abstract = nn.unbox(boxed)
    shardings = None
    if mesh_run is not None:
        shardings = mesh_lib.logical_to_sharding(boxed, mesh_run.mesh)
        abstract = ckpt_lib.abstract_with_shardings(abstract, shardings)
    complete = jax.jit(task.state_from_weights, out_shardings=shardings, donate_argnums=0)
    return ckpt.restore(step, abstract, complete)[0]


def _restore_for_inference(ckpt, step: int, task, mesh_run: MeshRun | None):
    """The state's inference fields alone (`Task.inference_fields`), the others None:
    sampling a run needs neither the optimizer moments nor the trained UNet copy."""
    boxed = jax.eval_shape(task.init_state, jax.random.PRNGKey(0))
    abstract = nn.unbox(boxed)
    if mesh_run is not None:
        shardings = mesh_lib.logical_to_sharding(boxed, mesh_run.mesh)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    abstract = ckpt_lib.abstract_with_shardings(abstract, shardings)
    field_shardings = task.inference_fields(shardings)
    # A weights checkpoint: the fields made from the weights (XLA drops the moments'
    # initialisation, which no output reads).
    from_weights = jax.jit(
        lambda w: task.inference_fields(task.state_from_weights(w)),
        out_shardings=field_shardings,
        donate_argnums=0,
    )
    fields = ckpt.restore_fields(step, task.inference_fields(abstract), abstract, from_weights)
    return task.inference_state(fields)


def _open_task(workdir, step: int, stage: str | None, overrides):
    workdir = storage.path(workdir)
    ckpt, step, meta = _open(workdir, step, stage)
    config = ml_collections.ConfigDict(meta["config"])
    if overrides is not None:
        overrides(config)
    return ckpt, step, config, make_task(config)


def open_run(workdir, step: int = -1, stage: str | None = None, overrides=None,
             inference: bool = False) -> RestoredRun:  # fmt: skip
    """The run in `workdir` at `step` (-1: latest) on the mesh of its `config.mesh`
    (after `overrides(config)`), with the task's frozen params placed on that mesh.
    `stage` ('autoencoder' / 'diffusion') is required of the run when given. With
    `inference`, the state holds only what sampling and evaluation read
    (`Task.inference_fields`; the optimizer moments stay on disk). Call inside no mesh
    context: the run's mesh is made here, once."""
    ckpt, step, config, task = _open_task(workdir, step, stage, overrides)
    mesh_run = MeshRun.from_config(config.mesh)
    restore = _restore_for_inference if inference else _restore
    with jax.set_mesh(mesh_run.mesh):
        state = restore(ckpt, step, task, mesh_run)
        mesh_run.place_frozen(task.frozen_params())
    ckpt.close()
    return RestoredRun(config, task, state, step, mesh_run)


def load_run(workdir, step: int = -1, stage: str | None = None, overrides=None, sharded=False,
             inference=False):  # fmt: skip
    """-> (config, task, state, step). `stage` ('autoencoder' / 'diffusion') is required
    of the run when given; `overrides(config)` may edit the config before the task is
    built (e.g. sampling settings or the mesh). With `sharded`, the state is restored
    onto the mesh of `config.mesh` with the training shardings (its arrays' `.sharding.mesh`);
    otherwise onto this process's default device. `inference` is open_run's."""
    if sharded:
        run = open_run(workdir, step, stage, overrides, inference)
        return run.config, run.task, run.state, run.step
    ckpt, step, config, task = _open_task(workdir, step, stage, overrides)
    state = (_restore_for_inference if inference else _restore)(ckpt, step, task, None)
    ckpt.close()
    return config, task, state, step
