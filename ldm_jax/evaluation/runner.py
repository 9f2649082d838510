"""Metrics of a run's state, computed on its mesh by every process: one implementation for
the training loop's evaluators (`config.evaluation`) and `python -m ldm_jax.evaluate`.

Diffusion runs: samples are drawn in global batches on the mesh (sample ids i*B .. i*B+B-1,
the last batch padded and masked), each process takes its own rows of the result through
the Inception network, and the statistics of all processes are added exactly. The
samples are therefore the same for any mesh and process count (a fixed seed per batch).
Autoencoder runs: held-out batches are reconstructed on the mesh the same way.

    metric            stage        needs
    fid               diffusion    Inception pool3 + reference statistics of a split
    is                diffusion    Inception logits (pytorch-fid's weights file)
    precision_recall  diffusion    pool3 of samples and reference images (k-NN, k=pr_k)
    accuracy          diffusion    class-conditional digits run (SVM on the real digits)
    digits_is         diffusion    IS with the digits SVM's class probabilities
    rfid, psnr, ssim, lpips        autoencoder (held-out reconstructions)
"""

from __future__ import annotations

import ml_collections
import numpy as np

from ldm_jax.errors import UserError

DIFFUSION_METRICS = ("fid", "is", "precision_recall", "accuracy", "digits_is")
AUTOENCODER_METRICS = ("rfid", "psnr", "ssim", "lpips")
_INCEPTION_METRICS = ("fid", "is", "precision_recall", "rfid")


def default_config() -> ml_collections.ConfigDict:
    """`config.evaluation`: off in training unless `every` > 0 and `metrics` are named."""
    none = lambda t: ml_collections.FieldReference(None, field_type=t)  # noqa: E731
    return ml_collections.ConfigDict(
        dict(
            metrics=(),
            every=0,  # training steps between evaluations (0: never during training)
            num_samples=1000,
            num_reference=none(int),  # reference images (None: the whole split)
            split=none(str),  # None: train (sample metrics), eval split (autoencoder)
            sampler=none(str),  # None: config.sampling's
            steps=none(int),
            guidance=none(float),
            seed=0,
            batch_size=none(int),  # global; None: the multiple of the batch shards <= 64
            resize="tf1_bilinear",  # or "torch_bilinear" (pytorch-fid's resize)
            inception=none(str),  # weights file; None: cache, then the packaged network
            inception_cache="~/.cache/ldm_jax/inception",
            download_inception=False,  # fetch pytorch-fid's weights into the cache
            stats_dir="~/.cache/ldm_jax/fid_stats",
            is_splits=10,
            pr_k=3,
        )
    )


def check_metrics(stage: str, metrics) -> None:
    allowed = DIFFUSION_METRICS if stage == "diffusion" else AUTOENCODER_METRICS
    bad = [m for m in metrics if m not in allowed]
    if bad:
        raise UserError(
            f"metric {bad[0]!r} does not apply to a {stage} run; use any of {list(allowed)}."
        )


