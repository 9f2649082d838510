"""Opening a run for inference (`open_run(..., inference=True)`, what sample, evaluate and
export do): only the fields sampling and evaluation read are restored, equal to the
whole state's, and they sample and reconstruct as the whole state does; a weights
checkpoint (an import's) gives its UNet as the EMA."""

import jax
import numpy as np
import pytest
from helpers import assert_trees_identical

from ldm_jax.training import checkpoint as ckpt_lib
from ldm_jax.training.restore import load_run


def _bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def diffusion_states(diffusion_run):
    whole = load_run(diffusion_run[0], stage="diffusion")
    inference = load_run(diffusion_run[0], stage="diffusion", inference=True)
    return whole, inference


def test_a_diffusion_run_opens_without_moments_or_the_trained_unet(diffusion_states):
    (_, _, whole, step), (_, _, state, inference_step) = diffusion_states
    assert inference_step == step == 4
    assert state.opt_state is None and state.bad_step is None and state.skipped is None
    assert "unet" not in state.params
    assert_trees_identical(jax.device_get(state.ema_params), jax.device_get(whole.ema_params))
    rest = {k: v for k, v in whole.params.items() if k != "unet"}
    assert_trees_identical(jax.device_get(state.params), jax.device_get(rest))
    assert float(state.scale_factor) == float(whole.scale_factor) and int(state.step) == 4
    # the EMA alone, where the whole state holds the UNet three more times (params, Adam's mu, nu)
    assert _bytes(state) < 0.3 * _bytes(whole)


def test_the_inference_state_samples_as_the_whole_state(diffusion_states):
    (config, task, whole, _), (_, _, state, _) = diffusion_states
    frozen = task.frozen_params()
    sampling = config.sampling.copy_and_resolve_references()
    sampling.steps = 2
    inputs = task.cond.inputs([1, 7])
    shape = (2, task.latent_size, task.latent_size, task.first_stage.latent_channels)

    def draw(s):
        return task.sample(s, frozen, inputs, jax.random.PRNGKey(3), shape=shape, sampling=sampling)

    np.testing.assert_array_equal(
        np.asarray(jax.jit(draw)(state)), np.asarray(jax.jit(draw)(whole))
    )


def test_an_autoencoder_run_opens_with_its_generator_alone(tiny_autoencoder_run, data_dir):
    _, task, whole, _ = load_run(tiny_autoencoder_run[0], stage="autoencoder")
    _, _, state, step = load_run(tiny_autoencoder_run[0], stage="autoencoder", inference=True)
    assert step == 4 and state.disc_params is None and state.gen_opt is None
    assert_trees_identical(jax.device_get(state.gen_params), jax.device_get(whole.gen_params))
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(task.reconstruct(state, images)), np.asarray(task.reconstruct(whole, images))
    )


def test_a_weights_checkpoint_opens_with_its_unet_as_the_ema(diffusion_states, tmp_path):
    (config, _, whole, _), _ = diffusion_states
    weights = {"params": jax.device_get(whole.params), "scale_factor": np.float32(0.5)}
    ckpt_lib.Checkpointer.write_weights(tmp_path / "checkpoints", weights, {}, config)
    _, _, state, step = load_run(tmp_path, stage="diffusion", inference=True)
    assert step == 0 and state.opt_state is None and "unet" not in state.params
    assert_trees_identical(jax.device_get(state.ema_params), weights["params"]["unet"])
    assert float(state.scale_factor) == 0.5
