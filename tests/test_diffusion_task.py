"""The second stage end to end: train through the CLI, resume, sample, and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy import EVAL_METRICS, LDM_CONFIG, eval_settings, run_module, tiny_diffusion_config

from ldm_jax.training.diffusion import ema_decay

CONFIG = LDM_CONFIG


def test_ema_decay_warmup_closed_form():
    steps = jnp.array([0, 1, 10, 100, 10**6])
    want = np.minimum(
        0.9999, (1 + np.array([0, 1, 10, 100, 10**6])) / (10 + np.array([0, 1, 10, 100, 10**6]))
    )
    np.testing.assert_allclose(jax.vmap(lambda s: ema_decay(s, 0.9999))(steps), want, rtol=1e-6)


def test_train_two_steps_then_resume(diffusion_run):
    workdir, _, second = diffusion_run
    assert f"resumed from {workdir}/checkpoints/2 (step 2)" in second.stdout
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["stage"] == "diffusion" and metrics["step"] == 4
    assert np.isfinite(metrics["eval"]["loss"])
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    scale = {r["scale_factor"] for r in rows if "scale_factor" in r}
    assert len(scale) == 1 and next(iter(scale)) != 1.0  # scale_by_std, kept on resume


def test_sample_command_writes_grid_and_npz(diffusion_run):
    workdir = diffusion_run[0]
    out = workdir / "samples_test"
    run_module(
        "ldm_jax.sample",
        f"--workdir={workdir}",
        "--labels=0,3,9",
        "--num_per_condition=2",
        "--steps=4",
        "--guidance=2.0",
        f"--out={out}",
    )
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (6, 32, 32, 3) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [0, 0, 3, 3, 9, 9]
    assert (out / "samples.png").is_file()


def test_sample_command_bad_input(diffusion_run):
    workdir = diffusion_run[0]
    bad_sampler = run_module(
        "ldm_jax.sample", f"--workdir={workdir}", "--labels=1", "--sampler=euler", check=False
    )
    assert bad_sampler.returncode != 0 and "ddim" in bad_sampler.stderr
    bad_label = run_module("ldm_jax.sample", f"--workdir={workdir}", "--labels=10", check=False)
    assert bad_label.returncode != 0 and "10" in bad_label.stderr


@pytest.mark.slow  # the CLI in a subprocess
def test_missing_first_stage_is_a_clear_error(tmp_path, data_dir):
    proc = run_module(
        "ldm_jax.train",
        f"--config={CONFIG}",
        f"--workdir={tmp_path / 'w'}",
        f"--config.data.data_dir={data_dir}",
        f"--config.first_stage.workdir={tmp_path / 'nowhere'}",
        check=False,
    )
    assert proc.returncode == 2
    assert "holds no autoencoder checkpoints" in proc.stderr and "nowhere" in proc.stderr


@pytest.mark.parametrize("condition", ["inpaint", "semantic", "layout"])
def test_eight_devices_equal_one_device(tiny_autoencoder_run, data_dir, condition):
    """A step on 8 fake devices equals one device's with a dense condition concatenated
    (the encoded masked image and its mask; the class map through the trainable
    rescaler) and with a layout's tokens by cross-attention beside the latents' position
    channels. The unconditioned step is test_sharding's (8, 1, 1) split; the low-res
    image is concatenated as the masked image is, without its encoding."""
    import functools

    from flax import linen as nn

    from ldm_jax.data.layouts import Layout
    from ldm_jax.parallel import mesh as mesh_lib
    from ldm_jax.training.diffusion import DiffusionTask

    kw = {"conditioning_key": "hybrid"}
    if condition == "semantic":
        kw["data__condition__num_classes"] = 11
    if condition == "layout":
        kw.update(cond__kind="layout", cond__vocab_size=257, cond__max_objects=3,
                  cond__n_layer=1, cond__heads=2, cond__dim_head=16, cond__n_classes=10)  # fmt: skip
    dense = condition if condition != "layout" else "coords"  # the layout beside positions
    config = tiny_diffusion_config(
        tiny_autoencoder_run[0], batch_size=8, data__condition__kind=dense, **kw
    )
    task = DiffusionTask(config)
    in_channels = {"inpaint": 7, "semantic": 6, "layout": 5}
    assert task.unet.in_channels == in_channels[condition]
    frozen = task.frozen_params()
    state = jax.jit(lambda r: nn.unbox(task.init_state(r)))(jax.random.PRNGKey(0))
    assert ("dense" in state.params) == (condition == "semantic")
    images = jax.random.uniform(jax.random.PRNGKey(1), (8, 32, 32, 3), minval=-1)
    batch = {"image": images, "label": jnp.arange(8, dtype=jnp.int32) % 10}
    if condition == "inpaint":
        mask = (jax.random.uniform(jax.random.PRNGKey(4), (8, 32, 32, 1)) > 0.6).astype(jnp.float32)
        batch.update(inpaint_mask=mask, masked_image=jnp.where(mask > 0, -1.0, images))
    if condition == "semantic":
        batch["segmentation"] = jax.random.randint(jax.random.PRNGKey(5), (8, 32, 32), 0, 11)
    if condition == "layout":
        rng = np.random.default_rng(6)
        batch["layout"] = np.empty(8, dtype=object)
        for i in range(8):  # 0..4 objects: the empty layout and a truncated one among them
            n = i % 5
            lo = rng.uniform(0, 0.5, (n, 2))
            boxes = np.concatenate([lo, lo + rng.uniform(0.1, 0.5, (n, 2))], 1).astype(np.float32)
            batch["layout"][i] = Layout(rng.integers(0, 10, n), boxes)
    batch = task.device_batch(batch)
    rng = jax.random.PRNGKey(2)
    one = jax.device_get(jax.jit(task.train_step)(state, batch, rng, frozen))

    mesh = mesh_lib.make_mesh(config.mesh)
    assert mesh.shape["data"] == 8
    shardings = mesh_lib.logical_to_sharding(jax.eval_shape(task.init_state, rng), mesh)
    rep, data = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        step = jax.jit(
            task.train_step,
            in_shardings=(shardings, data, rep, rep),
            out_shardings=(shardings, rep),
        )
        batch8 = jax.device_put(batch, data)
        assert len(batch8["image"].sharding.device_set) == 8
        eight = jax.device_get(step(jax.device_put(state, shardings), batch8, rng, frozen))
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(close, one[0].params, eight[0].params)
    jax.tree_util.tree_map(close, one[0].ema_params, eight[0].ema_params)
    for k in one[1]:
        close(one[1][k], eight[1][k], err_msg=k)


def test_hybrid_conditioning_concat_and_crossattn(tiny_autoencoder_run):
    """conditioning_key 'hybrid': the low-res image is concatenated to z_t (3 extra UNet
    input channels) and the class enters by cross-attention; a step and guided sampling
    (with the dense features doubled alongside the batch) run."""
    from flax import linen as nn

    from ldm_jax.training.diffusion import DiffusionTask

    config = tiny_diffusion_config(
        tiny_autoencoder_run[0], conditioning_key="hybrid", data__condition__kind="low_res"
    )
    task = DiffusionTask(config)
    assert task.unet.in_channels == 3 + 3 and task.unet.context_dim == config.cond.embed_dim
    frozen = task.frozen_params()
    state = jax.jit(lambda r: nn.unbox(task.init_state(r)))(jax.random.PRNGKey(0))
    images = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3), minval=-1)
    low = images[:, ::4, ::4]
    batch = {"image": images, "low_res": low, "label": jnp.array([0, 1, 2, 3], jnp.int32)}
    new_state, metrics = jax.jit(task.train_step)(state, batch, jax.random.PRNGKey(2), frozen)
    assert float(metrics["finite"]) == 1.0 and int(new_state.step) == 1
    x = jax.jit(
        lambda s, f, inp, d, r: task.sample(s, f, inp, r, dense=d, shape=(4, 8, 8, 3))
    )(new_state, frozen, task.cond.labels_inputs([0, 1, 2, 3]), {"low_res": low},
      jax.random.PRNGKey(3))  # fmt: skip
    assert x.shape == (4, 32, 32, 3) and bool(jnp.all(jnp.abs(x) <= 1.0))
    # The grid: the images, their low-res inputs (nearest-upscaled), then the samples.
    grid = task.sample_grid(new_state, batch, 4, frozen)
    assert len(grid) == 2 + config.sampling.grid_rows
    assert all(row.shape == (4, 32, 32, 3) and row.dtype == np.uint8 for row in grid)
    np.testing.assert_array_equal(grid[1][:, ::4, ::4], grid[1][:, 3::4, 3::4])
    assert task.grid_captions(batch, 4) == ["0", "1", "2", "3"]
    # Fixed grid conditions: those classes, one column each, captioned with their ids.
    config.sampling.grid_conditions = (3, 1)
    assert task.grid_columns(batch, 4) == 2 and task.grid_captions(batch, 4) == ["3", "1"]


def test_evaluators_in_the_loop_and_the_command_agree(diffusion_run, data_dir, tmp_path):
    """The training loop's evaluator at step 4 (logged under metrics/) and the evaluate
    command on the step-4 checkpoint draw the same samples and give the same figures; a
    second command run reuses the cached reference statistics."""
    from ldm_jax import evaluate

    workdir = diffusion_run[0]
    loop = json.loads((workdir / "eval" / "train_step0000004.json").read_text())
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    logged = {k[len("metrics/") :]: v for r in rows for k, v in r.items() if "metrics/" in k}
    assert logged.keys() == loop["results"].keys() and all(np.isfinite(list(logged.values())))

    settings = eval_settings(workdir.parent, loop["inception_weights"])
    common = [f"--workdir={workdir}", f"--data_dir={data_dir}"]
    common += [f"--{k}={v}" for k, v in settings.items()]
    metrics = [f"--metric={m}" for m in EVAL_METRICS]
    first = evaluate.main([*common, *metrics, f"--out={tmp_path / 'a.json'}"])
    ref = next((workdir.parent / "stats").glob("*.npz"))
    mtime = ref.stat().st_mtime_ns
    evaluate.main([*common, "--metric=fid", f"--out={tmp_path / 'b.json'}"])
    assert ref.stat().st_mtime_ns == mtime  # cached statistics reused

    got, want = first["results"], loop["results"]
    assert got.keys() == want.keys()
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert 0 <= got["accuracy"] <= 1 and 0 <= got["precision"] <= 1 and 0 <= got["recall"] <= 1
    assert 1.0 <= got["is"] <= 1008 and 1.0 <= got["digits_is"] <= 10
    prov = first["reference_stats"]
    assert prov["num_images"] == 8 and prov["split"] == "train" and prov["crop"] == "center"
    assert first["settings"]["steps"] == 4 and first["settings"]["sampler"] == "ddim"
    assert first["inception_weights"] == str(settings["inception"])


def test_inception_score_needs_the_classifier_head(diffusion_run, data_dir, capsys):
    from ldm_jax import evaluate
    from ldm_jax.models import inception

    with pytest.raises(SystemExit) as e:
        evaluate.main([
            f"--workdir={diffusion_run[0]}", f"--data_dir={data_dir}", "--metric=is",
            "--num_samples=8", "--batch_size=8", f"--inception={inception.packaged_torchscript()}",
        ])  # fmt: skip
    assert e.value.code == 2 and "classifier head" in capsys.readouterr().err