def _local_rows(mesh, array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in its local-data order."""
    import jax
    from jax.experimental import multihost_utils

    from ldm_jax.parallel import mesh as mesh_lib

    if jax.process_count() == 1:
        return np.asarray(array)
    spec = jax.sharding.PartitionSpec(mesh_lib.BATCH_AXES)
    return np.asarray(multihost_utils.global_array_to_host_local_array(array, mesh, spec))


def _gather_rows(chunks: list) -> np.ndarray:
    """All processes' unmasked rows from a list of local (rows, mask) pairs."""
    import jax
    from jax.experimental import multihost_utils

    rows = np.concatenate([r for r, _ in chunks]).astype(np.float32)
    mask = np.concatenate([np.ones(len(r), bool) if m is None else m for r, m in chunks])
    if jax.process_count() > 1:
        rows = np.asarray(multihost_utils.process_allgather(rows, tiled=True))
        mask = np.asarray(multihost_utils.process_allgather(mask, tiled=True))
    return rows[mask]


def _sum_over_processes(x: np.ndarray) -> np.ndarray:
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return x
    return np.asarray(multihost_utils.process_allgather(x.astype(np.float32))).sum(axis=0)


def masked_means(mesh, eval_step, batches, to_global, state, frozen) -> dict:
    """Means over the real examples of per-example metrics `eval_step(state, batch, frozen)`
    -> {k: [B]}, over `batches` of local rows with a `mask` (`to_global` makes the global
    batch); also the count as `num_examples`."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.parallel import mesh as mesh_lib

    def reduce(state, batch, frozen):
        per_example = eval_step(state, batch, frozen)
        m = batch["mask"].astype(jnp.float32)
        return {k: jnp.sum(v * m) for k, v in per_example.items()}, jnp.sum(m)

    jitted = jax.jit(reduce, out_shardings=mesh_lib.replicated(mesh))
    totals, count = {}, 0.0
    for local in batches:
        sums, n = jitted(state, to_global(local), frozen)
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        count += float(n)
    return {k: v / max(count, 1.0) for k, v in totals.items()} | {"num_examples": count}


class Evaluator:
    """`settings` as in `default_config`; call with the (mesh-sharded) state and the
    frozen params, on every process; returns (results, report details)."""

    def __init__(self, config, task, mesh, settings):
        import jax

        from ldm_jax.parallel import mesh as mesh_lib

        self.config, self.task, self.mesh, self.s = config, task, mesh, settings
        self.metrics = tuple(settings.metrics)
        check_metrics(config.stage, self.metrics)
        shards = mesh_lib.batch_size_per_shard(mesh)
        if settings.batch_size is None:
            settings = settings.copy_and_resolve_references()
            settings.batch_size = shards * max(1, 64 // shards)
            self.s = settings
        b = int(settings.batch_size)
        if b % shards or b % jax.process_count():
            raise UserError(
                f"evaluation batch_size={b} must be divisible by the {shards} batch shards of "
                f"the mesh and the {jax.process_count()} processes; change it."
            )
        if config.stage == "diffusion":
            self._check_diffusion()
        self._net, self._draw = None, None

    # ----- shared pieces -------------------------------------------------------------------
    def _to_global(self, local: dict) -> dict:
        """The global device batch of this process's rows (images, labels, mask)."""
        import jax

        from ldm_jax.parallel import mesh as mesh_lib

        sharding = mesh_lib.batch_sharding(self.mesh)
        return {
            k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in self.task.device_batch(local, with_mask=True).items()
        }

    def _inception(self, report: dict):
        if self._net is None:
            from ldm_jax.evaluation import fid
            from ldm_jax.models import inception

            s = self.s
            path = inception.resolve_weights(
                s.inception, cache_dir=s.inception_cache, download=s.download_inception
            )
            params = inception.load_fid_params(path)
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

    # ----- diffusion -----------------------------------------------------------------------
    def _check_diffusion(self) -> None:
        task, m = self.task, self.metrics
        if ("accuracy" in m or "digits_is" in m) and (
            task.cond.kind != "class" or self.config.data.name != "digits"
        ):
            raise UserError(
                "metrics accuracy and digits_is need a class-conditional run on digits (the "
                "classifier is trained on the real digits)."
            )
        if task.concat:
            raise UserError(
                "sample metrics of a concat-conditioned model (low-res image, mask, map) need "
                "a dense condition per sample, which the evaluator does not draw yet."
            )

    def _sampling(self):
        sc = self.config.sampling.copy_and_resolve_references()
        s = self.s
        with sc.unlocked():
            if s.sampler is not None:
                sc.sampler = s.sampler
            if s.steps is not None:
                sc.steps = s.steps
            if s.guidance is not None:
                sc.guidance_scale = s.guidance
        return sc

    def _samples(self, state, frozen, sampling):
        """Yields (local uint8 images, local global ids, local mask) batch by batch."""
        import jax
        import jax.numpy as jnp

        from ldm_jax.data import pipeline
        from ldm_jax.parallel import mesh as mesh_lib
        from ldm_jax.training import outputs

        task, n, b = self.task, int(self.s.num_samples), int(self.s.batch_size)
        shape = (b, task.latent_size, task.latent_size, task.first_stage.latent_channels)
        batch_sharding = mesh_lib.batch_sharding(self.mesh)

        def draw(state, frozen, inputs, gid, rng):
            images = task.sample(state, frozen, inputs, rng, shape=shape, sampling=sampling)
            return images, jnp.asarray(gid)

        if getattr(self, "_draw", None) is None:  # one trace for every evaluation of a run
            self._draw = jax.jit(draw, out_shardings=(batch_sharding, batch_sharding))
        draw = self._draw
        captions = None
        if task.cond.is_text:
            split = self.s.split or self.config.data.eval_split
            captions = [
                str(c)
                for batch in pipeline.eval_batches(
                    self._data_cfg(), global_batch_size=b, split=split, process_count=1,
                    process_index=0,
                )
                for c in batch["caption"]
            ]  # fmt: skip
        replicated = mesh_lib.replicated(self.mesh)
        for start in range(0, n, b):
            gid = np.arange(start, start + b)  # ids >= n are padding
            if task.cond.kind == "class":
                inputs = task.cond.labels_inputs(gid % task.cond.n_classes)
            elif captions is not None:
                inputs = task.cond.encode_prompts([captions[j % len(captions)] for j in gid])
            else:
                inputs = {}
            inputs = jax.device_put(inputs, replicated)
            rng = jax.random.fold_in(jax.random.PRNGKey(self.s.seed), start // b)
            images, ids = draw(state, frozen, inputs, gid.astype(np.int32), rng)
            ids = _local_rows(self.mesh, ids)
            yield outputs.to_uint8(_local_rows(self.mesh, images)), ids, ids < n

    def _diffusion(self, state, frozen, report) -> dict:
        from ldm_jax.evaluation import fid
        from ldm_jax.evaluation.frechet import FeatureStats, fid_from_stats
        from ldm_jax.evaluation.inception_score import ScoreStats
        from ldm_jax.evaluation.precision_recall import precision_recall

        m, s, n = self.metrics, self.s, int(self.s.num_samples)
        sampling = self._sampling()
        needs_net = any(k in m for k in _INCEPTION_METRICS)
        features = self._inception(report) if needs_net else None
        gen, fake_rows = FeatureStats(2048), []
        score = ScoreStats(1008, n, s.is_splits) if "is" in m else None
        clf, digits_score, correct = None, None, np.zeros(2)
        if "accuracy" in m or "digits_is" in m:
            from ldm_jax.evaluation.digits_classifier import DigitsClassifier

            clf = DigitsClassifier(self.config.data.data_dir)
            digits_score = ScoreStats(10, n, s.is_splits) if "digits_is" in m else None
        n_classes = getattr(self.task.cond, "n_classes", 0) or 1
        for images, ids, mask in self._samples(state, frozen, sampling):
            if features is not None:
                out = features(images)
                pool3 = np.asarray(out["pool3"])
                gen.update(pool3, mask)
                if "precision_recall" in m:
                    fake_rows.append((pool3, mask))
                if score is not None:
                    score.update(np.asarray(out["logits"]), ids, mask)
            if clf is not None:
                x = images.astype(np.float32) / 127.5 - 1.0
                labels = ids % n_classes
                correct += [np.sum((clf.predict(x) == labels) & mask), np.sum(mask)]
                if digits_score is not None:
                    digits_score.update(clf.probabilities(x), ids, mask, probs=True)
        results = {}
        if "fid" in m or "precision_recall" in m:
            data_cfg = self._data_cfg()
            split = s.split or data_cfg.train_split
            real_rows = [] if "precision_recall" in m else None
            ref, prov, path = fid.dataset_stats(
                data_cfg, split=split, num_images=s.num_reference, features=features,
                weights=report["inception_weights"], resize=s.resize,
                batch_size=int(s.batch_size), cache_dir=s.stats_dir, keep=real_rows,
            )  # fmt: skip
            report["reference_stats"] = {"path": str(path), **prov}
            report["settings"]["split"] = split
            if "fid" in m:
                results["fid"] = fid_from_stats(gen.all_processes(), ref)
            if real_rows is not None:
                pr = precision_recall(
                    _gather_rows(real_rows), _gather_rows(fake_rows), k=int(s.pr_k)
                )
                results.update(pr)
        if score is not None:
            results["is"], results["is_std"] = score.all_processes().score()
        if digits_score is not None:
            results["digits_is"], results["digits_is_std"] = digits_score.all_processes().score()
        if "accuracy" in m:
            total = _sum_over_processes(correct)
            results["accuracy"] = float(total[0] / total[1])
            report["classifier_real_test_accuracy"] = clf.real_test_accuracy
        report["settings"].update(
            sampler=sampling.sampler, steps=sampling.steps, eta=sampling.eta,
            guidance_scale=sampling.guidance_scale,
        )  # fmt: skip
        return results

    # ----- autoencoder ---------------------------------------------------------------------
    def _autoencoder(self, state, frozen, report) -> dict:
        import jax

        from ldm_jax.data import pipeline
        from ldm_jax.evaluation.frechet import FeatureStats, fid_from_stats
        from ldm_jax.parallel import mesh as mesh_lib

        m, s = self.metrics, self.s
        data_cfg = self._data_cfg()
        split = s.split or data_cfg.eval_split

        def batches():
            return pipeline.eval_batches(
                data_cfg, global_batch_size=int(s.batch_size), num_examples=s.num_samples,
                split=split,
            )  # fmt: skip

        results, count = {}, 0.0
        wanted = [k for k in ("psnr", "ssim", "lpips") if k in m]
        if wanted:
            means = masked_means(
                self.mesh, self.task.eval_step, batches(), self._to_global, state, frozen
            )
            results = {k: means[k] for k in wanted}
            count = means["num_examples"]
        if "rfid" in m:
            features = self._inception(report)
            recon = jax.jit(self.task.reconstruct, out_shardings=mesh_lib.batch_sharding(self.mesh))
            real, fake = FeatureStats(2048), FeatureStats(2048)
            for local in batches():
                mask = local["mask"]
                out = _local_rows(self.mesh, recon(state, self._to_global(local)["image"]))
                real.update(np.asarray(features(local["image"])["pool3"]), mask)
                fake.update(np.asarray(features(out)["pool3"]), mask)
            fake, real = fake.all_processes(), real.all_processes()
            results["rfid"] = fid_from_stats(fake, real)
            count = real.count
        report["settings"].update(num_images=int(count), split=split)
        return results

    def __call__(self, state, frozen) -> tuple[dict, dict]:
        s = self.s
        report = {
            "settings": {
                "metrics": list(self.metrics), "num_samples": int(s.num_samples),
                "seed": int(s.seed), "dataset": self.config.data.name,
                "num_reference": s.num_reference, "resize": s.resize,
                "batch_size": int(s.batch_size), "is_splits": int(s.is_splits),
                "pr_k": int(s.pr_k),
            }
        }  # fmt: skip
        if self.config.stage == "diffusion":
            results = self._diffusion(state, frozen, report)
        else:
            results = self._autoencoder(state, frozen, report)
        return results, report
