"""One accumulator per metric, behind a registry: a new metric is one new class here.

The evaluator (runner.py) makes the batches; every metric named in the settings sees
each of them (`update`) and gives its figures at the end (`result`). A batch holds this
process's rows only; metrics add them to float64 sums that are combined exactly across
processes, so the figures do not depend on the mesh or the process count.

Metrics belong to one of three evaluations (`Metric.stage`; `evaluation_stage` picks a
run's): `diffusion` (the samples of a diffusion run), `restoration` (a diffusion run with a
dense condition or a layout, or any diffusion run with `data.condition.kind='inpaint'`
inpainting by mask guidance: held-out images of the eval split made again from their
conditions) and
`autoencoder` (held-out reconstructions). A name may mean a metric in several of them.

    metric            stage        needs
    fid               diffusion    Inception pool3 + reference statistics of a split
    is                diffusion    Inception logits (pytorch-fid's weights file)
    precision_recall  diffusion    pool3 of samples and reference images (k-NN, k=pr_k)
    accuracy          diffusion    class-conditional digits run (SVM on the real digits)
    digits_is         diffusion    IS with the digits SVM's class probabilities
    psnr, ssim        restoration  outputs and originals in [-1, 1] (data range 2)
    lpips             restoration  the LPIPS-VGG16 network (models/lpips.py)
    fid               restoration  Inception pool3 of outputs and of the originals
    l1_masked         restoration  inpaint: mean |output - original| inside the mask, in [0, 1]
    lpips_masked      restoration  inpaint: the spatial LPIPS map averaged inside the mask
    box_accuracy      restoration  layout, digit_scenes: each requested box's crop classified
    box_iou           restoration  layout, digit_scenes: box vs the ink found for it
    region_accuracy   restoration  semantic, digit_scenes: each map region's crop classified
    foreground_iou    restoration  semantic, digit_scenes: the ink vs the map's foreground
    rfid              autoencoder  Inception pool3 of originals and reconstructions
    psnr, ssim, lpips autoencoder  the task's per-example eval step

Restoration metrics give each figure for the run's outputs (key `name`) and for the
classical baseline's outputs of the same inputs (key `<baseline>/name`: `bicubic/` for
super-resolution, `biharmonic/` for inpainting; evaluation/baselines.py), or for semantic
and layout runs the held-out images themselves (`real/`, real data's own figure; FID has
no `real/` key: the originals are its reference). Per-image
figures are averaged over the images; l1_masked and lpips_masked average each image's
masked pixels first.
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
    # restoration: float [n, H, W, 3] in [-1, 1]; `real_features` are the originals'
    originals: np.ndarray | None = None
    outputs: dict | None = None  # {side: images}: "model", then the baseline's name
    layouts: np.ndarray | None = None  # layout: the requested Layouts [n] (object array)
    class_maps: np.ndarray | None = None  # semantic: int [n, H, W]
    side_features: dict | None = None  # {side: Inception outputs of its images}
    inpaint_mask: np.ndarray | None = None  # inpaint: float [n, H, W, 1], 1 = filled


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
    stage = ""  # "diffusion", "restoration" or "autoencoder" (see the module docstring)
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


REGISTRY: dict[tuple[str, str], type[Metric]] = {}  # (stage, name) -> class
# The evaluations a run of each stage can have.
RUN_EVALUATIONS = {"diffusion": ("diffusion", "restoration"), "autoencoder": ("autoencoder",)}
RESTORATION_KINDS = ("low_res", "inpaint")  # what an original-vs-output figure applies to
SCENE_KINDS = ("semantic", "layout")  # conditions made into images, not restorations


def register(cls: type[Metric]) -> type[Metric]:
    REGISTRY[(cls.stage, cls.name)] = cls
    return cls


def names(*stages: str) -> tuple[str, ...]:
    """The metric names of these evaluations, each once, in registration order."""
    return tuple(dict.fromkeys(name for stage, name in REGISTRY if stage in stages))


def metric_class(stage: str, name: str) -> type[Metric]:
    return REGISTRY[(stage, name)]


def check_metrics(stage: str, metrics) -> None:
    """Names that no evaluation of a `stage` run has are refused (before the run is
    opened); `check_run` then checks them against the run's own evaluation."""
    allowed = names(*RUN_EVALUATIONS.get(stage, (stage,)))
    bad = [m for m in metrics if m not in allowed]
    if bad:
        raise UserError(
            f"metric {bad[0]!r} does not apply to a {stage} run; use any of {list(allowed)}."
        )
    if not metrics:
        raise UserError(f"no metric named: give at least one of {list(allowed)}.")


