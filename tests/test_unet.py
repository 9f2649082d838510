"""The diffusion UNet: paper configs (eval_shape), head layouts, closed forms, toy runs."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import perturb
from jax.sharding import AxisType

from ldm_jax.models.unet import (
    AttentionBlock,
    UNetModel,
    UNetResBlock,
    attention_heads,
    timestep_embedding,
)
from ldm_jax.models.unet_configs import PAPER_UNETS, from_config, unet_kwargs

# Parameter counts. SD v1/v2 are the reference PyTorch models' counts; the LDM ones round
# to the sizes the paper reports (274M, 294M, 395M, 400M; txt2img 1.45B includes BERT).
PAPER_COUNTS = {
    "celebahq-ldm-vq-4": 274_056_163,
    "ffhq-ldm-vq-4": 274_056_163,
    "lsun_bedrooms-ldm-vq-4": 274_056_163,
    "lsun_churches-ldm-kl-8": 294_966_916,
    "cin256-v2": 400_920_579,
    "cin-ldm-vq-f8": 394_984_196,
    "bsr_sr": 113_622_563,  # the reference UNetModel built in torch gives the same
    "inpainting_big": 387_245_827,
    "semantic_synthesis": 215_229_315,  # both also the reference UNetModel's (sdkit)
    "layout2img": 246_277_379,
    "txt2img-1p4B": 872_300_484,
    "sd-v1": 859_520_964,
    "sd-v2": 865_910_724,
}

TINY = dict(
    in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
    attention_resolutions=(2,), num_heads=2, use_spatial_transformer=True, context_dim=16,
)  # fmt: skip


def _inputs(m, b=2, size=8, ctx_len=3, seed=0):
    ks = jax.random.split(jax.random.key(seed), 2)
    x = jax.random.normal(ks[0], (b, size, size, m.in_channels))
    ctx = None if m.context_dim is None else jax.random.normal(ks[1], (b, ctx_len, m.context_dim))
    return x, jnp.array([3, 700][:b]), ctx


@pytest.fixture(scope="module")
def paper_shapes():
    """{name: (model, param shapes, output shape)} from one abstract trace per config."""
    out, seen = {}, {}
    for name, cfg in PAPER_UNETS.items():
        key = repr(sorted(cfg.items()))
        if key not in seen:  # the three LDM-VQ-4 unconditional UNets are one config
            m = from_config(cfg)
            s = cfg["image_size"]
            x = jax.ShapeDtypeStruct((1, s, s, m.in_channels), jnp.float32)
            t = jax.ShapeDtypeStruct((1,), jnp.int32)
            ctx = None
            if m.context_dim is not None:
                ctx = jax.ShapeDtypeStruct((1, 77, m.context_dim), jnp.float32)
            y, variables = jax.eval_shape(m.init_with_output, jax.random.key(0), x, t, ctx)
            seen[key] = (m, nn.unbox(variables["params"]), y)
        out[name] = seen[key]
    return out


def test_paper_unets_shapes_and_counts(paper_shapes):
    counts = {}
    for name, (m, params, y) in paper_shapes.items():
        s = PAPER_UNETS[name]["image_size"]
        assert y.shape == (1, s, s, m.out_channels) and y.dtype == jnp.float32, name
        counts[name] = sum(math.prod(a.shape) for a in jax.tree.leaves(params))
    print("UNet parameter counts:", counts)
    assert counts == PAPER_COUNTS


def test_state_dict_names(paper_shapes):
    _, p, _ = paper_shapes["sd-v1"]
    assert p["time_embed_0"]["kernel"].shape == (320, 1280)
    assert p["time_embed_2"]["kernel"].shape == (1280, 1280)
    assert p["input_blocks_0_0"]["kernel"].shape == (3, 3, 4, 320)
    assert p["input_blocks_3_0"]["op"]["kernel"].shape == (3, 3, 320, 320)
    rb = p["input_blocks_4_0"]
    assert set(rb) == {
        "in_layers_0", "in_layers_2", "emb_layers_1", "out_layers_0", "out_layers_3",
        "skip_connection",
    }  # fmt: skip
    st = p["input_blocks_1_1"]
    assert st["proj_in"]["kernel"].shape == (1, 1, 320, 320)
    blk = st["transformer_blocks_0"]
    assert blk["attn2"]["to_k"]["kernel"].shape == (768, 320)
    assert blk["ff"]["net_0_proj"]["kernel"].shape == (320, 2560)
    assert p["middle_block_1"]["proj_out"]["kernel"].shape == (1, 1, 1280, 1280)
    assert p["output_blocks_2_1"]["conv"]["kernel"].shape == (3, 3, 1280, 1280)
    assert p["output_blocks_5_2"]["conv"]["kernel"].shape == (3, 3, 1280, 1280)
    assert p["out_0"]["scale"].shape == (320,) and p["out_2"]["kernel"].shape == (3, 3, 320, 4)
    # Submodules: time_embed 2, input 18 (stem, 3x(2 res+2 attn+down), 2 res), middle 3,
    # output 24 (3 res+up, 2x(3 res+3 attn+up), 3 res+3 attn), out 2.
    assert len(p) == 2 + 18 + 3 + 24 + 2
    # SD v2: linear proj_in/out; LDM-VQ-4: the legacy AttentionBlock's conv1d layout.
    assert paper_shapes["sd-v2"][1]["input_blocks_1_1"]["proj_in"]["kernel"].shape == (320, 320)
    ab = paper_shapes["celebahq-ldm-vq-4"][1]["input_blocks_4_1"]
    assert ab["qkv"]["kernel"].shape == (1, 448, 1344) and set(ab) == {"norm", "qkv", "proj_out"}
    lc = paper_shapes["lsun_churches-ldm-kl-8"][1]
    assert lc["input_blocks_3_0"]["emb_layers_1"]["kernel"].shape == (768, 384)  # scale+shift
    assert "op" not in lc["input_blocks_3_0"]  # resblock_updown: a ResBlock downsamples


def _expected_layout(levels, mid, n_levels, nrb=2):
    """PAPER_FACTS 2(e) rows -> {block name: (heads, dim_head)}; levels {level: (h, d)}."""
    out = {"middle_block_1": mid}
    for lvl, hd in levels.items():
        for j in range(nrb):
            out[f"input_blocks_{lvl * (nrb + 1) + j + 1}_1"] = hd
        for j in range(nrb + 1):
            out[f"output_blocks_{(n_levels - 1 - lvl) * (nrb + 1) + j}_1"] = hd
    return out


@pytest.mark.parametrize(
    "name, levels, mid",
    [
        ("celebahq-ldm-vq-4", {1: (14, 32), 2: (21, 32), 3: (28, 32)}, (28, 32)),
        ("lsun_churches-ldm-kl-8", {0: (8, 24), 1: (8, 48), 2: (8, 48), 3: (8, 96)}, (8, 96)),
        ("cin256-v2", {1: (1, 384), 2: (1, 576), 3: (1, 960)}, (1, 960)),
        ("cin-ldm-vq-f8", {0: (8, 32), 1: (16, 32), 2: (32, 32)}, (32, 32)),
        ("txt2img-1p4B", {0: (8, 40), 1: (8, 80), 2: (8, 160)}, (8, 160)),
        ("sd-v1", {0: (8, 40), 1: (8, 80), 2: (8, 160)}, (8, 160)),
        ("sd-v2", {0: (5, 64), 1: (10, 64), 2: (20, 64)}, (20, 64)),
    ],
)
def test_head_layout_matches_paper_facts(name, levels, mid):
    m = from_config(PAPER_UNETS[name])
    want = _expected_layout(levels, mid, len(m.channel_mult))
    assert m.attention_layout() == want


def test_attention_heads_rule():
    # legacy SpatialTransformer: dim_head = ch // heads even when num_head_channels is set.
    assert attention_heads(100, -1, 32, legacy=True, spatial=True) == (3, 33)
    assert attention_heads(100, -1, 32, legacy=False, spatial=True) == (3, 32)
    # legacy AttentionBlock with num_head_channels -1 falls back to num_heads.
    assert attention_heads(192, 8, -1, legacy=True, spatial=False) == (8, 24)
    assert attention_heads(192, 8, -1, legacy=False, spatial=False) == (8, 24)
    with pytest.raises(ValueError, match="num_heads or num_head_channels"):
        attention_heads(64, -1, -1)
    with pytest.raises(ValueError, match="heads of 48"):
        attention_heads(100, -1, 48, spatial=False)


def test_timestep_embedding_closed_form():
    t = np.array([0.0, 1.0, 10.5, 999.0])
    for dim in (8, 7):
        half = dim // 2
        freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
        args = t[:, None] * freqs[None]
        ref = np.concatenate([np.cos(args), np.sin(args)] + ([np.zeros((4, 1))] * (dim % 2)), 1)
        out = timestep_embedding(jnp.asarray(t), dim)
        assert out.shape == (4, dim)
        np.testing.assert_allclose(out, ref, atol=2e-5)
    ints = timestep_embedding(jnp.array([1, 999]), 8)
    np.testing.assert_allclose(ints, timestep_embedding(jnp.array([1.0, 999.0]), 8))


def _with(params, path, value):
    p = jax.tree.map(lambda a: a, params)
    node = p
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = np.asarray(value, np.float32)
    return p


@pytest.mark.parametrize("scale_shift", [True, False])
def test_resblock_embedding_paths_closed_form(scale_shift):
    """emb enters as norm(h)*(1+s)+b (scale-shift) or h+e before the norm (additive)."""
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    emb = jax.random.normal(jax.random.key(1), (2, 12))
    m = UNetResBlock(16, use_scale_shift_norm=scale_shift, norm_groups=4)
    p = perturb(nn.unbox(jax.jit(m.init)(jax.random.key(2), x, emb)["params"]), scale=0.3, seed=1)
    n_emb = 32 if scale_shift else 16
    assert p["emb_layers_1"]["kernel"].shape == (12, n_emb)
    # A constant emb projection (zero kernel) is the same as folding it into other params.
    c = np.random.default_rng(3).standard_normal(n_emb)
    pa = _with(p, ("emb_layers_1", "kernel"), np.zeros((12, n_emb)))
    pa = _with(pa, ("emb_layers_1", "bias"), c)
    pb = _with(pa, ("emb_layers_1", "bias"), np.zeros(n_emb))
    if scale_shift:
        s, b = c[:16], c[16:]
        gamma, beta = p["out_layers_0"]["scale"], p["out_layers_0"]["bias"]
        pb = _with(pb, ("out_layers_0", "scale"), gamma * (1 + s))
        pb = _with(pb, ("out_layers_0", "bias"), beta * (1 + s) + b)
    else:
        pb = _with(pb, ("in_layers_2", "bias"), p["in_layers_2"]["bias"] + c)
    apply = jax.jit(m.apply)
    np.testing.assert_allclose(
        apply({"params": pa}, x, emb), apply({"params": pb}, x, emb), atol=1e-5, rtol=1e-5
    )


def test_resblock_updown_is_resampled_skip_at_init():
    x = jax.random.normal(jax.random.key(0), (1, 4, 6, 8))
    emb = jnp.ones((1, 12))
    for kw, ref in (
        (dict(down=True), x.reshape(1, 2, 2, 3, 2, 8).mean((2, 4))),
        (dict(up=True), jnp.repeat(jnp.repeat(x, 2, 1), 2, 2)),
    ):
        m = UNetResBlock(8, norm_groups=4, **kw)
        y, _ = jax.jit(m.init_with_output)(jax.random.key(1), x, emb)
        np.testing.assert_allclose(y, ref, atol=1e-6)  # zero out_layers_3


def test_attention_block_legacy_qkv_order():
    """Against QKVAttentionLegacy in numpy (channels-first, per-head [q|k|v] blocks)."""
    b, hh, ww, c, heads = 2, 3, 2, 8, 2
    x = jax.random.normal(jax.random.key(0), (b, hh, ww, c))
    m = AttentionBlock(heads, norm_groups=4)
    p = perturb(nn.unbox(jax.jit(m.init)(jax.random.key(1), x)["params"]), scale=0.3, seed=1)
    assert p["qkv"]["kernel"].shape == (1, c, 3 * c)
    xs = np.asarray(x, np.float64).reshape(b, hh * ww, c)  # [B, T, C]
    g = xs.reshape(b, hh * ww, 4, c // 4)
    g = (g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-5)
    hn = g.reshape(b, hh * ww, c) * p["norm"]["scale"] + p["norm"]["bias"]
    qkv = (hn @ p["qkv"]["kernel"][0] + p["qkv"]["bias"]).transpose(0, 2, 1)  # [B, 3C, T]
    ch = c // heads
    q, k, v = np.split(qkv.reshape(b * heads, 3 * ch, hh * ww), 3, axis=1)  # [B*h, ch, T]
    w = np.einsum("bct,bcs->bts", q, k) / math.sqrt(ch)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    a = np.einsum("bts,bcs->bct", w, v).reshape(b, c, hh * ww).transpose(0, 2, 1)  # [B, T, C]
    ref = xs + a @ p["proj_out"]["kernel"][0] + p["proj_out"]["bias"]
    np.testing.assert_allclose(jax.jit(m.apply)({"params": p}, x), ref.reshape(x.shape), atol=1e-5)


def _random_params(m, *args, **kwargs):
    """Random params of the right shapes without running (or compiling) init."""
    shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), *args, **kwargs))["params"]
    return perturb(
        jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nn.unbox(shapes)), scale=0.05, seed=1
    )


@pytest.fixture(scope="module")
def tiny():
    m = UNetModel(**TINY)
    x, t, ctx = _inputs(m, size=16)
    y0, variables = jax.jit(m.init_with_output)(jax.random.key(0), x, t, ctx)
    return m, nn.unbox(variables["params"]), y0


def test_zero_output_at_init(tiny):
    _, params, y0 = tiny
    assert y0.shape == (2, 16, 16, 4) and not np.any(np.asarray(y0))
    assert not np.any(np.asarray(params["out_2"]["kernel"]))


def test_tiny_jit_forward_larger_latents_and_grad(tiny):
    m, params, _ = tiny
    p = perturb(params, scale=0.05, seed=1)
    # Convolutional sampling: params initialised at 16x16 run on 24x24 latents.
    x24, t, ctx = _inputs(m, size=24)
    y = jax.jit(lambda p, x, t, c: m.apply({"params": p}, x, t, c))(p, x24, t, ctx)
    assert y.shape == (2, 24, 24, 4) and np.all(np.isfinite(y)) and np.any(np.asarray(y))
    x, t, ctx = _inputs(m, size=16)
    loss = lambda p, c: jnp.mean((m.apply({"params": p}, x, t.astype(jnp.float32), c) - x) ** 2)
    gp, gc = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, ctx)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(gp))
    assert np.any(np.asarray(gp["out_2"]["kernel"])) and np.any(np.asarray(gc))
    attn2 = gp["input_blocks_3_1"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"]
    assert np.any(np.asarray(attn2))  # the context reaches the loss through cross-attention


def test_unconditional_legacy_attention_updown_and_classes():
    cfg = ml_collections.ConfigDict(
        dict(
            in_channels=3, out_channels=3, model_channels=32, channel_mult=[1, 2],
            num_res_blocks=1, attention_resolutions=[1, 2], num_head_channels=16,
            use_scale_shift_norm=True, resblock_updown=True, num_classes=5, image_size=8,
            dtype="float32",
        )
    )  # fmt: skip
    m = from_config(cfg)
    assert m.channel_mult == (1, 2) and m.attention_layout()["middle_block_1"] == (4, 16)
    x, t, _ = _inputs(m, size=8)
    y = jnp.array([0, 4])
    p = _random_params(m, x, t, y=y)
    assert p["label_emb"]["embedding"].shape == (5, 128)
    assert "in_layers_0" in p["input_blocks_2_0"] and "op" not in p["input_blocks_2_0"]
    f = jax.jit(lambda y: m.apply({"params": p}, x, t, y=y))
    a, b = f(y), f(jnp.array([1, 4]))
    assert a.shape == (2, 8, 8, 3)
    assert np.any(np.asarray(a[0] != b[0])) and np.allclose(a[1], b[1], atol=1e-6)


def test_conditioning_errors():
    key = jax.random.key(0)
    m = UNetModel(**TINY)
    x, t, ctx = _inputs(m, size=8)
    shape_init = lambda m, *a, **k: jax.eval_shape(lambda: m.init(key, *a, **k))
    with pytest.raises(ValueError, match="needs context"):
        shape_init(m, x, t)
    with pytest.raises(ValueError, match=r"context must be \[B, L, 16\]"):
        shape_init(m, x, t, ctx[..., :8])
    with pytest.raises(ValueError, match="divisible by 2"):
        shape_init(m, x[:, :7], t, ctx)
    with pytest.raises(ValueError, match="NHWC"):
        shape_init(m, jnp.zeros((2, 4, 8, 8)), t, ctx)
    uncond = UNetModel(**dict(TINY, use_spatial_transformer=False, context_dim=None))
    with pytest.raises(ValueError, match="no cross-attention"):
        shape_init(uncond, x, t, ctx)
    with pytest.raises(ValueError, match="num_classes is None"):
        shape_init(uncond, x, t, y=jnp.array([0, 1]))
    with pytest.raises(ValueError, match="y must be int class ids"):
        shape_init(UNetModel(**dict(TINY, num_classes=3)), x, t, ctx)
    with pytest.raises(ValueError, match="needs context_dim"):
        shape_init(UNetModel(**dict(TINY, context_dim=None)), x, t)
    with pytest.raises(ValueError, match="unknown UNet config keys"):
        unet_kwargs(dict(TINY, attn_resolutions=(2,)))


def test_activation_constraints_under_mesh(tiny):
    from ldm_jax.parallel.mesh import LOGICAL_AXIS_RULES

    m, params, _ = tiny
    mesh = jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    abstract = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    p = jax.tree.map(lambda a: abstract(*a.shape), params)
    f = jax.jit(lambda p, x, t, c: m.apply({"params": p}, x, t, c))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        text = f.lower(p, abstract(8, 8, 8, 4), abstract(8), abstract(8, 3, 16)).as_text()
    # One constraint per block boundary: stem, 3 input, middle, 3 output blocks.
    assert text.count("sharding_constraint") >= 8


@pytest.mark.parametrize("remat", ["attention", "full"])
def test_remat_keeps_params_and_gradients(tiny, remat):
    """Rematerialised blocks recompute activations in the backward pass: same parameter
    tree, same loss and gradients."""
    import dataclasses

    m, params, _ = tiny
    p = perturb(params, scale=0.05, seed=1)
    x, t, ctx = _inputs(m, size=16)
    r = dataclasses.replace(m, remat=remat)
    assert jax.tree.structure(_random_params(r, x, t, ctx)) == jax.tree.structure(p)

    def grads(model):
        loss = lambda p: jnp.mean((model.apply({"params": p}, x, t, ctx, train=True) - x) ** 2)
        return jax.jit(jax.value_and_grad(loss))(p)

    (l0, g0), (l1, g1) = grads(m), grads(r)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g0)
    with pytest.raises(ValueError, match="unknown remat"):
        dataclasses.replace(m, remat="some").apply({"params": p}, x, t, ctx)


def test_bf16_compute_keeps_fp32_master_weights(tiny):
    """dtype=bfloat16: parameters stay float32 (the optimizer's master copy), activations
    run in bf16, and the output is within bf16 rounding of the fp32 model's."""
    import dataclasses

    m, params, _ = tiny
    p = perturb(params, scale=0.05, seed=1)
    x, t, ctx = _inputs(m, size=16)
    b = dataclasses.replace(m, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda: b.init(jax.random.key(0), x, t, ctx))["params"]
    assert {s.dtype for s in jax.tree.leaves(nn.unbox(shapes))} == {jnp.dtype(jnp.float32)}
    y32 = jax.jit(lambda p: m.apply({"params": p}, x, t, ctx))(p)
    y16 = jax.jit(lambda p: b.apply({"params": p}, x, t, ctx))(p)
    assert y16.dtype == jnp.float32  # the head runs in the input's dtype, as the reference
    rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
    assert 0 < rel < 0.05, rel
