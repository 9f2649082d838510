"""Semantic synthesis and layout-to-image on digit_scenes, end to end at toy size: the
sample command equal to the API (a class map larger than trained, layouts as text and
JSON), the evaluators' figures on the held-out scenes (real/ figures recomputed here),
and the bad inputs of the new flags (their runs' exact resume: test_dense_resume.py).

The runs sampled and evaluated are step-0 checkpoints of the digit-scene configs
(runlocal) on the session's tiny autoencoder, their EMA UNet perturbed so that the output
depends on the condition.
"""

import json

import jax
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from helpers import assert_all_refused, write_diffusion_run
from PIL import Image

from ldm_jax import config_common
from ldm_jax.data import images as images_lib
from ldm_jax.data import layouts, pipeline
from ldm_jax.errors import UserError
from ldm_jax.evaluation import scene_metrics

STEPS = 4
LAYOUT = "3:0.1,0.1,0.4,0.5;7:0.55,0.4,0.9,0.9"


def _config(task, ae_workdir, data_dir, steps=STEPS):
    c = config_common.digit_scene_config(task, steps, runlocal=True)
    c.first_stage.workdir = str(ae_workdir)
    c.data.data_dir = data_dir
    c.batch_size = c.train.eval_batch_size = 8  # over the 8 test devices
    c.train.update(eval_every=1000, image_every=1000, progress_bar=False, log_every=1)
    return c


@pytest.fixture(scope="module")
def scene_runs(tmp_path_factory, tiny_autoencoder_run, scenes_dir):
    """{"semantic": run, "layout": run}: step-0 checkpoints, perturbed EMA."""
    root, runs = tmp_path_factory.mktemp("scene_runs"), {}
    for task_name in ("semantic", "layout"):
        runs[task_name] = root / task_name
        write_diffusion_run(
            runs[task_name], _config(task_name, tiny_autoencoder_run[0], scenes_dir)
        )
    return runs


@pytest.fixture(scope="module")
def scene(scenes_dir):
    """Test scene 0: its class map (also 2x larger, as PNGs) and its layout."""
    from ldm_jax.data import open_source

    example = open_source("digit_scenes", "test", scenes_dir)[0]
    ids = example["segmentation"][..., 0]
    return dict(ids=ids, big=np.kron(ids, np.ones((2, 2), np.uint8)),
                layout=layouts.Layout(example["objects"]["label"], example["objects"]["ink_bbox"]))  # fmt: skip


def _command(workdir, out, *flags, n=2):
    from ldm_jax import sample

    return sample.main([f"--workdir={workdir}", f"--num_per_condition={n}", f"--steps={STEPS}",
                        f"--out={out}", *flags])  # fmt: skip


def _restored(workdir):
    from ldm_jax.training.restore import open_run

    restored = open_run(workdir, -1, "diffusion")
    sampling = restored.config.sampling.copy_and_resolve_references()
    sampling.steps = STEPS
    return restored, sampling


