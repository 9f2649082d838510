"""Restoration evaluations: a toy super-resolution run and a toy inpainting run on the
held-out photos (photo_crops' test split), and mask-guided inpainting by the session's
class-conditional digits run. The model's figures are checked against its outputs
recomputed here, the baselines' against bicubic / biharmonic restorations and
scikit-image metrics computed here, and 1 process against 2.

FID uses a stand-in feature network (a fixed random projection of the pixels, patched in
for the Inception network, which costs minutes on two CPU cores): the per-side feature
statistics and the Frechet distance are what is checked; the Inception path itself is the
autoencoder rFID's (test_evaluate.py).
"""

import json

import jax
import ml_collections
import numpy as np
import pytest
from helpers import write_diffusion_run
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.restoration import inpaint_biharmonic
from toy import run_launched, tiny_diffusion_config

from ldm_jax import evaluate
from ldm_jax.data import images as images_lib
from ldm_jax.data import pipeline
from ldm_jax.evaluation import fid as fid_lib
from ldm_jax.evaluation.frechet import frechet_distance
from ldm_jax.models import lpips

NUM, BATCH, STEPS = 12, 8, 4  # two global batches, the second padded
SETTINGS = [f"--num_samples={NUM}", f"--batch_size={BATCH}", f"--steps={STEPS}"]
SR_METRICS = ("psnr", "ssim", "lpips")
INPAINT_METRICS = ("psnr", "ssim", "lpips", "l1_masked", "lpips_masked")


def _train(ae_workdir, data_dir, workdir, kind):
    """A toy unconditional concat run on 32x32 photo crops, written at step 0 (perturbed
    EMA weights: the figures are checked against its own outputs, whatever the weights)."""
    config = tiny_diffusion_config(
        ae_workdir, data_dir, conditioning_key="concat", data__condition__kind=kind,
        data__name="photo_crops", cond__kind="none", model__use_spatial_transformer=False,
        latent_cache__enabled=False, batch_size=8, train__eval_batch_size=8,
    )  # fmt: skip
    write_diffusion_run(workdir, config)
    return workdir


@pytest.fixture(scope="module")
def sr_run(tmp_path_factory, tiny_autoencoder_run, data_dir):
    return _train(
        tiny_autoencoder_run[0], data_dir, tmp_path_factory.mktemp("sr") / "run", "low_res"
    )


@pytest.fixture(scope="module")
def inpaint_run(tmp_path_factory, tiny_autoencoder_run, data_dir):
    return _train(
        tiny_autoencoder_run[0], data_dir, tmp_path_factory.mktemp("inp") / "run", "inpaint"
    )


_PROJECTION = np.random.default_rng(0).standard_normal((32 * 32 * 3, 2048)).astype(np.float32)


def _stand_in_features(images):
    x = np.asarray(images, np.float32).reshape(len(images), -1)
    return {"pool3": x @ _PROJECTION / 50.0}


def _fid(a, b):
    fa, fb = (_stand_in_features(x)["pool3"].astype(np.float64) for x in (a, b))
    cov = lambda f: np.cov(f, rowvar=False)  # noqa: E731
    return frechet_distance(fa.mean(0), cov(fa), fb.mean(0), cov(fb))


