"""Latent caching: the training split encoded once by the frozen first stage, on the mesh,
stored as array_record and trained from; guarded by its provenance."""

import json

import jax
import numpy as np
import pytest
from toy import tiny_diffusion_config

from ldm_jax.data import open_source
from ldm_jax.errors import UserError
from ldm_jax.training.loop import Trainer


def _config(ae_workdir, data_dir, cache, **overrides):
    return tiny_diffusion_config(
        ae_workdir,
        data_dir,
        latent_cache__enabled=True,
        latent_cache__dir=str(cache),
        latent_cache__batch_size=256,  # 1,536 train digits: 6 batches over 8 fake devices
        batch_size=8,
        train__eval_batch_size=8,
        **overrides,
    )


def _build(config, workdir):
    trainer = Trainer(config, workdir)
    with jax.set_mesh(trainer.mesh):
        trainer.mesh_run.place_frozen(trainer.task.frozen_params())
        return trainer, trainer.task.train_source(trainer.mesh_run)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_autoencoder_run, data_dir):
    root = tmp_path_factory.mktemp("cache")
    config = _config(tiny_autoencoder_run[0], data_dir, root / "digits")
    trainer, source = _build(config, root / "run")
    return config, trainer, source, root / "digits"


def test_cache_holds_every_example_with_its_codes_label_and_caption(cache, data_dir):
    config, trainer, source, _ = cache
    raw = open_source("digits", "train", data_dir)
    assert len(source) == len(raw) == 1536
    task, fs = trainer.task, trainer.task.first_stage
    idx = [0, 1, 777, 1535]
    images = np.stack([raw[i]["image"] for i in idx]).astype(np.float32) / 127.5 - 1.0
    want = jax.jit(fs.codes)(trainer.frozen["first_stage"], images)
    got = np.stack([source[i]["latent"] for i in idx])
    assert got.shape == (4, 8, 8, 2 * fs.latent_channels)  # KL: mean and logvar
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for i in idx:
        assert source[i]["label"] == raw[i]["label"]
        assert list(source[i]["caption"]) == [raw[i]["caption"]]
    assert task.first_stage.code_channels == 2 * fs.latent_channels


def test_training_from_codes_equals_training_from_images(cache, data_dir):
    """The step's latents from cached codes equal those from encoding the images, for the
    same rng (a fresh posterior sample either way), so the rest of the step is identical."""
    config, trainer, source, _ = cache
    from ldm_jax.data import TrainIterator

    cached = next(TrainIterator(config.data, global_batch_size=8, seed=3, source=source))
    plain = next(TrainIterator(config.data, global_batch_size=8, seed=3))
    np.testing.assert_array_equal(cached["label"], plain["label"])
    task, rng = trainer.task, jax.random.PRNGKey(7)
    z_codes = jax.jit(task._latents)(trainer.frozen, {"latent": cached["latent"]}, rng)
    z_images = jax.jit(task._latents)(trainer.frozen, {"image": plain["image"]}, rng)
    np.testing.assert_allclose(z_codes, z_images, rtol=1e-5, atol=1e-5)
    assert (
        float(
            np.std(
                np.asarray(z_codes)
                - np.asarray(
                    jax.jit(task._latents)(
                        trainer.frozen, {"latent": cached["latent"]}, jax.random.PRNGKey(8)
                    )
                )
            )
        )
        > 0
    )  # KL codes are sampled afresh each step, not frozen


def test_cache_made_from_another_checkpoint_is_refused_and_kept(cache, tmp_path):
    config, _, _, root = cache
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    other = config.copy_and_resolve_references()
    other.first_stage.step = 2  # the cache was made from the latest (step 4)
    with pytest.raises(UserError, match="autoencoder_checkpoint") as err:
        _build(other, tmp_path / "run")
    assert "delete it" in str(err.value) and str(root) in str(err.value)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    prov = json.loads((root / "provenance.json").read_text())
    assert prov["autoencoder_checkpoint"].endswith("/checkpoints/4")


def test_random_augmentation_cannot_be_cached(tiny_autoencoder_run, data_dir, tmp_path):
    config = _config(tiny_autoencoder_run[0], data_dir, tmp_path / "c", data__crop="random")
    with pytest.raises(UserError, match="deterministic preprocessing"):
        Trainer(config, tmp_path / "run")
    assert not (tmp_path / "c").exists()


def test_a_cache_for_a_dense_condition_keeps_the_images(cache, data_dir, tmp_path):
    """With data.condition set the cache also holds the encoded crops, so the per-example
    conditions are drawn on the fly exactly as from the images; such a cache serves a
    run without a condition too, while a cache without images is refused for a run with
    one, and left as it is."""
    from ldm_jax.data import TrainIterator

    config, _, _, plain_root = cache
    sr = config.copy_and_resolve_references()
    sr.conditioning_key = "concat"
    sr.data.condition.update(kind="low_res", factor=4, degradation="bsr_light")
    sr.latent_cache.dir = str(tmp_path / "sr_cache")
    _, source = _build(sr, tmp_path / "run")
    raw = open_source("digits", "train", data_dir)
    assert np.array_equal(source[5]["image"], raw[5]["image"])
    cached = next(TrainIterator(sr.data, global_batch_size=8, seed=3, source=source))
    plain = next(TrainIterator(sr.data, global_batch_size=8, seed=3))
    np.testing.assert_array_equal(cached["low_res"], plain["low_res"])
    assert "latent" in cached and "latent" not in plain

    plain_run = config.copy_and_resolve_references()  # a cache with images serves it too
    plain_run.latent_cache.dir = sr.latent_cache.dir
    assert len(_build(plain_run, tmp_path / "run1")[1]) == len(raw)

    sr.latent_cache.dir = str(plain_root)  # made without images for the class run
    before = {p: p.stat().st_mtime_ns for p in plain_root.rglob("*")}
    with pytest.raises(UserError, match="with_images"):
        _build(sr, tmp_path / "run2")
    assert {p: p.stat().st_mtime_ns for p in plain_root.rglob("*")} == before