def _close(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_semantic_command_equals_the_api_at_twice_the_size(scene_runs, scene, tmp_path):
    path = tmp_path / "map.png"
    Image.fromarray(scene["big"]).save(path)
    out = tmp_path / "sem"
    result = _command(scene_runs["semantic"], out, f"--cond_image={path}", "--seed=5")
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (2, 128, 128, 3)  # convolutional: the map's own size
    np.testing.assert_array_equal(images, result["images"])
    assert np.any(images[0] != images[1])

    restored, sampling = _restored(scene_runs["semantic"])
    task, run = restored.task, restored.mesh_run
    condition = {
        k: np.repeat(v, 2, 0) for k, v in task.dense.user_inputs(scene["big"], None).items()
    }
    with jax.set_mesh(run.mesh):
        fn = jax.jit(
            lambda s, f, c, r: task.sample_from_condition(s, f, {}, r, c, sampling=sampling)
        )
        want = fn(
            restored.state, run.frozen, condition, jax.random.fold_in(jax.random.PRNGKey(5), 0)
        )
    _close(images, images_lib.to_uint8(run.all_rows(want)))
    # the map, coloured, is the first column: background black, each digit its class colour
    shown = result["condition"][0]
    np.testing.assert_array_equal(shown[scene["big"] == 0], 0)
    assert len({tuple(c) for c in shown[scene["big"] > 0]}) == len(np.unique(scene["ids"])) - 1


def test_layout_command_equals_the_api_from_text_and_json(scene_runs, scene, tmp_path):
    path = tmp_path / "layouts.json"
    path.write_text(json.dumps([layouts.to_json(scene["layout"])]))
    out = tmp_path / "lay"
    result = _command(scene_runs["layout"], out, f"--layout={LAYOUT}", f"--layout={path}")
    images = result["images"]
    assert images.shape == (4, 64, 64, 3)
    restored, sampling = _restored(scene_runs["layout"])
    task, run = restored.task, restored.mesh_run
    wanted = [layouts.parse_text(LAYOUT, 10, task.cond.class_names), scene["layout"]]
    shape = (2, task.latent_size, task.latent_size, 3)
    rows = []
    with jax.set_mesh(run.mesh):
        fn = jax.jit(lambda s, f, i, r: task.sample(s, f, i, r, shape=shape, sampling=sampling))
        for i, lay in enumerate(wanted):
            rng = jax.random.fold_in(jax.random.PRNGKey(0), i)
            x = fn(restored.state, run.frozen, task.cond.inputs([lay] * 2), rng)
            rows.append(images_lib.to_uint8(run.all_rows(x)))
    _close(images, np.concatenate(rows))
    assert np.any(images[:2] != images[2:])  # the layout matters
    saved = json.loads((out / "samples.json").read_text())
    assert saved["conditions"][0] == [{"label": "3", "box": [0.1, 0.1, 0.4, 0.5]},
                                      {"label": "7", "box": [0.55, 0.4, 0.9, 0.9]}]  # fmt: skip
    # each row starts with its own layout drawn, as the run sees it (the corners on its
    # grid): the outline of row 0's first box is lit, its inside dark
    shown = np.load(out / "samples.npz")["condition"]
    assert shown.shape == (2, 64, 64, 3)
    tokens = task.cond.tokens
    box = tokens.decode(tokens.encode(wanted[0])[0]).boxes[0]
    x0, y0, x1, y1 = (int(v * 64) for v in box)
    assert shown[0, y0 : y0 + 2, x0 + 2 : x1 - 2].max() > 0
    assert shown[0, (y0 + y1) // 2, (x0 + x1) // 2].max() == 0
    assert not np.array_equal(shown[0], shown[1])


def _real_figures(scenes_dir, kind, n):
    """The figures of the held-out scenes themselves, computed here from the dataset."""
    from ldm_jax.data import open_source

    src = open_source("digit_scenes", "test", scenes_dir)
    examples = [src[i] for i in range(n)]
    images = np.stack([e["image"] for e in examples])
    clf = scene_metrics.classifier()
    if kind == "layout":
        lays = [layouts.Layout(e["objects"]["label"], e["objects"]["ink_bbox"]) for e in examples]
        s = scene_metrics.layout_scores(images, lays, clf)
        return {
            "box_accuracy": s[:, 0].sum() / s[:, 2].sum(),
            "box_iou": s[:, 1].sum() / s[:, 2].sum(),
        }
    maps = np.stack([e["segmentation"][..., 0] for e in examples])
    s = scene_metrics.semantic_scores(images, maps, clf)
    return {"region_accuracy": s[:, 1].sum() / s[:, 2].sum(), "foreground_iou": s[:, 0].mean()}


@pytest.mark.parametrize("kind", ["semantic", "layout"])
def test_scene_evaluators_on_held_out_scenes(kind, scene_runs, scenes_dir, tmp_path):
    from ldm_jax import evaluate

    metrics = {
        "semantic": ("region_accuracy", "foreground_iou"),
        "layout": ("box_accuracy", "box_iou"),
    }
    out = tmp_path / "report.json"
    flags = [f"--metric={m}" for m in metrics[kind]]
    evaluate.main([f"--workdir={scene_runs[kind]}", *flags, "--num_samples=12", "--batch_size=8",
                   f"--steps={STEPS}", f"--out={out}"])  # fmt: skip
    report = json.loads(out.read_text())
    results, settings = report["results"], report["settings"]
    assert settings["condition"] == kind and settings["num_images"] == 12
    assert settings["baseline"] == "real"
    real = _real_figures(scenes_dir, kind, 12)
    for name in metrics[kind]:
        assert 0.0 <= results[name] <= 1.0
        np.testing.assert_allclose(results[f"real/{name}"], real[name], rtol=1e-12)
        assert results[name] < results[f"real/{name}"]  # an untrained model is not a scene
    assert min(real.values()) > 0.8  # the evaluator reads real scenes right
    assert report["classifier_real_test_accuracy"] > 0.95


def test_position_channels_span_the_latent_at_any_size():
    from ldm_jax.training import dense

    coords = dense.Coordinates(None, None)
    for h, w in ((16, 16), (8, 24)):
        f = np.asarray(coords.features(None, {}, {}, (h, w), 1.0))
        assert f.shape == (1, h, w, 2) and coords.channels == 2 and coords.keys == ()
        np.testing.assert_allclose(f[0, :, 0, 0], -1.0)  # x: left edge -1, right edge 1
        np.testing.assert_allclose(f[0, :, -1, 0], 1.0)
        np.testing.assert_allclose(f[0, 0, :, 1], -1.0)  # y: top -1, bottom 1
        np.testing.assert_allclose(f[0, -1, :, 1], 1.0)
        np.testing.assert_allclose(np.diff(f[0, 0, :, 0]), 2.0 / (w - 1), rtol=1e-5)
    fourier = dense.Coordinates(ml_collections.ConfigDict({"frequencies": (1.0, 4.0)}), None)
    f = np.asarray(fourier.features(None, {}, {}, (8, 8), 1.0))[0]
    assert fourier.channels == f.shape[-1] == 2 + 4 * 2
    x, y = f[..., 0], f[..., 1]  # then sin, cos of pi f x, and of pi f y, per frequency
    np.testing.assert_allclose(f[..., 2], np.sin(np.pi * x), atol=1e-6)
    np.testing.assert_allclose(f[..., 9], np.cos(4 * np.pi * y), atol=1e-6)


def _supersampled_boxes(layout, n_classes, h, w, k=16):
    """Each box painted on a k-times finer grid and averaged back to h x w; per class, the
    largest of its boxes' shares."""
    out = np.zeros((h, w, n_classes))
    ys, xs = (np.arange(h * k) + 0.5) / (h * k), (np.arange(w * k) + 0.5) / (w * k)
    for label, (x0, y0, x1, y1) in zip(layout.labels, layout.boxes):
        inside = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
        share = inside.reshape(h, k, w, k).mean(axis=(1, 3))
        out[..., label] = np.maximum(out[..., label], share)
    return out


def test_boxes_are_drawn_from_the_layout_tokens_at_latent_size():
    from ldm_jax.training import dense
    from ldm_jax.training.conditioner import Conditioner

    cfg = dict(kind="layout", n_classes=10, vocab_size=257, max_objects=4, embed_dim=16,
               n_layer=1, max_length=12, heads=2, dim_head=8)  # fmt: skip
    cond = Conditioner(ml_collections.ConfigDict(cfg), "hybrid")
    settings = ml_collections.ConfigDict({"kind": "boxes"})
    boxes = dense.Boxes(settings, None, ml_collections.ConfigDict(cfg))
    # on the 16 x 16 corner grid (x = i / 15): two 3s that overlap, a 7, nothing else
    grid = np.array([[0, 0, 8, 8], [3, 3, 12, 6], [6, 9, 15, 15]]) / 15
    layout = layouts.Layout(np.array([3, 3, 7]), grid.astype(np.float32))
    inputs = cond.inputs([layout, layouts.Layout.empty()])
    for h, w in ((16, 16), (8, 12)):
        drawn = np.asarray(boxes.from_cond_inputs(inputs, (h, w)))
        assert drawn.shape == (2, h, w, 10) and boxes.channels == 10
        np.testing.assert_allclose(drawn[0], _supersampled_boxes(layout, 10, h, w), atol=0.04)
        assert drawn[0, ..., 3].max() == 1.0
        assert np.all(drawn[1] == 0)  # the empty layout draws nothing
        assert np.all(np.delete(drawn[0], [3, 7], axis=-1) == 0)
    null = cond.null_inputs(3)  # classifier-free guidance's null: no boxes either
    assert np.all(np.asarray(boxes.from_cond_inputs(null, (4, 4))) == 0)
    with pytest.raises(UserError, match="needs config.cond.kind='layout'"):
        dense.Boxes(settings, None, ml_collections.ConfigDict({"kind": "class"}))


def test_corner_embeddings_can_start_at_their_grid_points():
    from ldm_jax.training.conditioner import Conditioner

    cfg = dict(kind="layout", n_classes=10, vocab_size=101, max_objects=2, embed_dim=16,
               n_layer=1, max_length=6, heads=2, dim_head=8, corner_init="fourier")  # fmt: skip
    cond = Conditioner(ml_collections.ConfigDict(cfg), "crossattn")
    table = np.asarray(nn.unbox(cond.init(jax.random.PRNGKey(0)))["token_emb"]["embedding"])
    features = cond.tokens.corner_features(16)  # G = 10: 100 corners, 3 frequencies
    np.testing.assert_array_equal(table[:100], features)
    g = cond.tokens.grid
    x = (np.arange(100) % g) / (g - 1) * 2 - 1
    np.testing.assert_allclose(features[:, 0], np.sin(np.pi * x), atol=1e-6)
    assert np.all(features[:, 12:] == 0) and np.std(table[100:]) > 0  # the rest stays random


def test_layout_batches_carry_the_ink_boxes(scenes_dir):
    cfg = config_common.digit_scene_config("layout", STEPS, runlocal=True).data
    cfg.data_dir, cfg.num_threads = scenes_dir, 0
    batch = next(pipeline.eval_batches(cfg, global_batch_size=4, process_count=1, process_index=0))
    from ldm_jax.data import open_source

    src = open_source("digit_scenes", "test", scenes_dir)
    for i, lay in enumerate(batch["layout"]):
        np.testing.assert_array_equal(lay.boxes, src[i]["objects"]["ink_bbox"])
        np.testing.assert_array_equal(lay.labels, src[i]["objects"]["label"])


def test_bad_scene_inputs_fail_in_one_line_and_write_nothing(scene_runs, scene, tmp_path, capsys):
    from ldm_jax import sample

    colour = tmp_path / "colour.png"
    Image.fromarray(np.stack([scene["ids"], scene["ids"] * 0, scene["ids"]], -1)).save(colour)
    far = tmp_path / "far.png"
    Image.fromarray(np.full((64, 64), 11, np.uint8)).save(far)
    odd = tmp_path / "odd.png"
    Image.fromarray(scene["ids"][:60, :60]).save(odd)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"label": 3}]')
    out = tmp_path / "out"
    sem, lay = scene_runs["semantic"], scene_runs["layout"]

    def argv(run, *flags):
        return [f"--workdir={run}", f"--steps={STEPS}", f"--out={out}", *flags]

    cases = [
        ("colour map", argv(sem, f"--cond_image={colour}"), "one id per pixel"),
        ("id past the classes", argv(sem, f"--cond_image={far}"), "0..10"),
        ("map not a multiple", argv(sem, f"--cond_image={odd}"), "multiples of 8"),
        ("layout on a semantic run", argv(sem, f"--cond_image={far}", f"--layout={LAYOUT}"),
         "--layout"),
        ("no layout for a layout run", argv(lay), "--layout"),
        ("box order", argv(lay, "--layout=3:0.5,0.1,0.4,0.5"), "x0 < x1"),
        ("label out of range", argv(lay, "--layout=12:0.1,0.1,0.4,0.5"), "0..9"),
        ("not LABEL:box", argv(lay, "--layout=3,0.1,0.1,0.4"), "LABEL:x0,y0,x1,y1"),
        ("bad json", argv(lay, f"--layout={bad_json}"), "bad.json"),
    ]  # fmt: skip
    assert_all_refused(sample.main, cases, capsys, out, scene_runs)