def restoration_kind(config, task) -> str | None:
    """'low_res' or 'inpaint' where a diffusion run is evaluated on held-out conditions:
    its dense condition, or `data.condition.kind='inpaint'` set for a run without one
    (mask-guided inpainting); None otherwise (sample metrics)."""
    if config.stage != "diffusion":
        return None
    from ldm_jax.data import conditions

    asked = conditions.settings(config.data.get("condition")).kind
    trained = task.dense.kind
    # a layout run's dense kind, if any, only helps place its boxes (training/dense.py)
    if task.cond.kind == "layout" and trained in ("none", "coords", "boxes") and asked == trained:
        return "layout"
    if trained != "none":
        if asked != trained:
            raise UserError(
                f"this run was trained on a {trained} condition; data.condition.kind={asked!r} "
                f"cannot be evaluated with it (leave it at {trained!r})."
            )
        return trained
    if asked == "low_res":
        raise UserError(
            "data.condition.kind='low_res' needs a run trained on the low-res image "
            "(conditioning_key 'concat'); a run without a dense condition is evaluated on "
            "inpainting only (mask guidance): data.condition.kind='inpaint'."
        )
    return "inpaint" if asked == "inpaint" else None


def restoration_names(kind: str) -> list[str]:
    """The restoration metrics that apply to a condition kind."""
    return [n for (st, n), cls in REGISTRY.items() if st == "restoration" and kind in cls.kinds]


def evaluation_stage(config, task) -> str:
    """The run's evaluation: 'autoencoder', 'diffusion' (its samples) or 'restoration'."""
    return "restoration" if restoration_kind(config, task) else config.stage


def check_run(config, task, metrics) -> str:
    """Refuses, in one line, a metric the run's evaluation does not have or that cannot
    apply to the run; returns the evaluation stage."""
    check_metrics(config.stage, metrics)
    stage = evaluation_stage(config, task)
    allowed = names(stage)
    bad = [m for m in metrics if m not in allowed]
    if bad and stage == "restoration":
        kind = restoration_kind(config, task)
        raise UserError(
            f"metric {bad[0]!r} is a sample metric; this {kind} run is evaluated on held-out "
            f"restorations: use any of {restoration_names(kind)}."
        )
    if bad:
        raise UserError(
            f"metric {bad[0]!r} measures restorations of held-out images: it needs a run with "
            "a dense condition (low_res, inpaint), or data.condition.kind='inpaint' for "
            f"mask-guided inpainting; this run's sample metrics are {list(allowed)}."
        )
    for name in metrics:
        REGISTRY[(stage, name)].check(config, task)
    return stage


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


# ----- restoration ----------------------------------------------------------------------
def _exact_sum_over_processes(x: np.ndarray) -> np.ndarray:
    """The float64 sum of `x` over every process, added in process order (the bytes
    travel: jax arrays would round float64 to float32)."""
    import jax
    from jax.experimental import multihost_utils

    x = np.asarray(x, np.float64)
    if jax.process_count() == 1:
        return x
    gathered = multihost_utils.process_allgather(x.ravel().view(np.uint8))
    parts = np.asarray(gathered).reshape(jax.process_count(), -1).view(np.float64)
    total = np.zeros(x.size, np.float64)
    for part in parts:
        total += part
    return total.reshape(x.shape)


def result_key(side: str, name: str) -> str:
    """`name` for the run's outputs, `<baseline>/name` for the baseline's."""
    return name if side == "model" else f"{side}/{name}"


