"""The first-stage train step: hand-composed gradients, adaptive weight, sharding, NaN.

Compiles are the cost here (a step with LPIPS-VGG16 takes ~20 s to compile on 2 CPU
cores), so tests share one task and one jitted step where they can.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from toy import tiny_autoencoder_config

from ldm_jax.losses import autoencoder as ae_losses
from ldm_jax.models import lpips as lpips_lib
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.training.autoencoder import AutoencoderTask


class Setup:
    def __init__(self, kind, batch_size, dtype="float32", **loss):
        self.config = tiny_autoencoder_config(kind, batch_size=batch_size)
        self.config.model.dtype = dtype
        self.config.loss.disc_start = 1  # step 0 without GAN terms, step 1 with them
        # Adam's first update is lr * g / (|g| + eps): with a larger eps it stays linear in
        # g, so float noise in exactly-zero gradients cannot become lr-sized differences.
        self.config.optim.eps = 1e-3
        self.config.loss.update(loss)
        self.task = AutoencoderTask(self.config)
        self.state = jax.jit(lambda r: nn.unbox(self.task.init_state(r)))(jax.random.PRNGKey(0))
        self.x = jax.random.uniform(
            jax.random.PRNGKey(1), (batch_size, 16, 16, 3), minval=-1, maxval=1
        )
        self.frozen = {"lpips": lpips_lib.load_lpips_params()}
        self.step = jax.jit(self.task.train_step)


@pytest.fixture(scope="module")
def kl():
    return Setup("kl", 8)


def test_generator_grads_equal_direct_autodiff(kl):
    """The VJP-composed gradient and adaptive weight equal plain jax.grad of the loss."""
    task, x, frozen, lc = kl.task, kl.x, kl.frozen, kl.config.loss
    state = kl.state.replace(step=jnp.ones((), jnp.int32))  # GAN terms on
    rng = jax.random.PRNGKey(7)
    grads, _, metrics = jax.jit(task.generator_grads)(state, x, rng, frozen)
    r_sample, r_drop = jax.random.split(rng)

    def pieces(model_params, logvar):
        out = task.model.apply(
            {"params": model_params}, x, train=True, rngs={"sample": r_sample, "dropout": r_drop}
        )
        perceptual = lpips_lib.lpips_distance(frozen["lpips"], x, out.recon)
        nll, _ = ae_losses.reconstruction_nll(
            x, out.recon, perceptual, logvar, perceptual_weight=1.0, kind="kl"
        )
        logits = task.disc.apply(
            {"params": state.disc_params, "batch_stats": state.disc_stats},
            out.recon,
            train=True,
            mutable=["batch_stats"],
        )[0]
        return nll, out.reg_loss, -jnp.mean(logits)

    params, logvar = state.gen_params["model"], state.gen_params["logvar"]

    @jax.jit
    def reference(params, logvar):
        last = lambda g: g["decoder"]["conv_out"]["kernel"]
        g_nll = jax.grad(lambda p: pieces(p, logvar)[0])(params)
        g_adv = jax.grad(lambda p: pieces(p, logvar)[2])(params)
        n_nll, n_adv = jnp.linalg.norm(last(g_nll)), jnp.linalg.norm(last(g_adv))
        d_weight = jnp.clip(n_nll / (n_adv + 1e-4), 0, 1e4) * lc.disc_weight

        def total(p, lv):
            nll, reg, g = pieces(p, lv)
            return nll + lc.kl_weight * reg + d_weight * g

        return d_weight, jax.grad(total, argnums=(0, 1))(params, logvar)

    d_weight, (want_model, want_logvar) = reference(params, logvar)
    np.testing.assert_allclose(metrics["d_weight"], d_weight, rtol=1e-4)
    assert float(metrics["d_weight"]) > 0
    flat_got = jax.tree_util.tree_leaves(grads["model"])
    flat_want = jax.tree_util.tree_leaves(want_model)
    # Tolerance relative to the largest gradient: some leaves (biases feeding a GroupNorm)
    # have an exact gradient of zero, so only float noise is left in them.
    scale = max(float(np.abs(b).max()) for b in flat_want)
    for a, b in zip(flat_got, flat_want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(grads["logvar"], want_logvar, rtol=1e-4)


def test_adaptive_weight_hand_values():
    nll_grad = jnp.array([3.0, 4.0])  # norm 5
    g_grad = jnp.array([0.0, 2.0])  # norm 2
    np.testing.assert_allclose(
        ae_losses.adaptive_weight(nll_grad, g_grad, 0.5), 0.5 * 5 / (2 + 1e-4), rtol=1e-6
    )
    big = ae_losses.adaptive_weight(jnp.array([1e9]), jnp.array([0.0]), 1.0)
    assert float(big) == 1e4  # clipped


def test_gan_terms_are_off_before_disc_start(kl):
    new_state, metrics = kl.step(kl.state, {"image": kl.x}, jax.random.PRNGKey(0), kl.frozen)
    assert float(metrics["disc_factor"]) == 0.0 and float(metrics["disc_loss"]) == 0.0
    # Zero discriminator gradients leave its parameters where they were.
    for a, b in zip(
        jax.tree_util.tree_leaves(new_state.disc_params),
        jax.tree_util.tree_leaves(kl.state.disc_params),
    ):
        np.testing.assert_array_equal(a, b)
    assert int(new_state.step) == 1
    _, metrics = kl.step(new_state, {"image": kl.x}, jax.random.PRNGKey(0), kl.frozen)
    assert float(metrics["disc_factor"]) == 1.0 and float(metrics["disc_loss"]) > 0


def test_nonfinite_step_is_recorded_and_not_applied(kl):
    bad = kl.x.at[0, 0, 0, 0].set(jnp.nan)
    new_state, metrics = kl.step(kl.state, {"image": bad}, jax.random.PRNGKey(0), kl.frozen)
    assert float(metrics["finite"]) == 0.0
    assert int(new_state.bad_step) == 0 and int(new_state.skipped) == 1
    for a, b in zip(
        jax.tree_util.tree_leaves(new_state.gen_params),
        jax.tree_util.tree_leaves(kl.state.gen_params),
    ):
        np.testing.assert_array_equal(a, b)


def test_eight_devices_equal_one_device(kl):
    assert len(jax.devices()) == 8
    task = kl.task
    state = kl.state.replace(step=jnp.ones((), jnp.int32))  # GAN and BatchNorm terms on
    one = jax.device_get(kl.step(state, {"image": kl.x}, jax.random.PRNGKey(3), kl.frozen))

    mesh = mesh_lib.make_mesh(task.config.mesh)  # data=-1: all 8 devices
    assert mesh.shape["data"] == 8
    boxed = jax.eval_shape(task.init_state, jax.random.PRNGKey(0))
    shardings = mesh_lib.logical_to_sharding(boxed, mesh)
    rep, data = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        step = jax.jit(
            task.train_step,
            in_shardings=(shardings, data, rep, rep),
            out_shardings=(shardings, rep),
        )
        batch = {"image": jax.device_put(kl.x, data)}
        assert len(batch["image"].sharding.device_set) == 8
        out = step(jax.device_put(state, shardings), batch, jax.random.PRNGKey(3), kl.frozen)
        eight = jax.device_get(out)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(close, one[0].gen_params, eight[0].gen_params)
    jax.tree_util.tree_map(close, one[0].disc_params, eight[0].disc_params)
    jax.tree_util.tree_map(close, one[0].disc_stats, eight[0].disc_stats)
    for k in one[1]:
        close(one[1][k], eight[1][k], err_msg=k)


def test_vq_step_updates_codebook_and_discriminator():
    vq = Setup("vq", 4, perceptual_weight=0.0)
    state = vq.state.replace(step=jnp.ones((), jnp.int32))
    new_state, metrics = vq.step(state, {"image": vq.x}, jax.random.PRNGKey(0), vq.frozen)
    assert float(metrics["finite"]) == 1.0
    assert 0 < float(metrics["codebook_usage"]) <= 1
    old = state.gen_params["model"]["quantize"]["embedding"]
    new = new_state.gen_params["model"]["quantize"]["embedding"]
    assert not np.allclose(old, new)
    assert float(metrics["disc_loss"]) > 0


def test_bf16_compute_trains_like_fp32():
    """model.dtype='bfloat16' (fp32 params and optimizer): the step with the GAN terms on
    runs (the loss heads' fp32 cotangents meet an fp32 reconstruction), and its losses and
    adaptive weight are the fp32 step's to bf16 precision."""
    runs = {d: Setup("kl", 4, dtype=d, perceptual_weight=0.0) for d in ("float32", "bfloat16")}
    out = {}
    for d, run in runs.items():
        state = run.state.replace(step=jnp.ones((), jnp.int32))
        new_state, metrics = run.step(state, {"image": run.x}, jax.random.PRNGKey(3), run.frozen)
        assert float(metrics["finite"]) == 1.0, d
        leaves = jax.tree.leaves(new_state.gen_params)
        assert all(leaf.dtype == jnp.float32 for leaf in leaves), d  # master weights stay fp32
        out[d] = metrics
    for key in ("nll", "rec_loss", "kl", "d_weight", "disc_loss"):
        np.testing.assert_allclose(
            out["bfloat16"][key], out["float32"][key], rtol=0.05, err_msg=key
        )
