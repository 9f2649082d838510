"""The training loop both stages share.

config -> data iterator -> task (model + loss + pure step) -> jitted sharded step ->
(checkpoints, metrics, images, evaluation). The loop knows nothing about either stage:
it speaks to a task only through the interface of `training/task.py`, and to the
devices only through one `MeshRun` (parallel/mesh_run.py).
"""

from __future__ import annotations

import json
import time

import jax
from flax import linen as nn
from jax.experimental import multihost_utils

from ldm_jax import storage
from ldm_jax.data import datasets as datasets_lib
from ldm_jax.data import images as images_lib
from ldm_jax.data import pipeline
from ldm_jax.errors import UserError
from ldm_jax.evaluation import metrics as metrics_lib
from ldm_jax.evaluation.runner import Evaluator, MaskedMeans
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import step as step_lib
from ldm_jax.parallel.mesh_run import MeshRun
from ldm_jax.training import checkpoint as ckpt_lib
from ldm_jax.training import curves, dispatch, outputs, preemption, progress, telemetry
from ldm_jax.training.task import make_task


class NonFiniteLossError(RuntimeError):
    """Loss or gradients became NaN/Inf; the run stops, earlier checkpoints are kept."""


def _prepare_data(config) -> None:
    """Prepares the project's embedded datasets on process 0 if missing, then syncs."""
    data_cfg = config.data
    if (
        jax.process_index() == 0
        and data_cfg.prepare_if_missing
        and data_cfg.name in datasets_lib.PROJECT_DATASETS
    ):
        datasets_lib.prepare(data_cfg.name, data_cfg.data_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("ldm_jax:data_prepared")


def _check_batches(config, mesh_run: MeshRun) -> None:
    """Every global batch the run will make splits over the mesh and the processes."""
    mesh_run.check_batch("config.batch_size", config.batch_size)
    accum = int(config.train.get("grad_accum_steps", 1) or 1)
    if accum > 1:
        mesh_run.check_batch(
            f"config.batch_size / grad_accum_steps = {config.batch_size}/{accum}",
            config.batch_size // accum,
        )
    mesh_run.check_batch("config.train.eval_batch_size", config.train.eval_batch_size)
    if config.get("latent_cache") and config.latent_cache.enabled:
        mesh_run.check_batch("config.latent_cache.batch_size", config.latent_cache.batch_size)


class Trainer:
    def __init__(self, config, workdir):
        self.config = config
        self.workdir = storage.path(workdir)  # gs:// stays a URL
        if self.workdir.exists() and not self.workdir.is_dir():
            raise UserError(f"--workdir {self.workdir} is a file; give a directory for the run.")
        self.is_lead = jax.process_index() == 0
        if config.train.on_nonfinite not in ("stop", "skip"):
            raise UserError(
                f"config.train.on_nonfinite={config.train.on_nonfinite!r}; use 'stop' (raise "
                "naming the step) or 'skip' (drop non-finite updates and count them)."
            )
        self.task = make_task(config)
        self.task.validate()
        self.mesh_run = MeshRun.from_config(config.mesh)
        self.mesh = self.mesh_run.mesh
        _check_batches(config, self.mesh_run)
        eval_cfg = config.get("evaluation")
        if eval_cfg is not None and eval_cfg.every and eval_cfg.metrics:
            metrics_lib.check_run(config, self.task, eval_cfg.metrics)  # fail before training
        self._evaluator, self._eval_means = None, None

    @property
    def frozen(self):
        return self.mesh_run.frozen

    def _device_batch(self, local: dict, with_mask: bool = False) -> dict:
        return self.mesh_run.to_global(self.task.device_batch(local, with_mask=with_mask))

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
            if self.task.uses_first_batch:
                # e.g. scale_by_std: statistics of the first training batch; the iterator is
                # rewound so that training still starts with that batch.
                first = train_iter.get_state()
                batch = self._device_batch(next(train_iter))
                train_iter.set_state(first)
                state = jax.jit(
                    self.task.initialize_from_batch, out_shardings=self.state_shardings
                )(state, batch, self.frozen, jax.random.fold_in(init_rng, 1))
            return state, 0
        ckpt.check_compatible(latest, self.config)
        abstract = ckpt_lib.abstract_with_shardings(nn.unbox(boxed), self.state_shardings)
        complete = jax.jit(
            self.task.state_from_weights, out_shardings=self.state_shardings, donate_argnums=0
        )
        state, data_state = ckpt.restore(latest, abstract, complete)
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
        train_cfg = self.config.train
        batches = pipeline.eval_batches(
            self.config.data,
            global_batch_size=train_cfg.eval_batch_size,
            num_examples=train_cfg.eval_examples,
        )
        if self._eval_means is None:  # one trace for every evaluation of the run
            self._eval_means = MaskedMeans(self.task.eval_step, self.mesh_run)
        return self._eval_means(state, (self._device_batch(b, True) for b in batches))

    def run_evaluators(self, state, step: int, writer) -> dict | None:
        """`config.evaluation`'s sample metrics (FID, IS, ...) every `every` steps, on all
        processes; logged under metrics/ and written to <workdir>/eval/."""
        eval_cfg = self.config.get("evaluation")
        if eval_cfg is None or not eval_cfg.every or not eval_cfg.metrics or step % eval_cfg.every:
            return None
        if self._evaluator is None:
            self._evaluator = Evaluator(self.config, self.task, self.mesh_run, eval_cfg)
        results, details = self._evaluator(state)
        writer.scalars(step, {f"metrics/{k}": v for k, v in results.items()})
        if self.is_lead:
            out = self.workdir / "eval" / f"train_step{step:07d}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            report = {"step": step, **details, "results": results}
            out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        return results

    def save_samples(self, state, step: int, writer) -> storage.Path | None:
        train_cfg = self.config.train
        local = next(
            iter(
                pipeline.eval_batches(self.config.data, global_batch_size=train_cfg.eval_batch_size)
            )
        )
        batch = self._device_batch(local, with_mask=True)
        # a list of [N, H, W, 3] uint8 rows
        grid_rows = self.task.sample_grid(state, batch, train_cfg.num_image_rows, self.frozen)
        if not self.is_lead:
            return None
        upscale = min(max(1, 256 // grid_rows[0].shape[1]), 4)
        grid = images_lib.image_grid(grid_rows, upscale=upscale)
        captions = self.task.grid_captions(batch, train_cfg.num_image_rows)
        if captions:
            grid = images_lib.caption_columns(grid, captions, grid_rows[0].shape[2] * upscale)
        path = self.workdir / "images" / f"{self.task.stage}_{step:07d}.png"
        images_lib.save_png(path, grid)
        writer.image(step, "samples", grid)
        return path

    # ----- the loop ----------------------------------------------------------------------
    def run(self) -> dict:
        config = self.config
        self.workdir.mkdir(parents=True, exist_ok=True)
        _prepare_data(config)
        ckpt = ckpt_lib.Checkpointer(
            self.workdir / "checkpoints", keep=config.train.keep_checkpoints
        )
        with jax.set_mesh(self.mesh):
            self.mesh_run.place_frozen(self.task.frozen_params())
            source = self.task.train_source(self.mesh_run)  # e.g. a latent cache, or None
            train_iter = pipeline.TrainIterator(
                config.data, global_batch_size=config.batch_size, seed=config.seed, source=source
            )
            state, start = self._init_or_restore(ckpt, train_iter)
            # Kept on the trainer: its trace count is checked (one trace per run).
            self.step_fn = step_fn = step_lib.jit_train_step(
                self.task, self.mesh, self.state_shardings
            )
            writer = outputs.MetricWriter(self.workdir, config)
            result = self._train(state, start, step_fn, train_iter, ckpt, writer)
            writer.close()
            train_iter.close()  # stops data.num_workers' processes now, not at collection
        ckpt.close()
        return result

    def _periodic_work_due(self, done: int) -> bool:
        """Whether step `done` writes images, evaluates or saves a checkpoint."""
        train_cfg, eval_cfg = self.config.train, self.config.get("evaluation")
        every = [train_cfg.image_every, train_cfg.eval_every, train_cfg.checkpoint_every]
        if eval_cfg is not None and eval_cfg.every and eval_cfg.metrics:
            every.append(eval_cfg.every)
        return any(_due(done, n) for n in every)

    def _train(self, state, start, step_fn, train_iter, ckpt, writer) -> dict:
        config, train_cfg = self.config, self.config.train
        num_steps = train_cfg.num_steps
        bar = progress.Progress(num_steps, start, lead=self.is_lead, show=train_cfg.progress_bar)
        t0, last_metrics, image_path, throughput = time.time(), {}, None, {}
        done, preempted = start, False
        watch = preemption.PreemptionWatch(train_cfg.preemption_check_every)
        clock = telemetry.StepTelemetry(
            config.batch_size, train_cfg.get("peak_flops_per_device", 0.0)
        )
        profiler = telemetry.Profiler(self.workdir, train_cfg.get("profile_steps", ()))
        window = dispatch.DispatchWindow(train_cfg.get("max_steps_in_flight", 4))
        for step in range(start, num_steps):
            clock.input_started()
            batch = self._device_batch(next(train_iter))
            clock.input_done()
            if step == start:
                dispatch.compile_together(step_fn, (state, batch, self.step_rng, self.frozen))
            profiler.before_step(step + 1)
            state, metrics = step_fn(state, batch, self.step_rng, self.frozen)
            done = step + 1
            window.push(metrics)
            profiler.after_step(done, state)
            if step == start:  # exclude compilation from the throughput figures
                jax.block_until_ready(metrics)
                clock.measure_flops(step_fn, state, batch, self.step_rng, self.frozen)
                clock.started()
            else:
                clock.step_done()
            is_last = done == num_steps
            if _due(done, train_cfg.log_every) or is_last:
                last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                skipped = self._check_finite(state, ckpt)
                throughput = clock.interval() or throughput
                last_metrics |= {"skipped_steps": skipped}
                writer.scalars(done, last_metrics | {f"perf/{k}": v for k, v in throughput.items()})
                bar.update(done, last_metrics["loss"], throughput)
            periodic = self._periodic_work_due(done) and not is_last
            if periodic:  # images, evaluation, checkpoints: not step time
                clock.pause(state)
            if _due(done, train_cfg.image_every) or is_last:
                image_path = self.save_samples(state, done, writer) or image_path
            eval_metrics = None
            if _due(done, train_cfg.eval_every) or is_last:
                eval_metrics = self.evaluate(state)
                writer.scalars(done, {f"eval/{k}": v for k, v in eval_metrics.items()})
                if self.is_lead:
                    bar.write(f"step {done}: " + _fmt(eval_metrics))
            sample_metrics = self.run_evaluators(state, done, writer)
            if sample_metrics and self.is_lead:
                bar.write(f"step {done}: " + _fmt(sample_metrics))
            saving = _due(done, train_cfg.checkpoint_every) or is_last
            preempted = not is_last and watch.should_stop(done)
            if saving or preempted:
                self._check_finite(state, ckpt)
                ckpt.save(done, state, train_iter.get_state(), config, force=True)
            if periodic:
                clock.resume()
            if preempted:
                if self.is_lead:
                    bar.write(f"preemption requested (SIGTERM): saved step {done}, stopping")
                break
        watch.close()
        profiler.stop(state)
        bar.close()
        if self.is_lead and throughput:
            print("throughput: " + _fmt_throughput(throughput), flush=True)
        ckpt.wait()
        result = {
            "stage": self.task.stage,
            "step": done,
            "preempted": preempted,
            "eval": eval_metrics if start < num_steps else self.evaluate(state),
            "train": last_metrics,
            "throughput": throughput,
            "wall_seconds": time.time() - t0,
            "workdir": str(self.workdir),
            "checkpoint": str(ckpt.directory / str(ckpt.latest_step())),
            "samples_png": str(image_path) if image_path else None,
            "curves_png": None,
        }
        if self.is_lead and curves.write_curves(writer.log_path, self.workdir / "curves.png"):
            result["curves_png"] = str(self.workdir / "curves.png")
        if self.is_lead:
            (self.workdir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        return result


def _due(done: int, every: int) -> bool:
    """Whether step `done` is one of every `every` steps (0: none; the last step's work is
    done regardless)."""
    return every > 0 and done % every == 0


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def _fmt_throughput(t: dict) -> str:
    """One console line of the last interval's throughput figures."""
    parts = [
        f"{t['images_per_sec']:.1f} images/s ({t['images_per_sec_per_device']:.2f} per device)",
        f"step {t['step_ms']:.1f} ms",
        f"input {t['input_ms']:.1f} ms ({100 * t['input_share']:.0f}% of the step)",
    ]
    if "mfu" in t:
        parts.append(f"MFU {100 * t['mfu']:.1f}%")
    if "memory_gb" in t:
        parts.append(f"memory {t['memory_gb']:.2f} GB (peak {t.get('peak_memory_gb', 0):.2f})")
    return ", ".join(parts)


def run(config, workdir) -> dict:
    """Trains (or resumes) the experiment `config` in `workdir`; returns the final metrics."""
    return Trainer(config, workdir).run()