class RestorationMetric(Metric):
    """The mean over the real images of a per-image figure `per_image(outputs, batch)`
    of each side's outputs against the originals: the run's and the baseline's."""

    stage = "restoration"
    kinds = RESTORATION_KINDS  # the conditions it applies to

    def __init__(self, ctx):
        super().__init__(ctx)
        self.sums = {}  # side -> float64 [sum, count]

    @classmethod
    def check(cls, config, task) -> None:
        kind = restoration_kind(config, task)
        if kind not in cls.kinds:
            raise UserError(
                f"metric {cls.name!r} applies to {' and '.join(cls.kinds)} evaluations; this "
                f"run's condition is {kind}: use any of {restoration_names(kind)}."
            )

    def per_image(self, images: np.ndarray, batch: Batch) -> np.ndarray:
        raise NotImplementedError

    def update(self, batch):
        m = np.asarray(batch.mask, bool)
        for side, images in batch.outputs.items():
            values = np.asarray(self.per_image(images, batch), np.float64)
            acc = self.sums.setdefault(side, np.zeros(2, np.float64))
            acc += [values[m].sum(), m.sum()]

    def result(self):
        out = {}
        for side, acc in self.sums.items():  # the same order on every process
            total, count = _exact_sum_over_processes(acc)
            out[result_key(side, self.name)] = float(total / max(count, 1.0))
            self.ctx.report["settings"]["num_images"] = int(count)
        return out


@functools.cache
def _per_image_fn(name: str):
    """The jitted per-image function of a figure, on this process's default device."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.evaluation import image_metrics
    from ldm_jax.models import lpips

    if name in ("psnr", "ssim"):
        return jax.jit(getattr(image_metrics, name))
    if name == "lpips":
        return jax.jit(lpips.lpips_distance)

    def masked_lpips(params, x, y, mask):  # the map's mean over each image's mask
        spatial = lpips.lpips_map(params, x, y)  # [B, H, W, 1]
        area = jnp.maximum(jnp.sum(mask, axis=(1, 2, 3)), 1.0)
        return jnp.sum(spatial * mask, axis=(1, 2, 3)) / area

    return jax.jit(masked_lpips)


def _lpips_params():
    from ldm_jax.models import lpips

    return lpips.load_lpips_params()


class _ImageMetric(RestorationMetric):
    """psnr, ssim: image_metrics' on [-1, 1] (data range 2), as the autoencoder's."""

    def per_image(self, images, batch):
        return _per_image_fn(self.name)(images, batch.originals)


for _name in ("psnr", "ssim"):
    register(type(f"Restoration{_name.upper()}", (_ImageMetric,), {"name": _name}))


@register
class RestorationLPIPS(RestorationMetric):
    """LPIPS-VGG16 distance of each whole image to its original."""

    name = "lpips"

    def per_image(self, images, batch):
        return _per_image_fn("lpips")(_lpips_params(), images, batch.originals)


class _MaskedMetric(RestorationMetric):
    kinds = ("inpaint",)


@register
class L1Masked(_MaskedMetric):
    """Mean |output - original| over each image's masked pixels and channels, on the
    [0, 1] scale (half the [-1, 1] difference)."""

    name = "l1_masked"

    def per_image(self, images, batch):
        mask = np.asarray(batch.inpaint_mask, np.float64)
        diff = np.abs(np.asarray(images, np.float64) - np.asarray(batch.originals, np.float64))
        area = np.maximum(mask.sum(axis=(1, 2, 3)) * diff.shape[-1], 1.0)
        return 0.5 * (diff * mask).sum(axis=(1, 2, 3)) / area


@register
class LPIPSMasked(_MaskedMetric):
    """The spatial LPIPS map (models/lpips.py `lpips_map`) of the output against the
    original, averaged over each image's masked pixels."""

    name = "lpips_masked"

    def per_image(self, images, batch):
        return _per_image_fn("lpips_masked")(
            _lpips_params(), images, batch.originals, batch.inpaint_mask
        )


