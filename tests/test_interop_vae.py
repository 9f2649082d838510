"""PyTorch interop of the KL autoencoder: diffusers and CompVis layouts, files, configs.

The reference is diffusers' AutoencoderKL (torch CPU, test-only: pip install torch==2.13.0
diffusers==0.42.1) with randomised weights converted diffusers -> ldm_jax. The CompVis
layout is checked by consistency with that conversion, by tensor names and shapes of the
released SD checkpoints, and by bit-identical round trips; the SD-size VAE only by shapes.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import assert_trees_identical, perturbed_reference, torch_with_diffusers

from ldm_jax.config_loader import load_config
from ldm_jax.errors import UserError
from ldm_jax.interop.diffusers_config import vae_config_from_diffusers
from ldm_jax.interop.tensor_files import load_state_dict, save_safetensors
from ldm_jax.interop.vae_weights import (
    COMPVIS_VAE_PREFIX,
    vae_from_compvis,
    vae_from_diffusers,
    vae_to_compvis,
    vae_to_diffusers,
)
from ldm_jax.models import autoencoder

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=32)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512
)


def _diffusers_vae(**config):
    from diffusers import AutoencoderKL

    n = len(config["block_out_channels"])
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        **config,
    )


@functools.cache
def _tiny_reference():
    """(diffusers AutoencoderKL with every parameter perturbed, its numpy state, ldm model)."""
    ref, state = perturbed_reference(lambda: _diffusers_vae(**TINY))
    return ref, state, autoencoder.from_config(vae_config_from_diffusers(dict(ref.config)))


def test_vae_matches_diffusers():
    torch = torch_with_diffusers()
    ref, state, model = _tiny_reference()
    params = vae_from_diffusers(state, model)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 32, 32, 3), np.float32)  # [B, H, W, 3]
    z = rng.standard_normal((2, 16, 16, 4), np.float32)  # [B, h, w, 4]
    post = jax.jit(functools.partial(model.apply, method=model.encode))(params, x)
    recon = np.asarray(jax.jit(functools.partial(model.apply, method=model.decode))(params, z))
    nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2))
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    with torch.no_grad():
        dist = ref.encode(nchw(x)).latent_dist
        ref_recon = nhwc(ref.decode(nchw(z)).sample)
    diffs = {
        "mean": np.abs(np.asarray(post.mean) - nhwc(dist.mean)).max(),
        "logvar": np.abs(np.asarray(post.logvar) - nhwc(dist.logvar)).max(),
        "decode": np.abs(recon - ref_recon).max(),
    }
    print("AutoencoderKL vs diffusers, max abs diff:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= 1e-4


def test_vae_reads_older_diffusers_attention_names():
    _, state, model = _tiny_reference()
    legacy = {}
    for name, value in state.items():
        for new, old in (
            ("to_q", "query"),
            ("to_k", "key"),
            ("to_v", "value"),
            ("to_out.0", "proj_attn"),
        ):
            if f"attentions.0.{new}." in name:
                name = name.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
                value = value[:, :, None, None] if value.ndim == 2 else value  # conv-shaped
        legacy[name] = value
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    direct = vae_from_diffusers(state, model)["params"]
    assert_trees_identical(vae_from_diffusers(legacy, model)["params"], direct)
    both = {
        **legacy,
        "decoder.mid_block.attentions.0.to_q.weight": state[
            "decoder.mid_block.attentions.0.to_q.weight"
        ],
    }
    with pytest.raises(UserError, match="under two names"):
        vae_from_diffusers(both, model)


def test_vae_compvis_layout_and_round_trips(tmp_path):
    _, state, model = _tiny_reference()
    direct = vae_from_diffusers(state, model)
    compvis = vae_to_compvis(direct, model)
    assert len(compvis) == len(state)
    p = COMPVIS_VAE_PREFIX
    known = {
        "encoder.down.1.block.0.nin_shortcut.weight": (64, 32, 1, 1),
        "encoder.down.0.downsample.conv.weight": (32, 32, 3, 3),
        "encoder.mid.attn_1.q.weight": (64, 64, 1, 1),  # a 1x1 conv, Linear in diffusers
        "decoder.mid.block_2.norm1.weight": (64,),
        "decoder.up.0.block.0.nin_shortcut.weight": (32, 64, 1, 1),
        "decoder.up.1.upsample.conv.weight": (64, 64, 3, 3),
        "decoder.norm_out.bias": (32,),
        "quant_conv.weight": (8, 8, 1, 1),
    }
    assert {k: compvis[p + k].shape for k in known} == known
    # CompVis numbers decoder levels by resolution, diffusers deepest first.
    up0 = state["decoder.up_blocks.1.resnets.1.conv2.weight"]
    np.testing.assert_array_equal(compvis[p + "decoder.up.0.block.1.conv2.weight"], up0)
    assert_trees_identical(vae_from_compvis(compvis, model)["params"], direct["params"])

    back = vae_to_diffusers(direct, model)
    assert back.keys() == state.keys()
    assert all(np.array_equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)
    rng = np.random.default_rng(1)
    own = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape, np.float32)), direct)
    boxed = jax.tree.map(lambda a: nn.Partitioned(a, (None,) * a.ndim), own)
    for to_torch, from_torch in (
        (vae_to_diffusers, vae_from_diffusers),
        (vae_to_compvis, vae_from_compvis),
    ):
        assert_trees_identical(from_torch(to_torch(boxed, model), model)["params"], own["params"])

    # A bare CompVis autoencoder file: no prefix, and the training loss beside the model.
    bare = vae_to_compvis(own, model, prefix="")
    loss = {
        "loss.logvar": np.zeros((), np.float32),
        "loss.discriminator.main.0.weight": np.ones((8, 3, 4, 4), np.float32),
    }
    save_safetensors(tmp_path / "kl.safetensors", {**bare, **loss})
    from_file = vae_from_compvis(load_state_dict(tmp_path / "kl.safetensors"), model, prefix="")
    assert_trees_identical(from_file["params"], own["params"])
    # Half precision on disk: exact for values that fp16 holds.
    half = vae_to_diffusers(own, model, dtype=np.float16)
    save_safetensors(tmp_path / "vae.safetensors", half)
    want = jax.tree.map(lambda a: np.asarray(a).astype(np.float16).astype(np.float32), own)
    got = vae_from_diffusers(load_state_dict(tmp_path / "vae.safetensors"), model)
    assert_trees_identical(got["params"], want["params"])


def test_vq_model_compvis_round_trip():
    model = autoencoder.VQModel(
        ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(32,), resolution=32, n_embed=16
    )
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(0)
    own = jax.tree.map(
        lambda a: rng.standard_normal(a.shape).astype(np.float32), nn.meta.unbox(shapes)
    )
    compvis = vae_to_compvis(own, model, prefix="")
    assert compvis["quantize.embedding.weight"].shape == (16, 4)
    assert compvis["encoder.down.0.attn.0.q.weight"].shape == (32, 32, 1, 1)
    assert_trees_identical(vae_from_compvis(compvis, model, prefix="")["params"], own["params"])
    with pytest.raises(UserError, match="needs an AutoencoderKL"):
        vae_to_diffusers(own, model)


def test_full_size_sd_vae_conversion_is_shape_exact():
    torch = torch_with_diffusers()
    with torch.device("meta"):
        ref = _diffusers_vae(**SD_VAE)
    derived = vae_config_from_diffusers(dict(ref.config))
    kl_f8 = load_config("configs/autoencoder/kl_f8.py").model  # the SD VAE's settings
    for key in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "embed_dim"):
        assert tuple(np.atleast_1d(derived[key])) == tuple(np.atleast_1d(kl_f8[key])), key
    model = autoencoder.from_config(derived)

    zero = np.zeros((), np.float32)
    state = {k: np.broadcast_to(zero, v.shape) for k, v in ref.state_dict().items()}  # no memory
    params = vae_from_diffusers(state, model)["params"]
    traced = jax.eval_shape(
        functools.partial(model.init, sample_posterior=False),
        jax.random.PRNGKey(0),
        jnp.zeros((1, 8, 8, 3)),
    )
    want = {
        p: s.shape for p, s in traverse_util.flatten_dict(nn.meta.unbox(traced["params"])).items()
    }
    assert {p: a.shape for p, a in traverse_util.flatten_dict(params).items()} == want
    assert len(want) == len(state) == 248

    compvis = vae_to_compvis({"params": params}, model)
    known = {  # tensors of the released SD checkpoints
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.2.conv1.weight": (256, 256, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
        "post_quant_conv.weight": (4, 4, 1, 1),
    }
    assert {k: compvis[COMPVIS_VAE_PREFIX + k].shape for k in known} == known
    assert vae_from_compvis(compvis, model)["params"].keys() == params.keys()


def test_mismatching_vae_file_is_one_clear_error():
    ref, state, model = _tiny_reference()
    bad = dict(state)
    name = "decoder.up_blocks.0.resnets.1.conv2.weight"
    bad[name] = np.zeros((64, 64, 1, 1), np.float32)
    msg = rf"'{name}' has shape \(64, 64, 1, 1\) but the model expects \(64, 64, 3, 3\)"
    with pytest.raises(UserError, match=msg):
        vae_from_diffusers(bad, model)
    # A VAE with another latent width: every latent-sized tensor differs, the first is named.
    other = autoencoder.from_config(
        {**vae_config_from_diffusers(dict(ref.config)), "z_channels": 8, "embed_dim": 8}
    )
    with pytest.raises(
        UserError,
        match=r"'encoder.conv_out.weight' has shape \(8, 64, 3, 3\) but the model expects \(16, 64, 3, 3\)",
    ):
        vae_from_diffusers(state, other)
    del bad["quant_conv.bias"]
    with pytest.raises(UserError, match=r"missing tensors \(1\): 'quant_conv.bias'"):
        vae_from_diffusers(bad, model)


def test_vae_config_rejects_what_ldm_jax_cannot_express():
    base = dict(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    cases = {
        "use_quant_conv": dict(use_quant_conv=False),
        "DownEncoderBlock2D": dict(down_block_types=("AttnDownEncoderBlock2D",) * 2),
        "multiple of the first": dict(block_out_channels=(32, 48)),
    }
    for message, change in cases.items():
        with pytest.raises(UserError, match=message):
            vae_config_from_diffusers({**base, **change})
    assert (
        vae_config_from_diffusers({**base, "mid_block_add_attention": False})["attn_type"] == "none"
    )
    with pytest.raises(UserError, match="attention only in its mid blocks"):
        vae_to_diffusers(
            {},
            autoencoder.AutoencoderKL(ch=32, ch_mult=(1, 2), attn_resolutions=(16,), resolution=32),
        )
