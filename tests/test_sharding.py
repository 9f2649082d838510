"""FSDP and tensor parallelism: every split of 8 fake devices trains like one device, and
large parameters (with their optimizer moments and EMA) really are split."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from toy import tiny_autoencoder_config, tiny_diffusion_config

from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import step as step_lib

# Data, FSDP and tensor parallelism alone where it matters most, then all three at once
# (which also covers data x FSDP).
SPLITS = [(8, 1, 1), (1, 8, 1), (2, 2, 2)]
STEPS = 3


def _mesh(shape):
    n = math.prod(shape)
    return mesh_lib.mesh_of(*shape, devices=jax.devices()[:n])


def _batches(stage, batch):
    keys = jax.random.split(jax.random.PRNGKey(11), STEPS)
    out = []
    for k in keys:
        b = {
            "image": jax.random.uniform(
                k, (batch, 16 if stage == "ae" else 32, 16 if stage == "ae" else 32, 3), minval=-1
            )
        }
        if stage == "ldm":
            b["label"] = jax.random.randint(k, (batch,), 0, 10)
        out.append(b)
    return out


def _init(task, mesh):
    shardings = step_lib.state_shardings(task, mesh)
    with jax.set_mesh(mesh):
        init = jax.jit(lambda r: nn.unbox(task.init_state(r)), out_shardings=shardings)
        return init(jax.random.PRNGKey(0))


def _stepper(task, mesh, frozen):
    """state, batch -> (state, metrics) on host, computed on `mesh`."""
    shardings = step_lib.state_shardings(task, mesh)
    step = step_lib.jit_train_step(task, mesh, shardings, donate=False)
    frozen = jax.device_put(frozen, mesh_lib.replicated(mesh))

    def run(state, batch):
        with jax.set_mesh(mesh):
            state = jax.device_put(state, shardings)
            batch = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
            return jax.device_get(step(state, batch, jax.random.PRNGKey(5), frozen))

    return run


@pytest.fixture(scope="module")
def tasks(tiny_autoencoder_run):
    from ldm_jax.training.autoencoder import AutoencoderTask
    from ldm_jax.training.diffusion import DiffusionTask

    ae = AutoencoderTask(tiny_autoencoder_config(batch_size=8))
    ldm = DiffusionTask(tiny_diffusion_config(tiny_autoencoder_run[0], batch_size=8))
    return {"ae": (ae, ae.frozen_params()), "ldm": (ldm, ldm.frozen_params())}


@pytest.fixture(scope="module")
def one_device(tasks):
    """stage -> (batches, states, outs): STEPS steps on one device from the initial state,
    made once per stage for the split tests and the accumulation test; states[k] is the
    state before step k + 1, outs[k] that step's (state, metrics), all on the host."""
    made = {}

    def get(stage):
        if stage not in made:
            task, frozen = tasks[stage]
            batches = _batches(stage, 8)
            one = _stepper(task, _mesh((1, 1, 1)), frozen)
            states, outs = [jax.device_get(_init(task, _mesh((1, 1, 1))))], []
            for b in batches:
                outs.append(one(states[-1], b))
                states.append(outs[-1][0])
            made[stage] = batches, states, outs
        return made[stage]

    return get


def _compare(got, want, lr, where):
    """Loss to 1e-5; gradients (seen through the optimizer moments) to 1e-5 of each
    tensor's scale; weights to 1e-5 plus 2.5 x lr.

    The lr slack is Adam's, not the mesh's: a weight whose gradient is at float32 noise
    level (summed in another order) can change sign, and Adam's early steps move every
    weight by about +-lr whatever its gradient's size. Attention key biases have an exactly
    zero gradient (they shift all logits of a query equally) and are all such weights.
    """
    np.testing.assert_allclose(got[1]["loss"], want[1]["loss"], rtol=1e-5, err_msg=where)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got[0]), jax.tree_util.tree_leaves(want[0])
    ):
        name, a, b = jax.tree_util.keystr(path), np.asarray(a), np.asarray(b)
        if not a.size:
            continue
        if "opt" in name:
            scale = max(1.0, float(np.max(np.abs(b))))
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale, err_msg=where + name)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=2.5 * lr, err_msg=where + name)


@pytest.mark.parametrize("stage", ["ae", "ldm"])
def test_splits_of_eight_devices_train_like_one(tasks, one_device, stage):
    """Three steps on each mesh, each from the one-device state of that step, equal the
    one-device steps."""
    task, frozen = tasks[stage]
    batches, states, outs = one_device(stage)
    lr = task.learning_rate
    for shape in SPLITS:
        split = _stepper(task, _mesh(shape), frozen)
        for k, b in enumerate(batches):
            _compare(split(states[k], b), outs[k], lr, f"{shape} step {k + 1}: ")


@pytest.mark.parametrize("name", ["sd-v1", "celebahq-ldm-vq-4"])
def test_fsdp_splits_a_paper_unet_eightfold(name):
    """Params of a paper-size UNet (abstract: no init) with fsdp=8: every tensor of >= 64K
    elements is split over 8 devices, and one device holds <= 1.15 x total / 8."""
    from ldm_jax.models import unet_configs

    kw = dict(unet_configs.PAPER_UNETS[name])
    side = kw.pop("image_size")
    unet = unet_configs.from_config(kw)
    ctx = None
    if unet.context_dim:
        ctx = jnp.zeros((1, 77, unet.context_dim))
    abstract = jax.eval_shape(
        lambda: unet.init(
            jax.random.PRNGKey(0),
            jnp.zeros((1, side, side, unet.in_channels)),
            jnp.zeros((1,), jnp.int32),
            context=ctx,
        )["params"]
    )
    mesh = _mesh((1, 8, 1))
    shardings = mesh_lib.logical_to_sharding(abstract, mesh)
    leaves = jax.tree_util.tree_leaves(nn.unbox(abstract))
    for leaf, sh in zip(leaves, jax.tree_util.tree_leaves(shardings)):
        if leaf.size >= 65536:
            assert math.prod(sh.shard_shape(leaf.shape)) * 8 == leaf.size, (leaf.shape, sh.spec)
    total = mesh_lib.bytes_per_device(
        abstract, mesh_lib.logical_to_sharding(abstract, _mesh((1, 1, 1)))
    )
    per_device = mesh_lib.bytes_per_device(abstract, shardings)
    assert per_device <= 1.15 * total / 8, (per_device, total)


def test_gradient_accumulation_equals_the_large_batch(tasks, one_device):
    """grad_accum_steps=4 (microbatches of 2, on a (2, 4, 1) mesh) gives the batch-of-8
    step (the first one-device step of the split test): loss and gradients to 1e-5."""
    from ldm_jax.training.diffusion import DiffusionTask

    task, frozen = tasks["ldm"]
    c = task.config.copy_and_resolve_references()
    c.train.grad_accum_steps = 4
    accum = DiffusionTask(c, first_stage=task.first_stage)
    batches, states, outs = one_device("ldm")
    batch, state, want = batches[0], states[0], outs[0]
    got = _stepper(accum, _mesh((2, 4, 1)), frozen)(state, batch)
    _compare(got, want, task.learning_rate, "accumulated: ")
    np.testing.assert_allclose(got[1]["grad_norm"], want[1]["grad_norm"], rtol=1e-5)