@register
class RestorationFID(RestorationMetric):
    """FID of each side's outputs against the originals of the same held-out images
    (Inception pool3; no reference statistics: the originals are the reference)."""

    name, needs_inception = "fid", True
    kinds = RESTORATION_KINDS + SCENE_KINDS

    def __init__(self, ctx):
        super().__init__(ctx)
        self.real, self.fake = FeatureStats(2048), {}

    def update(self, batch):
        self.real.update(np.asarray(batch.real_features["pool3"]), batch.mask)
        for side, features in batch.side_features.items():
            if side == "real":  # the originals themselves: FID 0 by construction
                continue
            stats = self.fake.setdefault(side, FeatureStats(2048))
            stats.update(np.asarray(features["pool3"]), batch.mask)

    def result(self):
        real = self.real.all_processes()
        self.ctx.report["settings"]["num_images"] = int(real.count)
        if real.count < 2:
            raise UserError("metric fid needs at least 2 held-out images; raise num_samples.")
        return {
            result_key(side, self.name): fid_from_stats(fake.all_processes(), real)
            for side, fake in self.fake.items()
        }


class _SceneMetric(RestorationMetric):
    """A digit_scenes figure pooled over items (boxes, regions or images) rather than
    averaged per image: `scores(images, batch)` gives per image (value sum, item count)."""

    @classmethod
    def check(cls, config, task) -> None:
        super().check(config, task)
        if config.data.name != "digit_scenes":
            raise UserError(
                f"metric {cls.name!r} reads digits in the samples: it needs a run on "
                f"digit_scenes, not {config.data.name!r}; use fid."
            )

    def scores(self, images, batch: Batch) -> np.ndarray:
        raise NotImplementedError

    def update(self, batch):
        m = np.asarray(batch.mask, bool)
        for side, images in batch.outputs.items():
            sums, counts = self.scores(images, batch)
            acc = self.sums.setdefault(side, np.zeros(3, np.float64))
            acc += [np.asarray(sums)[m].sum(), np.asarray(counts)[m].sum(), m.sum()]

    def result(self):
        out = {}
        for side, acc in self.sums.items():  # the same order on every process
            total, count, images = _exact_sum_over_processes(acc)
            out[result_key(side, self.name)] = float(total / max(count, 1.0))
            self.ctx.report["settings"]["num_images"] = int(images)
        return out


def _scene_classifier(ctx):
    from ldm_jax.evaluation import scene_metrics

    clf = scene_metrics.classifier()
    ctx.report["classifier_real_test_accuracy"] = clf.real_test_accuracy
    return clf


class _LayoutMetric(_SceneMetric):
    kinds = ("layout",)
    column = 0

    def scores(self, images, batch):
        from ldm_jax.evaluation import scene_metrics

        s = scene_metrics.layout_scores(images, batch.layouts, _scene_classifier(self.ctx))
        return s[:, self.column], s[:, 2]


@register
class BoxAccuracy(_LayoutMetric):
    """The share of requested boxes whose crop the digits classifier reads as the label."""

    name, column = "box_accuracy", 0


@register
class BoxIoU(_LayoutMetric):
    """The mean over requested boxes of their IoU with the ink found for them."""

    name, column = "box_iou", 1


class _SemanticMetric(_SceneMetric):
    kinds = ("semantic",)

    def scores(self, images, batch):
        from ldm_jax.evaluation import scene_metrics

        s = scene_metrics.semantic_scores(images, batch.class_maps, _scene_classifier(self.ctx))
        return self.pick(s)


@register
class RegionAccuracy(_SemanticMetric):
    """The share of the maps' digit regions whose crop the classifier reads right."""

    name = "region_accuracy"

    def pick(self, s):
        return s[:, 1], s[:, 2]


@register
class ForegroundIoU(_SemanticMetric):
    """The mean over images of the IoU of the sample's ink with the map's foreground."""

    name = "foreground_iou"

    def pick(self, s):
        return s[:, 0], np.ones(len(s))
