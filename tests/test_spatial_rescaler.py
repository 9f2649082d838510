"""The semantic condition's SpatialRescaler (ldm_jax.models.conditioning) against the
reference's, and the dense condition around it (ldm_jax.training.dense.Semantic).

The reference is the CompVis LDM `ldm.modules.encoders.modules.SpatialRescaler` with
method='bilinear', bias=False, in_channels=n_classes, out_channels=3, as the paper's
semantic_synthesis configs build it: `n_stages` times
`torch.nn.functional.interpolate(x, scale_factor=multiplier, mode="bilinear")`, then
`nn.Conv2d(n_classes, out, 1, bias=False)`, on the one-hot NCHW map. That module is not
in stable-diffusion-sdkit 2.1.5 (the Stable Diffusion 2 tree, whose encoders have no
SpatialRescaler) and its own module imports clip and kornia, so `_reference` below runs
the same two torch operations; torch is the test-only reference (skipped without it).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy import ROOT

from ldm_jax import config_common
from ldm_jax.errors import UserError
from ldm_jax.models.conditioning import SpatialRescaler
from ldm_jax.training import dense


def _apply(kernel, ids, n_stages=2, multiplier=0.5):
    n_classes, out = kernel.shape
    module = SpatialRescaler(n_classes, out, n_stages, multiplier)
    return np.asarray(module.apply({"params": {"channel_mapper": jnp.asarray(kernel)}}, ids))


def _reference(kernel, ids, n_stages=2, multiplier=0.5):
    """The reference's forward (NHWC out): bilinear interpolates by scale_factor, then a
    1x1 Conv2d without bias whose weight [out, in, 1, 1] is `kernel` transposed."""
    torch = pytest.importorskip("torch", reason="test-only reference: pip install torch==2.13.0")
    n_classes, out = kernel.shape
    x = torch.nn.functional.one_hot(torch.from_numpy(np.asarray(ids, np.int64)), n_classes)
    x = x.permute(0, 3, 1, 2).float()  # the one-hot NCHW float map the reference takes
    conv = torch.nn.Conv2d(n_classes, out, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T[:, :, None, None])))
        for _ in range(n_stages):
            x = torch.nn.functional.interpolate(x, scale_factor=multiplier, mode="bilinear")
        return conv(x).permute(0, 2, 3, 1).numpy()


def _random(n_classes, shape, seed, out=3):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, n_classes, shape).astype(np.int32)
    kernel = rng.uniform(-1, 1, (n_classes, out)).astype(np.float32)
    return ids, kernel


# ------------------------------------------------------------------------------ module


@pytest.mark.parametrize("n_stages, hw", [(1, (32, 24)), (2, (16, 12)), (3, (8, 6))])
def test_shapes_and_dtype(n_stages, hw):
    ids, kernel = _random(11, (2, 64, 48), seed=0)
    out = SpatialRescaler(11, 3, n_stages).apply({"params": {"channel_mapper": kernel}}, ids)
    assert out.shape == (2, *hw, 3)
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("n_classes", [182, 11])  # the paper's semantic_synthesis; digits
def test_matches_reference(n_classes):
    ids, kernel = _random(n_classes, (2, 32, 40), seed=n_classes)
    ours, ref = _apply(kernel, ids), _reference(kernel, ids)
    assert ours.shape == ref.shape == (2, 8, 10, 3)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    # not a trivially flat map: the resized classes vary across the picture
    assert ours.std() > 0.1


@pytest.mark.parametrize(
    "shape, n_stages, multiplier",
    [
        ((2, 31, 45), 1, 0.5),  # odd sides: torch maps by scale_factor, not out / in
        ((1, 30, 42), 2, 0.5),  # the second stage halves an odd 15 x 21
        ((1, 32, 40), 1, 0.25),
        ((1, 17, 23), 2, 0.75),
    ],
)
def test_matches_reference_other_sizes(shape, n_stages, multiplier):
    ids, kernel = _random(11, shape, seed=3)
    ours = _apply(kernel, ids, n_stages, multiplier)
    ref = _reference(kernel, ids, n_stages, multiplier)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_without_stages_is_the_kernel_row_of_each_class():
    ids, kernel = _random(11, (2, 9, 7), seed=1)
    out = _apply(kernel, ids, n_stages=0)
    assert out.shape == (2, 9, 7, 3)
    np.testing.assert_array_equal(out, kernel[ids])  # exactly: a lookup, nothing summed


def test_linear_in_the_class_masks():
    """out(map) = sum_c resize(mask_c) x kernel[c]: the 1x1 map and the resizes commute."""
    n = 5
    ids, kernel = _random(n, (2, 16, 20), seed=2)
    out = _apply(kernel, ids)
    indicator = np.array([[0.0], [1.0]], np.float32)  # class 1 -> 1: resize(mask) itself
    total = np.zeros_like(out)
    for c in range(n):
        mask = _apply(indicator, (ids == c).astype(np.int32))  # [B, h, w, 1]
        assert mask.min() >= 0.0 and mask.max() <= 1.0 + 1e-6
        total += mask * kernel[c]
    np.testing.assert_allclose(out, total, rtol=0, atol=1e-6)
    # the resized masks partition unity: a constant kernel gives that constant
    np.testing.assert_allclose(_apply(np.full((n, 1), 0.25, np.float32), ids), 0.25, atol=1e-6)


def test_default_init_is_torch_conv2d():
    n_classes = 182
    params = SpatialRescaler(n_classes).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4), int))
    assert set(params["params"]) == {"channel_mapper"}
    kernel = np.asarray(params["params"]["channel_mapper"])
    assert kernel.shape == (n_classes, 3) and kernel.dtype == np.float32
    bound = 1.0 / np.sqrt(n_classes)  # kaiming_uniform(a=sqrt(5)) of fan_in = n_classes
    assert np.abs(kernel).max() <= bound
    assert np.abs(kernel).max() > 0.9 * bound  # uniform over the whole range, not shrunk
    assert abs(kernel.mean()) < 0.2 * bound and len(np.unique(kernel)) == kernel.size


# ------------------------------------------------------------------- dense condition


FIRST_STAGE = types.SimpleNamespace(factor=4, latent_channels=3)  # all Semantic reads


@pytest.fixture(scope="module")
def semantic_config():
    return config_common.digit_scene_config("semantic", 10, runlocal=True)


@pytest.fixture(scope="module")
def semantic(semantic_config):
    settings = dense.data_conditions.settings(semantic_config.data.get("condition"))
    return dense.Semantic(settings, FIRST_STAGE)


def test_semantic_condition_widens_the_unet_input(semantic_config):
    from ldm_jax.training.diffusion import DiffusionTask

    task = DiffusionTask(semantic_config, first_stage=FIRST_STAGE)
    assert isinstance(task.dense, dense.Semantic) and task.dense.num_classes == 11
    assert task.unet_config().in_channels == FIRST_STAGE.latent_channels + 3
    assert task.unet_config().out_channels == FIRST_STAGE.latent_channels
    task.dense.check_sizes(semantic_config.data.image_size, task.latent_size)  # 64 -> 16


@pytest.mark.parametrize("name", ["semantic_synthesis256", "semantic_synthesis512"])
def test_semantic_synthesis_config(name):
    from ldm_jax.config_loader import load_config
    from ldm_jax.training.diffusion import DiffusionTask

    path = ROOT / f"configs/diffusion/{name}.py"
    if not path.exists():
        pytest.skip(f"configs/diffusion/{name}.py is not written yet")
    config = load_config(str(path), lock=False)
    task = DiffusionTask(config, first_stage=FIRST_STAGE)  # the paper's VQ-f4, 3 channels
    assert isinstance(task.dense, dense.Semantic) and task.dense.num_classes == 182
    assert task.unet_config().in_channels == FIRST_STAGE.latent_channels + 3  # 6
    task.dense.check_sizes(config.data.image_size, task.latent_size)


def test_semantic_features(semantic):
    params = semantic.init(jax.random.PRNGKey(0))
    assert params["channel_mapper"].shape == (11, 3)
    ids, _ = _random(11, (2, 64, 64), seed=4)
    out = semantic.features(params, {}, {"segmentation": ids}, (16, 16), 1.0)
    assert out.shape == (2, 16, 16, semantic.channels) and semantic.channels == 3
    np.testing.assert_allclose(out, _apply(np.asarray(params["channel_mapper"]), ids), atol=0)
    with pytest.raises(UserError):  # a map that does not rescale to the latent size
        semantic.features(params, {}, {"segmentation": ids[:, :60, :60]}, (16, 16), 1.0)


def test_semantic_user_inputs(semantic):
    ids = np.arange(48).reshape(6, 8) % 11
    got = semantic.user_inputs(ids, None)
    assert set(got) == {"segmentation"}
    assert got["segmentation"].dtype == np.int32 and got["segmentation"].shape == (1, 6, 8)
    np.testing.assert_array_equal(got["segmentation"][0], ids)
    bad = ids.copy()
    bad[2, 3] = 11  # == num_classes
    with pytest.raises(UserError, match="id 11"):
        semantic.user_inputs(bad, None)
    bad[2, 3] = -1
    with pytest.raises(UserError, match="id -1"):
        semantic.user_inputs(bad, None)
    with pytest.raises(UserError):
        semantic.user_inputs(ids, np.zeros((6, 8), np.uint8))  # a mask is for inpainting
    with pytest.raises(UserError):
        semantic.user_inputs(np.zeros((6, 8, 3), np.int32), None)  # not one id per pixel


def test_semantic_check_sizes(semantic):
    assert semantic.rescaled_size(64) == 16
    semantic.check_sizes(64, 16)
    with pytest.raises(UserError, match="n_stages"):
        semantic.check_sizes(64, 8)
