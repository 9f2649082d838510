"""Every paper first-stage config: loads, has the published shapes (eval_shape, no init)."""

import glob
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ldm_jax import config_common
from ldm_jax.config_loader import load_config
from ldm_jax.errors import UserError
from ldm_jax.models import autoencoder as ae_models
from ldm_jax.parallel import mesh as mesh_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name -> (latent shape at 256^2, number of codes or 0, disc_start, disc_weight)
PAPER = {
    "kl_f4": ((64, 64, 3), 0, 50001, 0.5),
    "kl_f8": ((32, 32, 4), 0, 50001, 0.5),
    "kl_f16": ((16, 16, 16), 0, 50001, 0.5),
    "kl_f32": ((8, 8, 64), 0, 50001, 0.5),
    "vq_f4": ((64, 64, 3), 8192, 0, 0.75),
    "vq_f4_noattn": ((64, 64, 3), 8192, 11, 0.75),
    "vq_f8": ((32, 32, 4), 16384, 1, 0.6),
    "vq_f16": ((16, 16, 8), 16384, 250001, 0.75),
}


def test_every_autoencoder_config_is_listed():
    names = {pathlib.Path(p).stem for p in glob.glob(str(ROOT / "configs/autoencoder/*.py"))}
    assert names == set(PAPER) | {"quickstart", "photo_f4", "digit_scenes"}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_shapes(name):
    latent, n_embed, disc_start, disc_weight = PAPER[name]
    c = load_config(f"configs/autoencoder/{name}.py")
    assert c.loss.disc_start == disc_start and c.loss.disc_weight == disc_weight
    assert c.optim.base_learning_rate == 4.5e-6 and (c.optim.b1, c.optim.b2) == (0.5, 0.9)
    assert c.model.n_embed == n_embed
    model = ae_models.from_config(c.model)
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init({"params": jax.random.PRNGKey(0), "sample": jax.random.PRNGKey(1)}, x),
        x,
    )
    params = nn.unbox(variables)["params"]
    if c.model.type == "kl":
        z = jax.eval_shape(
            lambda p, x: model.apply({"params": p}, x, method="encode").mean, params, x
        )
    else:
        z = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method="encode"), params, x)
        assert params["quantize"]["embedding"].shape == (n_embed, latent[-1])
    assert z.shape == (1, *latent)
    out = jax.eval_shape(
        lambda p, x: model.apply({"params": p}, x, rngs={"sample": jax.random.PRNGKey(0)}),
        params,
        x,
    )
    assert out.recon.shape == (1, 256, 256, 3)
    if name == "kl_f8":
        # The Stable Diffusion VAE: 83,653,863 parameters in the reference implementation.
        count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
        assert count == 83_653_863


def test_runlocal_shrinks_and_keeps_structure():
    c = load_config("configs/autoencoder/kl_f32.py:runlocal")
    assert c.data.image_size == 32 and c.batch_size == 2 and c.model.ch == 16
    assert tuple(c.model.ch_mult) == (1, 1, 2, 2, 4, 4)
    assert tuple(c.model.attn_resolutions) == (2, 1)


def test_unknown_config_argument_is_an_error():
    with pytest.raises(ValueError, match="unknown config argument 'runlocl'"):
        load_config("configs/autoencoder/kl_f8.py:runlocl")


def test_config_is_locked():
    c = load_config("configs/autoencoder/quickstart.py")
    with pytest.raises(AttributeError, match="nope"):
        c.model.nope = 1


def test_parse_arg_types():
    a = config_common.parse_arg("runlocal,steps=7", runlocal=False, steps=2000)
    assert a.runlocal is True and a.steps == 7


@pytest.mark.parametrize(
    "sizes,n,want",
    [((-1, 1, 1), 8, (8, 1, 1)), ((2, -1, 1), 8, (2, 4, 1)), ((2, 2, 2), 8, (2, 2, 2))],
)
def test_mesh_shapes(sizes, n, want):
    assert mesh_lib.resolve_mesh_shape(sizes, n) == want


@pytest.mark.parametrize("sizes", [(3, -1, 1), (-1, -1, 1), (2, 2, 1)])
def test_bad_mesh_shapes(sizes):
    with pytest.raises(UserError, match="mesh"):
        mesh_lib.resolve_mesh_shape(sizes, 8)


def test_multislice_mesh_needs_a_multislice_job():
    cfg = load_config("configs/autoencoder/photo_f4.py:runlocal", lock=False).mesh
    cfg.dcn_data = 2
    with pytest.raises(UserError, match="2 slices"):
        mesh_lib.make_mesh(cfg)


def _placeholders(c, prefix=""):
    """{path: type} of every None field with a declared type."""
    out = {}
    for key in c.keys():
        value = c[key]
        if hasattr(value, "keys"):
            out |= _placeholders(value, f"{prefix}{key}.")
        elif value is None and c.get_ref(key).get_type() is not type(None):
            out[f"{prefix}{key}"] = c.get_ref(key).get_type()
    return out


@pytest.mark.parametrize(
    "spec", ["configs/autoencoder/kl_f8.py", "configs/diffusion/txt2img_ldm_kl8.py"]
)
def test_stored_config_gets_its_types_back(spec):
    """A checkpoint's JSON config, read back by from_stored (configs/from_run.py): the same
    values, tuples as tuples, and every typed placeholder typed again, so that
    `--config.data.data_dir=...` can override it."""
    import json

    from absl import flags
    from ml_collections import config_flags

    original = load_config(spec)
    stored = json.loads(original.to_json())
    assert stored["data"]["data_dir"] is None  # JSON dropped its type
    back = config_common.from_stored(stored)
    assert back.to_dict() == original.to_dict()
    assert _placeholders(back) == _placeholders(original) and _placeholders(back)
    mult = "ch_mult" if back.stage == "autoencoder" else "channel_mult"
    assert isinstance(back.model[mult], tuple)
    # The command-line path: an override of a placeholder on the restored config.
    argv = ["prog", "--config.data.data_dir=/data/tfds", "--config.batch_size=4"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", back, flag_values=fv, sys_argv=argv)
    fv(argv)
    assert fv.config.data.data_dir == "/data/tfds" and fv.config.batch_size == 4
