"""PyTorch interop of the diffusion UNet: diffusers and CompVis layouts, files, configs.

The reference is diffusers' UNet2DConditionModel (torch CPU, test-only: pip install
torch==2.13.0 diffusers==0.42.1) with randomised weights converted diffusers -> ldm_jax.
No CompVis PyTorch code is installed, so that layout is checked by consistency (diffusers
-> CompVis export -> ldm_jax equals diffusers -> ldm_jax), by the tensor names and shapes
that Stable Diffusion checkpoints are known to hold, and by bit-identical round trips.
Full-size SD UNets are only traced (jax.eval_shape, torch 'meta' device).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from helpers import assert_trees_identical, perturbed_reference, torch_with_diffusers

from ldm_jax.errors import UserError
from ldm_jax.interop.diffusers_config import unet_config_from_diffusers
from ldm_jax.interop.tensor_files import load_safetensors, load_state_dict, save_safetensors
from ldm_jax.interop.unet_weights import (
    COMPVIS_UNET_PREFIX,
    unet_from_compvis,
    unet_from_diffusers,
    unet_to_compvis,
    unet_to_diffusers,
)
from ldm_jax.models import unet_configs
from ldm_jax.models.unet import UNetModel

CROSS_DOWN, CROSS_UP = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
# Tiny diffusers configs in the two Stable Diffusion families.
TINY = {
    # SD v1: 1x1-conv proj_in/out, a fixed head count (diffusers' attention_head_dim=8).
    "sd1-like": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=(CROSS_DOWN, CROSS_DOWN),
        up_block_types=(CROSS_UP, CROSS_UP),
        cross_attention_dim=32,
        attention_head_dim=8,
    ),
    # SD v2: Linear proj_in/out, a fixed head width (16 here, 64 in SD v2), no attention at
    # the deepest level (as SD), two resnets per level.
    "sd2-like": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=(CROSS_DOWN, "DownBlock2D"),
        up_block_types=("UpBlock2D", CROSS_UP),
        cross_attention_dim=24,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
    ),
}
_SD_DOWN = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, "DownBlock2D")
_SD_UP = ("UpBlock2D", CROSS_UP, CROSS_UP, CROSS_UP)
# The UNet config.json of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2.
SD_UNETS = {
    "sd-v1": dict(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        down_block_types=_SD_DOWN, up_block_types=_SD_UP,
    ),
    "sd-v2": dict(
        sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True, upcast_attention=True,
        down_block_types=_SD_DOWN, up_block_types=_SD_UP,
    ),
}  # fmt: skip


def _assert_states_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name]), name


@functools.cache
def _tiny_reference(variant: str):
    """(variant, diffusers UNet with every parameter perturbed, its numpy state, ldm model)."""
    torch_with_diffusers()
    from diffusers import UNet2DConditionModel

    ref, state = perturbed_reference(lambda: UNet2DConditionModel(sample_size=8, **TINY[variant]))
    model = unet_configs.from_config(unet_config_from_diffusers(dict(ref.config)))
    return variant, ref, state, model


@pytest.fixture(params=sorted(TINY))
def tiny(request):
    return _tiny_reference(request.param)


def test_unet_matches_diffusers(tiny):
    torch = torch_with_diffusers()
    variant, ref, state, model = tiny
    heads = dict(num_heads=8) if variant == "sd1-like" else dict(num_head_channels=16)
    assert {k: getattr(model, k) for k in heads} == heads
    assert model.use_linear_in_transformer == (variant == "sd2-like")

    params = unet_from_diffusers(state, model)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4), np.float32)  # [B, H, W, C]
    t = np.array([3.0, 700.0], np.float32)
    context = rng.standard_normal((2, 5, model.context_dim), np.float32)
    ours = np.asarray(jax.jit(model.apply)(params, x, t, context))
    with torch.no_grad():
        theirs = ref(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),
            torch.from_numpy(t),
            torch.from_numpy(context),
        )
    theirs = theirs.sample.numpy().transpose(0, 2, 3, 1)
    diff = np.abs(ours - theirs).max()
    print(
        f"{variant} UNet vs diffusers: max abs diff {diff:.2e} (output max {np.abs(theirs).max():.2f})"
    )
    assert diff <= 1e-4


def test_unet_compvis_layout_and_round_trips(tiny, tmp_path):
    torch = torch_with_diffusers()
    variant, _, state, model = tiny
    direct = unet_from_diffusers(state, model)
    compvis = unet_to_compvis(direct, model)
    assert len(compvis) == len(state) and all(k.startswith(COMPVIS_UNET_PREFIX) for k in compvis)
    p = COMPVIS_UNET_PREFIX
    proj = (32, 32) if variant == "sd2-like" else (32, 32, 1, 1)  # Linear vs 1x1 conv
    up = "output_blocks.2.1.conv" if variant == "sd2-like" else "output_blocks.1.2.conv"
    expected = {
        "time_embed.0.weight": (128, 32),
        "input_blocks.0.0.weight": (32, 4, 3, 3),
        "input_blocks.1.1.proj_in.weight": proj,
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, model.context_dim),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (256, 32),
        "middle_block.1.transformer_blocks.0.attn1.to_out.0.bias": (64,),
        f"{up}.weight": (64, 64, 3, 3),
        "out.2.weight": (4, 32, 3, 3),
    }
    assert {k: compvis[p + k].shape for k in expected} == expected
    # Every tensor keeps its value: diffusers -> CompVis -> ldm_jax == diffusers -> ldm_jax.
    assert_trees_identical(unet_from_compvis(compvis, model)["params"], direct["params"])
    # torch-side round trips reproduce the state dicts bit for bit.
    _assert_states_identical(unet_to_diffusers(direct, model), state)
    _assert_states_identical(unet_to_compvis(unet_from_compvis(compvis, model), model), compvis)

    # ldm_jax-side round trips, from jax arrays in the boxed form model.init returns.
    rng = np.random.default_rng(1)
    own = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape, np.float32)), direct)
    boxed = jax.tree.map(lambda a: nn.Partitioned(a, (None,) * a.ndim), own)
    for to_torch, from_torch in (
        (unet_to_diffusers, unet_from_diffusers),
        (unet_to_compvis, unet_from_compvis),
    ):
        assert_trees_identical(from_torch(to_torch(boxed, model), model)["params"], own["params"])

    # A single-file SD checkpoint: UNet next to VAE, text encoder and schedule buffers.
    others = {
        "first_stage_model.decoder.conv_in.weight": np.ones((8, 4, 3, 3), np.float32),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": np.ones(4, np.float32),
        "alphas_cumprod": np.linspace(1.0, 0.0, 10, dtype=np.float32),
    }
    path = tmp_path / "sd.safetensors"
    save_safetensors(path, {**compvis, **others})
    from_file = unet_from_compvis(load_state_dict(path), model)
    assert_trees_identical(from_file["params"], direct["params"])
    assert load_safetensors(path, prefix=p).keys() == compvis.keys()

    # A Lightning-style bf16 .ckpt: {'state_dict': ...}, read with weights_only=True.
    bf16 = unet_to_compvis(own, model, dtype=ml_dtypes.bfloat16)
    ckpt = {
        "state_dict": {
            k: torch.from_numpy(v.astype(np.float32)).bfloat16() for k, v in bf16.items()
        },
        "global_step": 7,
    }
    torch.save(ckpt, tmp_path / "sd.ckpt")
    loaded = load_state_dict(tmp_path / "sd.ckpt")
    _assert_states_identical(loaded, bf16)
    want = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32), own)
    assert_trees_identical(unet_from_compvis(loaded, model)["params"], want["params"])


def _zero_stride(shape) -> np.ndarray:
    return np.broadcast_to(np.zeros((), np.float32), shape)  # shape only, no memory


@pytest.mark.parametrize("name", sorted(SD_UNETS))
def test_full_size_sd_unet_conversion_is_shape_exact(name):
    torch = torch_with_diffusers()
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # shapes without weights
        ref = UNet2DConditionModel(**SD_UNETS[name])
    derived = unet_config_from_diffusers(dict(ref.config))
    preset = unet_configs.PAPER_UNETS[name]
    defaults = {k: UNetModel.__dataclass_fields__[k].default for k in derived if k not in preset}
    assert {k: derived[k] for k in defaults} == defaults
    for key, value in preset.items():
        if key == "attention_resolutions":
            assert sorted(derived[key]) == sorted(value)
        elif key != "image_size":
            assert derived[key] == value, key
    model = unet_configs.from_config(derived)

    state = {k: _zero_stride(v.shape) for k, v in ref.state_dict().items()}
    params = unet_from_diffusers(state, model)["params"]
    traced = jax.eval_shape(
        model.init,
        jax.random.PRNGKey(0),
        jnp.zeros((1, 8, 8, 4)),
        jnp.zeros(1),
        jnp.zeros((1, 1, model.context_dim)),
    )
    want = {
        p: s.shape for p, s in traverse_util.flatten_dict(nn.meta.unbox(traced["params"])).items()
    }
    got = {p: a.shape for p, a in traverse_util.flatten_dict(params).items()}
    assert got == want
    assert len(got) == len(state) == 686

    compvis = unet_to_compvis({"params": params}, model)
    ctx, proj = (768, (320, 320, 1, 1)) if name == "sd-v1" else (1024, (320, 320))
    known = {  # tensors of the released SD checkpoints
        "input_blocks.1.1.proj_in.weight": proj,
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, ctx),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
        "time_embed.2.weight": (1280, 1280),
        "out.2.weight": (4, 320, 3, 3),
    }
    assert {k: compvis[COMPVIS_UNET_PREFIX + k].shape for k in known} == known
    assert unet_from_compvis(compvis, model)["params"].keys() == params.keys()


def test_openaimodel_unet_compvis_layout():
    # LDM's LSUN-churches UNet: AttentionBlocks (Conv1d qkv [3C, C, 1]), ResBlock
    # up/downsampling and scale-shift norm, which only the CompVis layout holds.
    model = unet_configs.from_config(unet_configs.PAPER_UNETS["lsun_churches-ldm-kl-8"])
    traced = jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 4)), jnp.zeros(1)
    )
    shapes = nn.meta.unbox(traced)
    compvis = unet_to_compvis(
        jax.tree.map(lambda a: _zero_stride(a.shape), shapes), model, prefix=""
    )
    known = {
        "input_blocks.1.1.qkv.weight": (576, 192, 1),
        "input_blocks.1.1.proj_out.weight": (192, 192, 1),
        "input_blocks.3.0.emb_layers.1.weight": (384, 768),  # the downsampling ResBlock
        "output_blocks.2.1.in_layers.2.weight": (768, 768, 3, 3),  # upsampling ResBlocks,
        "output_blocks.5.2.in_layers.2.weight": (768, 768, 3, 3),  # after an attention
    }
    assert {k: compvis[k].shape for k in known} == known
    back = unet_from_compvis(compvis, model, prefix="")["params"]
    assert jax.tree.map(np.shape, back) == jax.tree.map(lambda a: a.shape, shapes["params"])
    with pytest.raises(UserError, match="resblock_updown"):
        unet_to_diffusers({}, model.clone(use_spatial_transformer=True, context_dim=8))


def test_unet_config_rejects_what_ldm_jax_cannot_express():
    base = dict(
        block_out_channels=(32, 64),
        down_block_types=(CROSS_DOWN,) * 2,
        up_block_types=(CROSS_UP,) * 2,
    )
    cases = {
        "flip_sin_to_cos": dict(flip_sin_to_cos=False),
        "multiple of the first": dict(block_out_channels=(32, 48)),
        "one head count or one head width": dict(attention_head_dim=(2, 3)),
        "different levels": dict(up_block_types=("UpBlock2D", CROSS_UP)),
        "per-level values": dict(layers_per_block=(1, 2)),
        "addition_embed_type": dict(addition_embed_type="text_time"),  # SDXL
        "_class_name 'AutoencoderKL'": dict(_class_name="AutoencoderKL"),
    }
    for message, change in cases.items():
        with pytest.raises(UserError, match=message):
            unet_config_from_diffusers({**base, **change})
    ok = unet_config_from_diffusers(
        {**base, "resnet_time_scale_shift": "scale_shift", "num_class_embeds": 10}
    )
    assert ok["use_scale_shift_norm"] and ok["num_classes"] == 10


def test_class_conditional_scale_shift_unet_names_match_diffusers():
    # Names and shapes only (no forward pass): class_embedding <-> label_emb and the
    # doubled time_emb_proj of resnet_time_scale_shift="scale_shift".
    torch = torch_with_diffusers()
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ref = UNet2DConditionModel(
            **TINY["sd1-like"], num_class_embeds=10, resnet_time_scale_shift="scale_shift"
        )
    model = unet_configs.from_config(unet_config_from_diffusers(dict(ref.config)))
    assert model.num_classes == 10 and model.use_scale_shift_norm
    state = {k: _zero_stride(v.shape) for k, v in ref.state_dict().items()}
    params = unet_from_diffusers(state, model)["params"]
    assert params["label_emb"]["embedding"].shape == (10, 128)
    assert params["input_blocks_1_0"]["emb_layers_1"]["kernel"].shape == (128, 64)
    compvis = unet_to_compvis({"params": params}, model)
    assert compvis[COMPVIS_UNET_PREFIX + "label_emb.weight"].shape == (10, 128)


class _NotATensor:  # what weights_only=True must refuse to unpickle
    pass


def test_mismatching_unet_file_is_one_clear_error():
    _, _, state, model = _tiny_reference("sd1-like")
    bad = dict(state)
    name = "down_blocks.1.resnets.0.conv1.weight"
    bad[name] = np.zeros((64, 16, 3, 3), np.float32)
    msg = rf"'{name}' has shape \(64, 16, 3, 3\) but the model expects \(64, 32, 3, 3\)"
    with pytest.raises(UserError, match=msg):
        unet_from_diffusers(bad, model)
    del bad["conv_out.bias"]
    bad["down_blocks.9.resnets.0.conv1.weight"] = np.zeros(3, np.float32)
    with pytest.raises(
        UserError,
        match=r"missing tensors \(1\): 'conv_out.bias'.*unexpected tensors \(1\): 'down_blocks.9",
    ):
        unet_from_diffusers(bad, model)
    # CompVis: keys outside the prefix are other models; unknown keys inside it are errors.
    compvis = unet_to_compvis(unet_from_diffusers(state, model), model)
    compvis[COMPVIS_UNET_PREFIX + "label_emb.weight"] = np.zeros((10, 128), np.float32)
    with pytest.raises(
        UserError, match=r"unexpected tensors \(1\): 'model.diffusion_model.label_emb.weight'"
    ):
        unet_from_compvis(compvis, model)
    with pytest.raises(UserError, match="needs cross-attention"):
        unet_to_diffusers({}, UNetModel(4, 4, 32, 1, (), channel_mult=(1, 2), num_heads=1))


def test_weight_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_state_dict(tmp_path / "nothing.safetensors")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(UserError, match="unknown weight file suffix"):
        load_state_dict(tmp_path / "w.npz")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_state_dict(tmp_path / "broken.safetensors")
    torch = torch_with_diffusers()
    torch.save({"state_dict": {"w": torch.ones(2)}, "callback": _NotATensor()}, tmp_path / "x.ckpt")
    with pytest.raises(UserError, match="weights_only"):
        load_state_dict(tmp_path / "x.ckpt")
