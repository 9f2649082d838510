"""The training loop both stages share.

config -> data iterator -> task (model + loss + pure step) -> jitted sharded step ->
(checkpoints, metrics, images, evaluation). The loop knows nothing about either stage:
a task provides `init_state`, `train_step`, `eval_step`, `frozen_params`,
`device_batch` and `sample_grid`.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from tqdm import tqdm

from ldm_jax.data import datasets as datasets_lib
from ldm_jax.data import pipeline
from ldm_jax.errors import UserError
from ldm_jax.evaluation import runner
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import step as step_lib
from ldm_jax.training import checkpoint as ckpt_lib
from ldm_jax.training import outputs, preemption


class NonFiniteLossError(RuntimeError):
    """Loss or gradients became NaN/Inf; the run stops, earlier checkpoints are kept."""


def make_task(config):
    if config.stage == "autoencoder":
        from ldm_jax.training.autoencoder import AutoencoderTask

        return AutoencoderTask(config)
    if config.stage == "diffusion":
        from ldm_jax.training.diffusion import DiffusionTask

        return DiffusionTask(config)
    raise UserError(f"unknown config.stage {config.stage!r}; valid: ['autoencoder', 'diffusion']")


def _check_batch(name: str, batch_size: int, mesh) -> None:
    shards, procs = mesh_lib.batch_size_per_shard(mesh), jax.process_count()
    if batch_size % shards or batch_size % procs:
        raise UserError(
            f"{name}={batch_size} must be divisible by the {shards} batch shards of the mesh "
            f"{dict(mesh.shape)} and the {procs} processes; change {name} or config.mesh."
        )


def _prepare_data(config) -> None:
    """Prepares the project's embedded datasets on process 0 if missing, then syncs."""
    dc = config.data
    if (
        jax.process_index() == 0
        and dc.prepare_if_missing
        and dc.name in datasets_lib.PROJECT_DATASETS
    ):
        datasets_lib.prepare(dc.name, dc.data_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("ldm_jax:data_prepared")


class Trainer:
    def __init__(self, config, workdir):
        self.config = config
        self.workdir = pathlib.Path(workdir).absolute()
        self.is_lead = jax.process_index() == 0
        if config.train.on_nonfinite not in ("stop", "skip"):
            raise UserError(
                f"config.train.on_nonfinite={config.train.on_nonfinite!r}; use 'stop' (raise "
                "naming the step) or 'skip' (drop non-finite updates and count them)."
            )
        self.task = make_task(config)
        self.task.validate()
        self.mesh = mesh_lib.make_mesh(config.mesh)
        _check_batch("config.batch_size", config.batch_size, self.mesh)
        accum = int(config.train.get("grad_accum_steps", 1) or 1)
        if accum > 1:
            _check_batch(
                f"config.batch_size / grad_accum_steps = {config.batch_size}/{accum}",
                config.batch_size // accum,
                self.mesh,
            )
        _check_batch("config.train.eval_batch_size", config.train.eval_batch_size, self.mesh)
        if config.get("latent_cache") and config.latent_cache.enabled:
            _check_batch(
                "config.latent_cache.batch_size", config.latent_cache.batch_size, self.mesh
            )
        self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
        self.replicated = mesh_lib.replicated(self.mesh)
        ec = config.get("evaluation")
        if ec is not None and ec.every and ec.metrics:  # bad settings fail before training
            runner.check_metrics(config.stage, ec.metrics)
        self._evaluator = None

    # ----- helpers -----------------------------------------------------------------------
    def _global_batch(self, local: dict) -> dict:
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local.items()
        }

    def _encode_on_mesh(self, fn):
        """fn(frozen, images) -> (jitted images -> batch-sharded output, _global_batch)."""
        jitted = jax.jit(fn, in_shardings=(self.replicated, self.batch_sharding))
        return (lambda images: jitted(self.frozen, images)), self._global_batch

    def _init_or_restore(self, ckpt, train_iter):
        rng = jax.random.PRNGKey(self.config.seed)
        init_rng, self.step_rng = jax.random.split(rng)
        boxed = jax.eval_shape(self.task.init_state, init_rng)
        self.state_shardings = mesh_lib.logical_to_sharding(boxed, self.mesh)
        latest = ckpt.latest_step()
        if latest is None:
            init = jax.jit(
                lambda r: nn.unbox(self.task.init_state(r)), out_shardings=self.state_shardings
            )
            state = init(init_rng)
            if hasattr(self.task, "initialize_from_batch"):
                # e.g. scale_by_std: statistics of the first training batch; the iterator is
                # rewound so that training still starts with that batch.
                first = train_iter.get_state()
                batch = self._global_batch(self.task.device_batch(next(train_iter)))
                train_iter.set_state(first)
                state = jax.jit(
                    self.task.initialize_from_batch, out_shardings=self.state_shardings
                )(state, batch, self.frozen, jax.random.fold_in(init_rng, 1))
            return state, 0
        ckpt.check_compatible(latest, self.config)
        abstract = ckpt_lib.abstract_with_shardings(nn.unbox(boxed), self.state_shardings)
        state, data_state = ckpt.restore(latest, abstract)
        train_iter.set_state(data_state)
        if self.is_lead:
            print(f"resumed from {ckpt.directory / str(latest)} (step {latest})", flush=True)
        return state, latest

    def _check_finite(self, state, ckpt) -> int:
        bad = int(jax.device_get(state.bad_step))
        if bad >= 0 and self.config.train.on_nonfinite == "stop":
            ckpt.wait()
            last = ckpt.latest_step()
            where = f"{ckpt.directory / str(last)}" if last is not None else "none was written"
            raise NonFiniteLossError(
                f"loss or gradients became NaN/Inf at step {bad}; stopping. The last good "
                f"checkpoint is kept ({where}) and nothing after step {bad} was saved. Lower the "
                "learning rate or set config.train.on_nonfinite='skip' to drop such updates."
            )
        return int(jax.device_get(state.skipped))

    # ----- evaluation --------------------------------------------------------------------
    def evaluate(self, state) -> dict:
        """The task's per-example eval metrics (e.g. the EMA loss, PSNR) on held-out data."""
        tc = self.config.train
        batches = pipeline.eval_batches(
            self.config.data, global_batch_size=tc.eval_batch_size, num_examples=tc.eval_examples
        )
        to_global = lambda local: self._global_batch(self.task.device_batch(local, with_mask=True))
        return runner.masked_means(
            self.mesh, self.task.eval_step, batches, to_global, state, self.frozen
        )

    def run_evaluators(self, state, step: int, writer) -> dict | None:
        """`config.evaluation`'s sample metrics (FID, IS, ...) every `every` steps, on all
        processes; logged under metrics/ and written to <workdir>/eval/."""
        ec = self.config.get("evaluation")
        if ec is None or not ec.every or not ec.metrics or step % ec.every:
            return None
        if self._evaluator is None:
            self._evaluator = runner.Evaluator(self.config, self.task, self.mesh, ec)
        results, details = self._evaluator(state, self.frozen)
        writer.scalars(step, {f"metrics/{k}": v for k, v in results.items()})
        if self.is_lead:
            out = self.workdir / "eval" / f"train_step{step:07d}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            report = {"step": step, **details, "results": results}
            out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        return results

    def save_samples(self, state, step: int, writer) -> pathlib.Path | None:
        tc = self.config.train
        rows = tc.num_image_rows
        local = next(
            iter(pipeline.eval_batches(self.config.data, global_batch_size=tc.eval_batch_size))
        )
        batch = self._global_batch(self.task.device_batch(local, with_mask=True))
        grid_rows = self.task.sample_grid(
            state, batch, rows, self.frozen
        )  # list of [N, H, W, 3] uint8
        if not self.is_lead:
            return None
        grid = outputs.image_grid(grid_rows)
        path = self.workdir / "images" / f"{self.task.stage}_{step:07d}.png"
        upscale = max(1, 256 // grid_rows[0].shape[1])
        outputs.save_png(path, grid, upscale=min(upscale, 4))
        writer.image(step, "samples", grid)
        return path

    # ----- the loop ----------------------------------------------------------------------
    def run(self) -> dict:
        config, tc = self.config, self.config.train
        self.workdir.mkdir(parents=True, exist_ok=True)
        _prepare_data(config)
        ckpt = ckpt_lib.Checkpointer(self.workdir / "checkpoints", keep=tc.keep_checkpoints)
        with jax.set_mesh(self.mesh):
            # Through host memory: a single-device array cannot move onto a mesh that
            # spans other processes' devices.
            frozen = jax.device_get(self.task.frozen_params())
            self.frozen = jax.device_put(frozen, self.replicated)
            source = None
            if hasattr(self.task, "train_source"):  # e.g. a latent cache
                source = self.task.train_source(self._encode_on_mesh)
            train_iter = pipeline.TrainIterator(
                config.data, global_batch_size=config.batch_size, seed=config.seed, source=source
            )
            state, start = self._init_or_restore(ckpt, train_iter)
            step_fn = step_lib.jit_train_step(self.task, self.mesh, self.state_shardings)
            writer = outputs.MetricWriter(self.workdir)
            result = self._train(state, start, step_fn, train_iter, ckpt, writer)
            writer.close()
        ckpt.close()
        return result

    def _train(self, state, start, step_fn, train_iter, ckpt, writer) -> dict:
        config, tc = self.config, self.config.train
        num_steps = tc.num_steps
        bar = tqdm(
            total=num_steps,
            initial=start,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.is_lead and tc.progress_bar),
        )
        t0, timed_steps, last_metrics, image_path = time.time(), 0, {}, None
        t_first, done, preempted = None, start, False
        watch = preemption.PreemptionWatch(tc.preemption_check_every)
        for step in range(start, num_steps):
            batch = self._global_batch(self.task.device_batch(next(train_iter)))
            state, metrics = step_fn(state, batch, self.step_rng, self.frozen)
            done = step + 1
            if t_first is None:  # exclude compilation from the throughput figure
                jax.block_until_ready(metrics)
                t_first, timed_steps = time.time(), 0
            else:
                timed_steps += 1
            is_last = done == num_steps
            if done % tc.log_every == 0 or is_last:
                last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                skipped = self._check_finite(state, ckpt)
                elapsed = time.time() - t_first
                rate = timed_steps * config.batch_size / elapsed if timed_steps else 0.0
                last_metrics |= {"skipped_steps": skipped, "images_per_sec": rate}
                writer.scalars(done, last_metrics)
                # Steps are dispatched asynchronously; the bar moves only when they are done.
                bar.update(done - bar.n)
                bar.set_postfix(loss=f"{last_metrics['loss']:.4g}", img_s=f"{rate:.1f}")
            if done % tc.image_every == 0 or is_last:
                image_path = self.save_samples(state, done, writer) or image_path
            eval_metrics = None
            if done % tc.eval_every == 0 or is_last:
                eval_metrics = self.evaluate(state)
                writer.scalars(done, {f"eval/{k}": v for k, v in eval_metrics.items()})
                if self.is_lead:
                    bar.write(f"step {done}: " + _fmt(eval_metrics))
            sample_metrics = self.run_evaluators(state, done, writer)
            if sample_metrics and self.is_lead:
                bar.write(f"step {done}: " + _fmt(sample_metrics))
            saving = done % tc.checkpoint_every == 0 or is_last
            preempted = not is_last and watch.should_stop(done)
            if saving or preempted:
                self._check_finite(state, ckpt)
                ckpt.save(done, state, train_iter.get_state(), config, force=True)
            if preempted:
                if self.is_lead:
                    bar.write(f"preemption requested (SIGTERM): saved step {done}, stopping")
                break
        watch.close()
        bar.close()
        ckpt.wait()
        result = {
            "stage": self.task.stage,
            "step": done,
            "preempted": preempted,
            "eval": eval_metrics if start < num_steps else self.evaluate(state),
            "train": last_metrics,
            "wall_seconds": time.time() - t0,
            "workdir": str(self.workdir),
            "checkpoint": str(ckpt.directory / str(ckpt.latest_step())),
            "samples_png": str(image_path) if image_path else None,
        }
        if self.is_lead:
            (self.workdir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        return result


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def run(config, workdir) -> dict:
    """Trains (or resumes) the experiment `config` in `workdir`; returns the final metrics."""
    return Trainer(config, workdir).run()