def _evaluate(workdir, data_dir, metrics, out, *extra):
    return evaluate.main([
        f"--workdir={workdir}", f"--data_dir={data_dir}", *SETTINGS, f"--out={out}",
        *[f"--metric={m}" for m in metrics], *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def stand_in_fid():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fid_lib, "feature_fn", lambda params, resize: _stand_in_features)
        yield


@pytest.fixture(scope="module")
def sr_report(sr_run, data_dir, stand_in_fid, tmp_path_factory):
    out = tmp_path_factory.mktemp("sr_eval") / "sr.json"
    return _evaluate(sr_run, data_dir, (*SR_METRICS, "fid"), out)


@pytest.fixture(scope="module")
def inpaint_report(inpaint_run, data_dir, stand_in_fid, tmp_path_factory):
    out = tmp_path_factory.mktemp("inp_eval") / "inpaint.json"
    return _evaluate(inpaint_run, data_dir, (*INPAINT_METRICS, "fid"), out)


def _held_out(workdir):
    """The run's data config and the held-out batches (1 process) the evaluator draws."""
    from ldm_jax.training.restore import stored_config

    data_cfg = ml_collections.ConfigDict(stored_config(workdir)["data"])
    batches = pipeline.eval_batches(data_cfg, global_batch_size=BATCH, num_examples=NUM)
    batches = list(batches)
    return data_cfg, batches


def _model_outputs(workdir, keys):
    """The run's restorations of the held-out batches, by `sample_from_condition` on the
    run's mesh with the evaluator's rng (seed 0 folded with the batch index), real rows."""
    from ldm_jax.training.restore import open_run

    run = open_run(workdir)
    mr, task = run.mesh_run, run.task
    sampling = run.config.sampling.copy_and_resolve_references()
    sampling.steps = STEPS
    _, batches = _held_out(workdir)
    with jax.set_mesh(mr.mesh):
        fn = jax.jit(
            lambda s, f, c, r: task.sample_from_condition(s, f, {}, r, c, sampling=sampling),
            out_shardings=mr.batch_sharding,
        )
        outs = [
            np.asarray(fn(run.state, mr.frozen, mr.to_global({k: b[k] for k in keys}),
                          jax.random.fold_in(jax.random.PRNGKey(0), i)))
            for i, b in enumerate(batches)
        ]  # fmt: skip
    real = np.concatenate([b["mask"] for b in batches])
    return np.clip(np.concatenate(outs), -1.0, 1.0)[real]


def _real(batches, key):
    return np.concatenate([b[key] for b in batches])[np.concatenate([b["mask"] for b in batches])]


def _psnr(a, b):
    return np.mean([peak_signal_noise_ratio(x, y, data_range=2.0) for x, y in zip(a, b)])


def _ssim(a, b):
    return np.mean([
        structural_similarity(x, y, data_range=2.0, channel_axis=-1, gaussian_weights=True,
                              sigma=1.5, use_sample_covariance=False)
        for x, y in zip(a, b)
    ])  # fmt: skip


def _lpips(a, b):
    return float(np.mean(jax.jit(lpips.lpips_distance)(lpips.load_lpips_params(), a, b)))


def _bicubic(low, size):
    up = [
        np.asarray(
            Image.fromarray(images_lib.to_uint8(x)).resize((size, size), Image.Resampling.BICUBIC)
        )
        for x in low
    ]
    return np.stack(up).astype(np.float32) / 127.5 - 1.0


def test_lpips_map_averages_to_the_distance():
    params = lpips.load_lpips_params()
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
    spatial = np.asarray(jax.jit(lpips.lpips_map)(params, x, y))
    assert spatial.shape == (2, 32, 32, 1) and np.all(spatial >= 0)
    want = np.asarray(jax.jit(lpips.lpips_distance)(params, x, y))
    np.testing.assert_allclose(spatial.mean(axis=(1, 2, 3)), want, rtol=1e-5)
    same = np.asarray(jax.jit(lpips.lpips_map)(params, x, x))
    np.testing.assert_allclose(same, 0.0, atol=1e-6)


def test_super_resolution_figures_and_the_bicubic_baseline(sr_report, sr_run):
    got, settings = sr_report["results"], sr_report["settings"]
    assert set(got) == {k for m in (*SR_METRICS, "fid") for k in (m, f"bicubic/{m}")}
    assert all(np.isfinite(v) for v in got.values())
    for side in ("", "bicubic/"):
        assert 0 < got[f"{side}psnr"] < 100 and -1 <= got[f"{side}ssim"] <= 1
        assert got[f"{side}lpips"] >= 0 and got[f"{side}fid"] >= 0
    assert settings | {
        "condition": "low_res", "degradation": "bsr_light", "factor": 4, "eval_seed": 0,
        "baseline": "bicubic", "num_images": NUM, "split": "test", "sampler": "ddim",
        "steps": STEPS, "eta": 1.0, "num_samples": NUM, "seed": 0,  # eta: quickstart_digits'
    } == settings  # fmt: skip
    assert "guidance_scale" in settings and "PIL" in settings["baseline_method"]

    _, batches = _held_out(sr_run)
    originals, low = _real(batches, "image"), _real(batches, "low_res")
    assert len(originals) == NUM and low.shape[1:] == (8, 8, 3)
    bicubic = _bicubic(low, 32)
    np.testing.assert_allclose(got["bicubic/psnr"], _psnr(originals, bicubic), rtol=1e-5)
    np.testing.assert_allclose(got["bicubic/ssim"], _ssim(originals, bicubic), rtol=1e-4)
    np.testing.assert_allclose(got["bicubic/lpips"], _lpips(bicubic, originals), rtol=1e-4)
    np.testing.assert_allclose(got["bicubic/fid"], _fid(bicubic, originals), rtol=1e-5)

    model = _model_outputs(sr_run, ("low_res",))
    np.testing.assert_allclose(got["psnr"], _psnr(originals, model), rtol=1e-5)
    np.testing.assert_allclose(got["ssim"], _ssim(originals, model), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["fid"], _fid(model, originals), rtol=1e-4)


def test_inpainting_figures_and_the_biharmonic_baseline(inpaint_report, inpaint_run):
    got, settings = inpaint_report["results"], inpaint_report["settings"]
    assert set(got) == {k for m in (*INPAINT_METRICS, "fid") for k in (m, f"biharmonic/{m}")}
    assert all(np.isfinite(v) for v in got.values())
    for side in ("", "biharmonic/"):
        assert 0 <= got[f"{side}l1_masked"] <= 1 and got[f"{side}lpips_masked"] >= 0
    assert settings["condition"] == "inpaint" and settings["inpainting"] == "concat"
    assert settings["coverage"] == [0.1, 0.5] and settings["baseline"] == "biharmonic"
    assert settings["num_images"] == NUM and settings["eval_seed"] == 0

    _, batches = _held_out(inpaint_run)
    originals, mask = _real(batches, "image"), _real(batches, "inpaint_mask")
    masked = _real(batches, "masked_image")
    filled = np.stack([
        inpaint_biharmonic(m.astype(np.float64), k[..., 0] > 0, channel_axis=-1)
        for m, k in zip(masked, mask)
    ])  # fmt: skip
    baseline = mask * np.clip(filled, -1, 1) + (1 - mask) * originals

    def l1_masked(x):
        return np.mean(np.abs(x - originals).sum((1, 2, 3)) / (2 * 3 * mask.sum((1, 2, 3))))

    np.testing.assert_allclose(got["biharmonic/l1_masked"], l1_masked(baseline), rtol=1e-5)
    np.testing.assert_allclose(got["biharmonic/psnr"], _psnr(originals, baseline), rtol=1e-5)
    np.testing.assert_allclose(got["biharmonic/fid"], _fid(baseline, originals), rtol=1e-4)

    model = _model_outputs(inpaint_run, ("image", "inpaint_mask", "masked_image"))
    np.testing.assert_array_equal(model * (1 - mask), originals * (1 - mask))  # composited
    np.testing.assert_allclose(got["l1_masked"], l1_masked(model), rtol=1e-5)
    np.testing.assert_allclose(got["psnr"], _psnr(originals, model), rtol=1e-5)
    # Inside the mask the model and the baseline are measured on their own fills.
    assert got["lpips_masked"] != got["biharmonic/lpips_masked"]


@pytest.mark.parametrize("which", ["sr", "inpaint"])
def test_two_processes_give_the_figures_of_one(which, request, data_dir, tmp_path):
    """2 processes x 4 devices against the one-process reports (8 devices): every figure
    but FID (whose stand-in network exists in this process only)."""
    report = request.getfixturevalue(f"{which}_report")
    workdir = request.getfixturevalue(f"{which}_run")
    metrics = SR_METRICS if which == "sr" else INPAINT_METRICS
    out = tmp_path / "two.json"
    args = [f"--workdir={workdir}", f"--data_dir={data_dir}", *SETTINGS, f"--out={out}"]
    proc = run_launched(2, 4, "ldm_jax.evaluate", *args, *[f"--metric={m}" for m in metrics])
    assert "[0] report:" in proc.stdout, proc.stdout
    two = json.loads(out.read_text())
    one = report["results"]
    assert two["settings"]["num_images"] == NUM
    assert set(two["results"]) == {k for k in one if not k.endswith("fid")}
    for key, value in two["results"].items():
        np.testing.assert_allclose(value, one[key], rtol=1e-6, err_msg=key)
    assert {k: v for k, v in two["settings"].items() if k != "metrics"} == {
        k: v for k, v in report["settings"].items() if k not in ("metrics", "inception_weights")
    }


def test_mask_guided_inpainting_of_a_class_run(diffusion_run, data_dir, tmp_path):
    """The session's class-conditional digits run has no dense condition: with
    data.condition.kind=inpaint it inpaints the eval digits by mask guidance, conditioned
    on their labels, beside the biharmonic baseline."""
    workdir = diffusion_run[0]
    report = _evaluate(
        workdir, data_dir, ("lpips", "l1_masked", "lpips_masked", "psnr"), tmp_path / "mg.json",
        "--config.data.condition.kind=inpaint", "--config.data.condition.coverage=(0.2,0.4)",
    )  # fmt: skip
    got, settings = report["results"], report["settings"]
    assert all(np.isfinite(v) for v in got.values()) and len(got) == 8
    assert 0 <= got["l1_masked"] <= 1 and 0 <= got["biharmonic/l1_masked"] <= 1
    assert settings["inpainting"] == "mask_guidance" and settings["coverage"] == [0.2, 0.4]
    assert settings["dataset"] == "digits" and settings["num_images"] == NUM
    assert json.loads((tmp_path / "mg.json").read_text())["results"] == got


@pytest.mark.parametrize(
    "run, args, message",
    [
        ("sr_run", ["--metric=l1_masked"], "applies to inpaint evaluations"),
        ("sr_run", ["--metric=is"], "is a sample metric"),
        ("diffusion_run", ["--metric=psnr"], "measures restorations of held-out images"),
        (
            "diffusion_run",
            ["--metric=psnr", "--config.data.condition.kind=low_res"],
            "needs a run trained on the low-res image",
        ),
        ("sr_run", ["--metric=psnr", "--steps=3"], "evaluation sampler='ddim', steps=3"),
    ],
)
def test_bad_metric_for_the_run_is_one_line(run, args, message, request, data_dir, capsys):
    workdir = request.getfixturevalue(run)
    workdir = workdir[0] if isinstance(workdir, tuple) else workdir
    with pytest.raises(SystemExit) as e:
        evaluate.main([f"--workdir={workdir}", f"--data_dir={data_dir}", *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err
