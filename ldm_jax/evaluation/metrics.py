"""One accumulator per metric, behind a registry: a new metric is one new class here.

The evaluator (runner.py) makes the batches; every metric named in the settings sees
each of them (`update`) and gives its figures at the end (`result`). A batch holds this
process's rows only; metrics add them to float64 sums that are combined exactly across
processes, so the figures do not depend on the mesh or the process count.

    metric            stage        needs
    fid               diffusion    Inception pool3 + reference statistics of a split
    is                diffusion    Inception logits (pytorch-fid's weights file)
    precision_recall  diffusion    pool3 of samples and reference images (k-NN, k=pr_k)
    accuracy          diffusion    class-conditional digits run (SVM on the real digits)
    digits_is         diffusion    IS with the digits SVM's class probabilities
    rfid              autoencoder  Inception pool3 of originals and reconstructions
    psnr, ssim, lpips autoencoder  the task's per-example eval step
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from ldm_jax.errors import UserError
from ldm_jax.evaluation.frechet import FeatureStats, fid_from_stats
from ldm_jax.evaluation.inception_score import ScoreStats


@dataclasses.dataclass
class Batch:
    """One evaluation batch: this process's rows."""

    images: np.ndarray | None  # [n, H, W, 3]: uint8 samples, or float reconstructions
    ids: np.ndarray  # [n] global sample ids
    mask: np.ndarray  # [n] bool: real rows (the last batch is padded)
    features: dict | None = None  # Inception outputs of `images` ('pool3', 'logits')
    real_features: dict | None = None  # autoencoder: Inception outputs of the originals
    example_sums: dict | None = None  # autoencoder: global sums of per-example metrics
    example_count: float = 0.0  # the real examples those sums cover


class Context:
    """What metrics share during one evaluation: its settings, the run, the report being
    written, and the expensive pieces made once (reference statistics, the classifier)."""

    def __init__(self, config, task, settings, report: dict):
        self.config, self.task, self.settings, self.report = config, task, settings, report
        self.features = None  # set by the evaluator: images -> Inception outputs
        self.wants_reference_rows = False

    @functools.cached_property
    def reference(self):
        """(FID statistics, pool3 rows or None) of the reference split."""
        from ldm_jax.evaluation import fid

        s, data_cfg = self.settings, self.config.data.copy_and_resolve_references()
        split = s.split or data_cfg.train_split
        rows = [] if self.wants_reference_rows else None
        stats, provenance, path = fid.dataset_stats(
            data_cfg, split=split, num_images=s.num_reference, features=self.features,
            weights=self.report["inception_weights"], resize=s.resize,
            batch_size=int(s.batch_size), cache_dir=s.stats_dir, keep=rows,
        )  # fmt: skip
        self.report["reference_stats"] = {"path": str(path), **provenance}
        self.report["settings"]["split"] = split
        return stats, rows

    @functools.cached_property
    def digits_classifier(self):
        from ldm_jax.evaluation.digits_classifier import DigitsClassifier

        clf = DigitsClassifier(self.config.data.data_dir)
        self.report["classifier_real_test_accuracy"] = clf.real_test_accuracy
        return clf

    def class_of(self, ids: np.ndarray) -> np.ndarray:
        """The class each sample id was drawn for (the evaluator cycles through them)."""
        return ids % (getattr(self.task.cond, "n_classes", 0) or 1)


class Metric:
    name = ""
    stage = ""
    needs_inception = False  # the evaluator runs the Inception network on each batch
    needs_logits = False  # ... with its classifier head

    def __init__(self, ctx: Context):
        self.ctx = ctx

    @classmethod
    def check(cls, config, task) -> None:
        """Raises UserError where the metric cannot apply to this run."""

    def update(self, batch: Batch) -> None:
        raise NotImplementedError

    def result(self) -> dict:
        raise NotImplementedError


REGISTRY: dict[str, type[Metric]] = {}


def register(cls: type[Metric]) -> type[Metric]:
    REGISTRY[cls.name] = cls
    return cls


def names(stage: str) -> tuple[str, ...]:
    return tuple(name for name, cls in REGISTRY.items() if cls.stage == stage)


def check_metrics(stage: str, metrics) -> None:
    allowed = names(stage)
    bad = [m for m in metrics if m not in allowed]
    if bad:
        raise UserError(
            f"metric {bad[0]!r} does not apply to a {stage} run; use any of {list(allowed)}."
        )
    if not metrics:
        raise UserError(f"no metric named: give at least one of {list(allowed)}.")


def _sum_over_processes(x: np.ndarray) -> np.ndarray:
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return x
    return np.asarray(multihost_utils.process_allgather(x.astype(np.float32))).sum(axis=0)


