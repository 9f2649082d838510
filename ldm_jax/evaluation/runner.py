"""Metrics of a run's state, computed on its mesh by every process: one implementation for
the training loop's evaluators (`config.evaluation`) and `python -m ldm_jax.evaluate`.

    evaluation   runs                                    batches
    diffusion    diffusion runs without a dense          samples drawn on the mesh
                 condition                               (no data)
    restoration  diffusion runs with a dense condition   held-out images of the eval split,
                 (low_res, inpaint), or without one but  restored from their conditions on
                 with data.condition.kind='inpaint'      the mesh, and by the classical
                 (mask-guided inpainting)                baseline on the host
    autoencoder  autoencoder runs                        held-out reconstructions

Diffusion runs: samples are drawn in global batches on the mesh (sample ids i*B .. i*B+B-1,
the last batch padded and masked), each process takes its own rows of the result through
the Inception network, and every metric of `metrics.REGISTRY` named in the settings adds
them to its statistics. The samples are the same for any mesh and process count (a fixed
seed per batch). Restoration: the eval split's batches with the conditions the pipeline
draws from `data.condition.eval_seed` (the same for every process count), restored by
`task.sample_from_condition` on the mesh with the rng fold_in(PRNGKey(seed), batch index)
and by `baselines.for_kind(kind)` on each process's rows; the outputs, the baseline's and
the originals reach the metrics. Autoencoder runs: held-out batches are reconstructed on
the mesh the same way. The evaluator speaks to the run only through the task interface
(training/task.py) and a `parallel.mesh_run.MeshRun`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data import conditions, pipeline
from ldm_jax.data import images as images_lib
from ldm_jax.errors import UserError
from ldm_jax.evaluation import metrics as metrics_lib


class MaskedMeans:
    """Means over the real examples of per-example metrics `eval_step(state, batch,
    frozen) -> {k: [B]}`, over global batches with a `mask`; also the count as
    `num_examples`. Jitted once, for every evaluation of a run."""

    def __init__(self, eval_step, mesh_run):
        self.mesh_run = mesh_run

        def reduce(state, batch, frozen):
            per_example = eval_step(state, batch, frozen)
            m = batch["mask"].astype(jnp.float32)
            return {k: jnp.sum(v * m) for k, v in per_example.items()}, jnp.sum(m)

        self.sums = jax.jit(reduce, out_shardings=mesh_run.replicated)

    def __call__(self, state, batches) -> dict:
        totals, count = {}, 0.0
        for batch in batches:
            sums, n = self.sums(state, batch, self.mesh_run.frozen)
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            count += float(n)
        return {k: v / max(count, 1.0) for k, v in totals.items()} | {"num_examples": count}


class Evaluator:
    """`settings` as in `evaluation.settings.default_config`; call with the mesh-sharded
    state, on every process; returns (results, report details)."""

    def __init__(self, config, task, mesh_run, settings):
        self.config, self.task, self.mesh_run = config, task, mesh_run
        self.metrics = tuple(settings.metrics)
        self.stage = metrics_lib.check_run(config, task, self.metrics)
        self.kind = metrics_lib.restoration_kind(config, task)  # restoration: its condition
        settings = settings.copy_and_resolve_references()
        if settings.batch_size is None:
            shards = mesh_run.batch_shards
            settings.batch_size = shards * max(1, 64 // shards)
        mesh_run.check_batch("evaluation batch_size", int(settings.batch_size))
        if int(settings.num_samples) < 1:
            raise UserError(
                f"evaluation num_samples={settings.num_samples}: evaluate at least 1 sample."
            )
        self.settings = settings
        self._net, self._draw, self._recon, self._means = None, None, None, None
        self._restore = None
        if config.stage == "diffusion":
            self._check_sampling(self._sampling())

    # ----- shared pieces -------------------------------------------------------------------
    def _inception(self, report: dict):
        if self._net is None:
            from ldm_jax.evaluation import fid
            from ldm_jax.interop import inception_weights
            from ldm_jax.models import inception

            s = self.settings
            path = inception.resolve_weights(
                s.inception, cache_dir=s.inception_cache, download=s.download_inception
            )
            params = inception_weights.load_fid_params(path)
            if "is" in self.metrics and inception.LOGITS not in params:
                raise UserError(
                    f"the Inception Score needs the network's classifier head, which {path} "
                    f"lacks (it holds pool3 only). Pass pytorch-fid's {inception.PYTORCH_FID_FILE}"
                    " as the inception weights, or set download_inception to fetch it."
                )
            self._net = (fid.feature_fn(params, resize=s.resize), path)
        report["inception_weights"] = self._net[1]
        return self._net[0]

    def _data_cfg(self):
        return self.config.data.copy_and_resolve_references()

    def _report(self) -> dict:
        s = self.settings
        return {
            "settings": {
                "metrics": list(self.metrics), "num_samples": int(s.num_samples),
                "seed": int(s.seed), "dataset": self.config.data.name,
                "num_reference": s.num_reference, "resize": s.resize,
                "batch_size": int(s.batch_size), "is_splits": int(s.is_splits),
                "pr_k": int(s.pr_k),
            }
        }  # fmt: skip

    def __call__(self, state) -> tuple[dict, dict]:
        report = self._report()
        ctx = metrics_lib.Context(self.config, self.task, self.settings, report)
        classes = [metrics_lib.metric_class(self.stage, name) for name in self.metrics]
        if any(cls.needs_inception for cls in classes):
            ctx.features = self._inception(report)
        metrics = [cls(ctx) for cls in classes]
        if self.config.stage == "diffusion":
            sampling = self._sampling()
            report["settings"].update(
                sampler=sampling.sampler, steps=sampling.steps, eta=sampling.eta,
                guidance_scale=sampling.guidance_scale,
            )  # fmt: skip
            if self.kind is None:
                batches = self._sample_batches(state, sampling, ctx.features)
            else:
                batches = self._restoration_batches(state, sampling, ctx.features, report)
        else:
            per_example = any(isinstance(m, metrics_lib.ExampleMean) for m in metrics)
            batches = self._reconstruction_batches(state, ctx.features, per_example, report)
        for batch in batches:
            for metric in metrics:
                metric.update(batch)
        results = {}
        for metric in metrics:
            results.update(metric.result())
        return results, report

    # ----- diffusion -----------------------------------------------------------------------
    def _sampling(self):
        sampling = self.config.sampling.copy_and_resolve_references()
        s = self.settings
        with sampling.unlocked():
            if s.sampler is not None:
                sampling.sampler = s.sampler
            if s.steps is not None:
                sampling.steps = s.steps
            if s.guidance is not None:
                sampling.guidance_scale = s.guidance
        return sampling

    def _check_sampling(self, sampling) -> None:
        """A sampler or step count the sampler's grid cannot take fails before any work."""
        from ldm_jax.diffusion import samplers

        try:
            samplers.get_sampler(sampling.sampler)
            samplers.sampling_grid(sampling, int(self.config.diffusion.timesteps))
        except ValueError as e:
            raise UserError(
                f"evaluation sampler={sampling.sampler!r}, steps={sampling.steps}: {e}"
            ) from None

    def _draw_fn(self, sampling):
        """The jitted sampler of one global batch (one trace for every evaluation)."""
        if self._draw is None:
            task, b = self.task, int(self.settings.batch_size)
            shape = (b, task.latent_size, task.latent_size, task.first_stage.latent_channels)

            def draw(state, frozen, inputs, gid, rng):
                images = task.sample(state, frozen, inputs, rng, shape=shape, sampling=sampling)
                return images, jnp.asarray(gid)

            sharding = self.mesh_run.batch_sharding
            self._draw = jax.jit(draw, out_shardings=(sharding, sharding))
        return self._draw

    def _conditions(self, gid: np.ndarray, captions) -> list:
        """The condition sample id j is drawn for: class j mod the class count, the
        eval split's caption j mod their count, or none."""
        cond = self.task.cond
        if cond.kind == "class":
            return list(gid % cond.n_classes)
        if captions is not None:
            return [captions[j % len(captions)] for j in gid]
        return [None] * len(gid)

    def _captions(self):
        if not self.task.cond.is_text:
            return None
        split = self.settings.split or self.config.data.eval_split
        batches = pipeline.eval_batches(
            self._data_cfg(), global_batch_size=int(self.settings.batch_size), split=split,
            process_count=1, process_index=0,
        )  # fmt: skip
        return [str(c) for batch in batches for c in batch["caption"]]

    def _sample_batches(self, state, sampling, features):
        """Yields a metrics.Batch of this process's rows, global batch by global batch."""
        n, b = int(self.settings.num_samples), int(self.settings.batch_size)
        draw, captions, run = self._draw_fn(sampling), self._captions(), self.mesh_run
        for start in range(0, n, b):
            gid = np.arange(start, start + b)  # ids >= n are padding
            inputs = run.place(self.task.cond.inputs(self._conditions(gid, captions)))
            rng = jax.random.fold_in(jax.random.PRNGKey(self.settings.seed), start // b)
            images, ids = draw(state, run.frozen, inputs, gid.astype(np.int32), rng)
            ids = run.local_rows(ids)
            images = images_lib.to_uint8(run.local_rows(images))
            out = None if features is None else features(images)
            yield metrics_lib.Batch(images=images, ids=ids, mask=ids < n, features=out)

    # ----- restoration ---------------------------------------------------------------------
    def _restore_fn(self, sampling):
        """The jitted restoration of one global batch by the run (one trace for every
        evaluation): its conditioning inputs and condition arrays batch-sharded."""
        if self._restore is None:
            task = self.task
            s, c = task.latent_size, task.first_stage.latent_channels

            def restore(state, frozen, inputs, condition, rng):  # in [-1, 1] already
                if not task.from_condition:  # a layout: from its tokens alone
                    shape = (next(iter(inputs.values())).shape[0], s, s, c)
                    return task.sample(state, frozen, inputs, rng, shape=shape, sampling=sampling)
                return task.sample_from_condition(
                    state, frozen, inputs, rng, condition, sampling=sampling
                )

            self._restore = jax.jit(restore, out_shardings=self.mesh_run.batch_sharding)
        return self._restore

    def _condition_keys(self) -> tuple[str, ...]:
        return {
            "low_res": ("low_res",), "semantic": ("segmentation",), "layout": (),
        }.get(self.kind, ("image", "inpaint_mask", "masked_image"))  # fmt: skip

    def _restoration_settings(self, baseline, split: str) -> dict:
        c = conditions.settings(self.config.data.get("condition"))
        out = {"condition": self.kind, "eval_seed": int(c.eval_seed), "split": split}
        if self.kind == "low_res":
            out.update(degradation=c.degradation, factor=int(c.factor))
        elif self.kind == "semantic":
            out.update(num_classes=int(c.num_classes), map_key=c.map_key)
        elif self.kind == "layout":
            out.update(objects=dict(self.config.data.objects),
                       max_objects=int(self.task.cond.tokens.max_objects))  # fmt: skip
        else:
            out.update(
                coverage=[float(v) for v in c.coverage],
                inpainting="concat" if self.task.concat else "mask_guidance",
            )  # fmt: skip
        out.update(baseline=baseline.name, baseline_method=baseline.method, num_images=0)
        return out

    def _restoration_batches(self, state, sampling, features, report):
        """Yields a metrics.Batch per held-out global batch: this process's rows of the
        run's outputs, of the baseline's and of the originals (with their Inception
        outputs when `features`)."""
        from ldm_jax.evaluation import baselines

        s, run, task = self.settings, self.mesh_run, self.task
        split = s.split or self.config.data.eval_split
        baseline = baselines.for_kind(self.kind)
        report["settings"].update(self._restoration_settings(baseline, split))
        b = int(s.batch_size)
        batches = pipeline.eval_batches(
            self._data_cfg(), global_batch_size=b, num_examples=s.num_samples, split=split
        )
        restore, keys = self._restore_fn(sampling), self._condition_keys()
        for i, local in enumerate(batches):
            n = len(local["mask"])
            inputs = run.to_global(task.cond.host_inputs(local))
            condition = run.to_global({k: local[k] for k in keys})
            rng = jax.random.fold_in(jax.random.PRNGKey(s.seed), i)
            restored = run.local_rows(restore(state, run.frozen, inputs, condition, rng))
            outputs = {"model": np.asarray(restored, np.float32), baseline.name: baseline(local)}
            out = metrics_lib.Batch(
                images=None,
                ids=i * b + jax.process_index() * n + np.arange(n),
                mask=np.asarray(local["mask"], bool),
                originals=np.asarray(local["image"], np.float32),
                outputs=outputs,
                inpaint_mask=local.get("inpaint_mask"),
                layouts=self._requested_layouts(local),
                class_maps=local.get("segmentation"),
            )
            if features is not None:
                out.real_features = features(out.originals)
                out.side_features = {side: features(x) for side, x in outputs.items()}
            yield out

    def _requested_layouts(self, local: dict):
        """The layouts the run was given (truncated to its max_objects), or None."""
        if self.kind != "layout":
            return None
        m = self.task.cond.tokens.max_objects
        out = np.empty(len(local["layout"]), dtype=object)
        for i, lay in enumerate(local["layout"]):
            out[i] = type(lay)(lay.labels[:m], lay.boxes[:m])
        return out

    # ----- autoencoder ---------------------------------------------------------------------
    def _reconstruction_batches(self, state, features, per_example: bool, report):
        """Yields a metrics.Batch per held-out batch: the reconstructions and the
        originals through the Inception network (when `features`), and the task's
        per-example metrics summed over the real rows (when `per_example`)."""
        s, run = self.settings, self.mesh_run
        split = s.split or self.config.data.eval_split
        report["settings"].update(num_images=0, split=split)
        batches = pipeline.eval_batches(
            self._data_cfg(), global_batch_size=int(s.batch_size), num_examples=s.num_samples,
            split=split,
        )  # fmt: skip
        if self._recon is None:
            self._recon = jax.jit(self.task.reconstruct, out_shardings=run.batch_sharding)
            self._means = MaskedMeans(self.task.eval_step, run)
        for local in batches:
            batch = run.to_global(self.task.device_batch(local, with_mask=True))
            out = metrics_lib.Batch(images=None, ids=np.arange(len(local["mask"])),
                                    mask=local["mask"])  # fmt: skip
            if per_example:
                sums, count = self._means.sums(state, batch, run.frozen)
                out.example_sums, out.example_count = jax.device_get(sums), float(count)
            if features is not None:
                out.images = run.local_rows(self._recon(state, batch["image"]))
                out.features = features(out.images)
                out.real_features = features(local["image"])
            yield out