def _gather_rows(chunks: list) -> np.ndarray:
    """All processes' unmasked rows from a list of local (rows, mask) pairs."""
    import jax

    from ldm_jax.parallel.mesh_run import MeshRun

    rows = np.concatenate([r for r, _ in chunks]).astype(np.float32)
    mask = np.concatenate([np.ones(len(r), bool) if m is None else m for r, m in chunks])
    if jax.process_count() > 1:
        rows, mask = MeshRun.all_rows(rows), MeshRun.all_rows(mask)
    return rows[mask]


def _score_stats(num_classes: int, settings) -> ScoreStats:
    splits, n = int(settings.is_splits), int(settings.num_samples)
    if not 1 <= splits <= n:
        raise UserError(f"evaluation is_splits={splits} must be in [1, num_samples={n}]; lower it.")
    return ScoreStats(num_classes, n, splits)


# ----- diffusion ------------------------------------------------------------------------
@register
class FID(Metric):
    name, stage, needs_inception = "fid", "diffusion", True

    def __init__(self, ctx):
        super().__init__(ctx)
        self.samples = FeatureStats(2048)

    def update(self, batch):
        self.samples.update(np.asarray(batch.features["pool3"]), batch.mask)

    def result(self):
        reference, _ = self.ctx.reference
        return {"fid": fid_from_stats(self.samples.all_processes(), reference)}


@register
class PrecisionRecall(Metric):
    name, stage, needs_inception = "precision_recall", "diffusion", True

    def __init__(self, ctx):
        super().__init__(ctx)
        ctx.wants_reference_rows = True
        self.rows = []

    def update(self, batch):
        self.rows.append((np.asarray(batch.features["pool3"]), batch.mask))

    def result(self):
        from ldm_jax.evaluation.precision_recall import precision_recall

        _, real_rows = self.ctx.reference
        k = int(self.ctx.settings.pr_k)
        return precision_recall(_gather_rows(real_rows), _gather_rows(self.rows), k=k)


@register
class InceptionScore(Metric):
    name, stage, needs_inception, needs_logits = "is", "diffusion", True, True

    def __init__(self, ctx):
        super().__init__(ctx)
        self.score = _score_stats(1008, ctx.settings)

    def update(self, batch):
        self.score.update(np.asarray(batch.features["logits"]), batch.ids, batch.mask)

    def result(self):
        mean, std = self.score.all_processes().score()
        return {"is": mean, "is_std": std}


class _DigitsMetric(Metric):
    """Judged by the digits classifier: class-conditional runs on the digits only."""

    stage = "diffusion"

    @classmethod
    def check(cls, config, task) -> None:
        if task.cond.kind != "class" or config.data.name != "digits":
            raise UserError(
                "metrics accuracy and digits_is need a class-conditional run on digits (the "
                "classifier is trained on the real digits)."
            )


def _as_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 127.5 - 1.0


@register
class Accuracy(_DigitsMetric):
    name = "accuracy"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.correct = np.zeros(2)  # [right, all]

    def update(self, batch):
        predicted = self.ctx.digits_classifier.predict(_as_float(batch.images))
        right = (predicted == self.ctx.class_of(batch.ids)) & batch.mask
        self.correct += [np.sum(right), np.sum(batch.mask)]

    def result(self):
        total = _sum_over_processes(self.correct)
        return {"accuracy": float(total[0] / total[1])}


@register
class DigitsIS(_DigitsMetric):
    name = "digits_is"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.score = _score_stats(10, ctx.settings)

    def update(self, batch):
        probs = self.ctx.digits_classifier.probabilities(_as_float(batch.images))
        self.score.update(probs, batch.ids, batch.mask, probs=True)

    def result(self):
        mean, std = self.score.all_processes().score()
        return {"digits_is": mean, "digits_is_std": std}


# ----- autoencoder ----------------------------------------------------------------------
@register
class RFID(Metric):
    name, stage, needs_inception = "rfid", "autoencoder", True

    def __init__(self, ctx):
        super().__init__(ctx)
        self.real, self.fake = FeatureStats(2048), FeatureStats(2048)

    def update(self, batch):
        self.real.update(np.asarray(batch.real_features["pool3"]), batch.mask)
        self.fake.update(np.asarray(batch.features["pool3"]), batch.mask)

    def result(self):
        fake, real = self.fake.all_processes(), self.real.all_processes()
        self.ctx.report["settings"]["num_images"] = int(real.count)
        return {"rfid": fid_from_stats(fake, real)}


class ExampleMean(Metric):
    """The mean over the real examples of one of the task's per-example eval metrics."""

    stage = "autoencoder"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.total, self.count = 0.0, 0.0

    def update(self, batch):
        self.total += float(batch.example_sums[self.name])
        self.count += float(batch.example_count)

    def result(self):
        self.ctx.report["settings"]["num_images"] = int(self.count)
        return {self.name: self.total / max(self.count, 1.0)}


for _name in ("psnr", "ssim", "lpips"):
    register(type(_name.upper(), (ExampleMean,), {"name": _name}))
