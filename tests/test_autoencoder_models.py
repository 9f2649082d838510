"""First-stage models: shapes, closed forms, numpy references and logical-axis annotations."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldm_jax.models import autoencoder as ae
from ldm_jax.models import layers
from ldm_jax.models.discriminator import NLayerDiscriminator

TOY = dict(
    ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
    in_channels=3, out_ch=3, resolution=16, z_channels=4, embed_dim=3, norm_groups=4,
)  # fmt: skip


def toy_cfg(**over):
    cfg = dict(TOY, type="kl", double_z=True, attn_type="vanilla", n_embed=16, beta=0.25)
    cfg.update(over)
    return ml_collections.ConfigDict(cfg)


def key(seed):
    # rbg keys: XLA:CPU compiles a model init with threefry keys 3-5x slower (10 s vs 3 s).
    return jax.random.key(seed, impl="rbg")


def _images(shape=(2, 16, 16, 3), seed=0):
    return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


# ---------------------------------------------------------------- numpy references
def np_conv(x, kernel, bias, stride=1, pad=((1, 1), (1, 1))):
    """Direct NHWC conv: x [B,H,W,C], kernel [kh,kw,C,O] (zero padding given per side)."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), pad[0], pad[1], (0, 0)))
    kh, kw = kernel.shape[:2]
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, kernel.shape[3]))
    for di in range(kh):
        for dj in range(kw):
            patch = x[:, di : di + stride * ho : stride, dj : dj + stride * wo : stride, :]
            out += patch @ np.asarray(kernel[di, dj], np.float64)
    return out + np.asarray(bias)


def np_group_norm(x, groups, scale, bias, eps=1e-6):
    b, h, w, c = x.shape
    g = np.asarray(x, np.float64).reshape(b, h, w, groups, c // groups)
    mu = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mu) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


def np_swish(x):
    return x / (1.0 + np.exp(-x))


# ---------------------------------------------------------------- layers
def test_downsample_pads_right_bottom_then_stride2():
    x = _images((2, 7, 8, 4), seed=1)
    mod = layers.Downsample(4)
    p = nn.unbox(mod.init(key(0), x))["params"]["conv"]
    got = mod.apply({"params": {"conv": p}}, x)
    want = np_conv(x, p["kernel"], p["bias"], stride=2, pad=((0, 1), (0, 1)))
    assert got.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_upsample_is_nearest_then_conv():
    x = _images((1, 3, 4, 2), seed=2)
    mod = layers.Upsample(2)
    p = nn.unbox(mod.init(key(0), x))["params"]["conv"]
    got = mod.apply({"params": {"conv": p}}, x)
    up = np.repeat(np.repeat(np.asarray(x), 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(got, np_conv(up, p["kernel"], p["bias"]), atol=1e-5)


def test_resnet_block_matches_numpy_with_temb_and_shortcut():
    x = _images((2, 4, 4, 4), seed=3)
    temb = jax.random.normal(jax.random.key(4), (2, 5))
    mod = layers.ResnetBlock(8, dropout=0.5, norm_groups=2)
    v = nn.unbox(jax.jit(mod.init)(key(0), x, temb))
    # Non-trivial norm params so that scale/bias mix-ups would show.
    rng = np.random.default_rng(9)
    v = jax.tree_util.tree_map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), v)
    p = v["params"]
    got, dropped = jax.jit(
        lambda v, x, t: (
            mod.apply(v, x, t),
            mod.apply(v, x, t, train=True, rngs={"dropout": jax.random.key(1)}),
        )
    )(v, x, temb)
    h = np_swish(np_group_norm(x, 2, p["norm1"]["scale"], p["norm1"]["bias"]))
    h = np_conv(h, p["conv1"]["kernel"], p["conv1"]["bias"])
    t = np_swish(np.asarray(temb, np.float64)) @ p["temb_proj"]["kernel"] + p["temb_proj"]["bias"]
    h = h + t[:, None, None, :]
    h = np_swish(np_group_norm(h, 2, p["norm2"]["scale"], p["norm2"]["bias"]))
    h = np_conv(h, p["conv2"]["kernel"], p["conv2"]["bias"])
    skip = np_conv(x, p["nin_shortcut"]["kernel"], p["nin_shortcut"]["bias"], pad=((0, 0),) * 2)
    np.testing.assert_allclose(got, skip + h, atol=1e-4)
    assert not np.allclose(dropped, got)  # dropout is active only with train=True
    # Same channel count and no temb: identity skip, no shortcut or temb params.
    v2 = jax.eval_shape(mod.clone(out_channels=4).init, key(0), x)
    assert "nin_shortcut" not in v2["params"] and "temb_proj" not in v2["params"]


def test_attn_block_matches_naive_numpy_attention():
    x = _images((2, 3, 4, 8), seed=5)
    mod = layers.AttnBlock(norm_groups=4)
    p = nn.unbox(mod.init(key(0), x))["params"]
    got = mod.apply({"params": p}, x)
    h = np_group_norm(x, 4, p["norm"]["scale"], p["norm"]["bias"]).reshape(2, 12, 8)

    def lin(name, a):
        return a @ np.asarray(p[name]["kernel"][0, 0], np.float64) + np.asarray(p[name]["bias"])

    q, k, v = lin("q", h), lin("k", h), lin("v", h)
    want = np.zeros_like(q)
    for b in range(2):
        logits = q[b] @ k[b].T / math.sqrt(8)
        w = np.exp(logits - logits.max(axis=1, keepdims=True))
        want[b] = (w / w.sum(axis=1, keepdims=True)) @ v[b]
    want = np.asarray(x).reshape(2, 12, 8) + lin("proj_out", want)
    np.testing.assert_allclose(got, want.reshape(x.shape), atol=1e-5)


# ---------------------------------------------------------------- autoencoders
@pytest.fixture(scope="module")
def kl_model_and_vars():
    model = ae.from_config(toy_cfg(type="kl"))
    x = _images()
    rngs = {"params": key(0), "sample": key(1)}
    variables = nn.unbox(jax.jit(model.init)(rngs, x))
    return model, variables, x


@pytest.fixture(scope="module")
def vq_model_and_vars():
    model = ae.from_config(toy_cfg(type="vq", ch_mult=(1, 1, 2), attn_type="none"))
    x = _images()
    return model, nn.unbox(jax.jit(model.init)(key(0), x)), x


def test_kl_forward_encode_decode_shapes(kl_model_and_vars):
    model, v, x = kl_model_and_vars
    assert isinstance(model, ae.AutoencoderKL)

    @jax.jit
    def run(v, x, r):
        post = model.apply(v, x, method=model.encode)
        conv_params = v["params"]
        for name in ae.LAST_LAYER_PATH:
            conv_params = conv_params[name]
        out = model.apply(v, x, rngs={"sample": r})
        return dict(
            out=out,
            out_mode=model.apply(v, x, sample_posterior=False),
            post=post,
            dec_mode=model.apply(v, post.mode(), method=model.decode),
            conv_out=ae.apply_output_conv(conv_params, out.hidden),
        )

    res = run(v, x, jax.random.key(2))
    out, post = res["out"], res["post"]
    assert out.recon.shape == x.shape and out.hidden.shape == (2, 16, 16, 8)
    assert out.reg_loss.shape == () and set(out.metrics) == {"kl", "posterior_std"}
    f = ae.downsampling_factor(toy_cfg())
    assert f == 2 and post.mean.shape == (2, 16 // f, 16 // f, 3) == post.logvar.shape
    np.testing.assert_allclose(out.reg_loss, jnp.mean(post.kl()), rtol=1e-5)
    np.testing.assert_allclose(out.metrics["posterior_std"], jnp.mean(post.std), rtol=1e-5)
    # Without sampling the model decodes the posterior mode; sampling moves the recon.
    np.testing.assert_allclose(res["out_mode"].recon, res["dec_mode"], atol=1e-6)
    assert not np.allclose(out.recon, res["dec_mode"])
    # The decoder's final conv as a pure function reproduces the recon from hidden.
    np.testing.assert_allclose(res["conv_out"], out.recon, atol=1e-6)


def test_vq_forward_encode_decode_shapes(vq_model_and_vars):
    model, v, x = vq_model_and_vars
    assert isinstance(model, ae.VQModel)

    @jax.jit
    def run(v, x):
        h = model.apply(v, x, method=model.encode)
        return dict(
            out=model.apply(v, x),
            h=h,
            quant=model.apply(v, h, method=model.quantize),
            dec=model.apply(v, h, method=model.decode),
            dec_raw=model.apply(v, h, quantize=False, method=model.decode),
        )

    res = run(v, x)
    out, h = res["out"], res["h"]
    assert out.recon.shape == x.shape and out.hidden.shape == (2, 16, 16, 8)
    assert set(out.metrics) == {"perplexity", "codebook_usage"} and out.reg_loss.shape == ()
    f = ae.downsampling_factor(toy_cfg(ch_mult=(1, 1, 2)))
    assert f == 4 and h.shape == (2, 4, 4, 3)
    z_q, loss, info = res["quant"]
    assert z_q.shape == h.shape and info["indices"].shape == (2, 4, 4)
    np.testing.assert_allclose(loss, out.reg_loss, rtol=1e-6)
    np.testing.assert_allclose(res["dec"], out.recon, atol=1e-5)
    assert res["dec_raw"].shape == x.shape
    assert "mid_attn_1" not in v["params"]["encoder"]  # attn_type "none"


# ---------------------------------------------------------------- posterior
def test_diagonal_gaussian_kl_closed_form_and_clamp():
    mean = np.array([0.5, -1.0, 2.0, 0.0], np.float32).reshape(1, 1, 2, 2)
    logvar = np.array([0.0, 1.0, -2.0, 0.3], np.float32).reshape(1, 1, 2, 2)
    g = ae.DiagonalGaussian.from_mean_logvar(jnp.asarray(mean), jnp.asarray(logvar))
    want = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar)
    np.testing.assert_allclose(g.kl(), [want], rtol=1e-6)
    zero = ae.DiagonalGaussian(jnp.zeros((3, 2, 2, 8)))
    np.testing.assert_array_equal(zero.kl(), np.zeros(3))
    np.testing.assert_allclose(zero.nll(jnp.zeros((3, 2, 2, 4))), 16 * 0.5 * math.log(2 * math.pi))
    c = ae.DiagonalGaussian(jnp.array([0.0, 0.0, -100.0, 100.0]).reshape(1, 1, 1, 4))
    np.testing.assert_array_equal(c.logvar.ravel(), [-30.0, 20.0])
    np.testing.assert_allclose(c.std.ravel(), np.exp([-15.0, 10.0]), rtol=1e-6)
    # It is a pytree, so it can leave jit.
    out = jax.jit(lambda m: ae.DiagonalGaussian(m))(jnp.ones((1, 1, 1, 4)))
    assert isinstance(out, ae.DiagonalGaussian)


# ---------------------------------------------------------------- quantiser
def _vq(codebook):
    q = ae.VectorQuantizer(codebook.shape[0], codebook.shape[1], beta=0.25)
    return q, {"params": {"embedding": jnp.asarray(codebook)}}


def test_vq_nearest_code_matches_bruteforce():
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=(32, 4)).astype(np.float32)
    h = rng.normal(size=(2, 5, 3, 4)).astype(np.float32)
    q, v = _vq(codebook)
    z_q, _, info = q.apply(v, jnp.asarray(h))
    d = ((h.reshape(-1, 1, 4) - codebook[None]) ** 2).sum(-1)
    want = d.argmin(1).reshape(2, 5, 3)
    np.testing.assert_array_equal(info["indices"], want)
    np.testing.assert_allclose(z_q, codebook[want], atol=1e-6)


def test_vq_straight_through_gradient():
    rng = np.random.default_rng(1)
    codebook = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(1, 2, 2, 3)), jnp.float32)
    q, v = _vq(codebook)
    f = lambda z: jnp.sum(jnp.sin(z) * jnp.arange(1.0, 4.0))
    g_h = jax.grad(lambda h: f(q.apply(v, h)[0]))(h)
    z_q = q.apply(v, h)[0]
    np.testing.assert_allclose(g_h, jax.grad(f)(z_q), atol=1e-6)


def test_vq_codebook_sgd_step_closed_form():
    beta, lr = 0.25, 0.5
    codebook = np.array([[0.0, 0.0], [10.0, 10.0], [-10.0, 5.0]], np.float32)
    h = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0], [9.0, 12.0]], np.float32)
    q, v = _vq(codebook)
    grad = jax.grad(lambda p: q.apply({"params": p}, jnp.asarray(h).reshape(1, 2, 2, 2))[1])(
        v["params"]
    )["embedding"]
    new = codebook - lr * np.asarray(grad)
    n, d = h.shape
    for k, members in {0: h[:3], 1: h[3:]}.items():
        # d/de_k of beta * mean((e_k - h_i)^2) = 2 beta n_k / (N D) (e_k - mean_i h_i)
        step = lr * 2 * beta * len(members) / (n * d)
        want = codebook[k] + step * (members.mean(0) - codebook[k])
        np.testing.assert_allclose(new[k], want, rtol=1e-6)
    np.testing.assert_array_equal(new[2], codebook[2])  # unused code does not move


def test_vq_perplexity_and_usage_hand_example():
    codebook = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]], np.float32)
    h = np.array([[0.1, 0.0], [0.0, -0.2], [4.9, 0.1], [0.2, 5.1]], np.float32)
    q, v = _vq(codebook)
    _, loss, info = q.apply(v, jnp.asarray(h).reshape(1, 2, 2, 2))
    np.testing.assert_array_equal(info["indices"].ravel(), [0, 0, 1, 2])
    p = np.array([0.5, 0.25, 0.25])
    np.testing.assert_allclose(info["perplexity"], np.exp(-(p * np.log(p)).sum()), rtol=1e-5)
    np.testing.assert_allclose(info["codebook_usage"], 0.75)
    mse = np.mean((h - codebook[[0, 0, 1, 2]]) ** 2)
    np.testing.assert_allclose(loss, 1.25 * mse, rtol=1e-5)


# ---------------------------------------------------------------- annotations, config
def _assert_all_partitioned(variables):
    leaves = jax.tree_util.tree_leaves(
        variables["params"], is_leaf=lambda a: isinstance(a, nn.Partitioned)
    )
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), type(leaf)
        assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_every_param_has_logical_axes(kind):
    model = ae.from_config(toy_cfg(type=kind))
    abstract = jax.eval_shape(lambda: model.init({"params": key(0), "sample": key(1)}, _images()))
    _assert_all_partitioned(abstract)
    specs = nn.get_partition_spec(abstract)["params"]
    assert tuple(specs["encoder"]["conv_in"]["kernel"]) == (None, None, "conv_in", "conv_out")
    if kind == "vq":
        assert tuple(specs["quantize"]["embedding"]) == ("codebook", "latent")
    disc = jax.eval_shape(lambda: NLayerDiscriminator(ndf=8).init(key(0), _images(), train=False))
    _assert_all_partitioned(disc)


def test_paper_size_kl_f8_param_count_and_bf16():
    cfg = toy_cfg(
        ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(), resolution=256,
        embed_dim=4, norm_groups=32, dtype="bfloat16",
    )  # fmt: skip
    model = ae.from_config(cfg)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init({"params": key(0), "sample": key(1)}, x), x)
    n = sum(a.size for a in jax.tree_util.tree_leaves(nn.unbox(variables)))
    assert n == 83_653_863  # the public kl-f8 (Stable Diffusion VAE) parameter count
    out = jax.eval_shape(
        lambda v, x: model.apply(v, x, rngs={"sample": jax.random.key(0)}), nn.unbox(variables), x
    )
    assert out.recon.dtype == jnp.bfloat16 and out.reg_loss.dtype == jnp.float32
    assert jax.tree_util.tree_leaves(nn.unbox(variables))[0].dtype == jnp.float32


def test_from_config_errors():
    with pytest.raises(ValueError, match="kl.*vq"):
        ae.from_config(toy_cfg(type="gan"))
    with pytest.raises(ValueError, match="double_z"):
        jax.eval_shape(lambda: ae.from_config(toy_cfg(double_z=False)).init(
            jax.random.key(0), _images()))  # fmt: skip


# ---------------------------------------------------------------- discriminator
@pytest.mark.parametrize("size,n_layers,out", [(32, 3, 2), (64, 3, 6), (32, 2, 6), (64, 2, 14)])
def test_discriminator_output_shape(size, n_layers, out):
    d = NLayerDiscriminator(ndf=8, n_layers=n_layers)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    v = jax.eval_shape(lambda x: d.init(key(0), x, train=False), x)
    y = jax.eval_shape(lambda v, x: d.apply(v, x, train=False), v, x)
    assert y.shape == (2, out, out, 1)
    # Layer names are the torch Sequential indices.
    convs = {f"main_{i}" for i in (0, 2, 3 * n_layers - 1, 3 * n_layers + 2)}
    assert convs <= set(v["params"]) and "bias" not in v["params"]["main_2"]


def test_discriminator_batch_stats_update_in_train_mode():
    d = NLayerDiscriminator(ndf=8, n_layers=2)
    x = _images((2, 32, 32, 3)) * 3.0 + 1.0
    v = nn.unbox(d.init(key(0), x, train=False))
    logits, upd = d.apply(v, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 6, 6, 1)
    before, after = v["batch_stats"]["main_3"], upd["batch_stats"]["main_3"]
    assert not np.allclose(before["mean"], after["mean"])
    assert not np.allclose(before["var"], after["var"])
    # Eval mode reads running stats and mutates nothing.
    assert d.apply(v, x, train=False).shape == (2, 6, 6, 1)


@pytest.mark.parametrize("remat", ["attention", "full"])
def test_remat_keeps_params_and_gradients(kl_model_and_vars, remat):
    model, variables, x = kl_model_and_vars
    other = ae.from_config(toy_cfg(remat=remat))
    params = variables["params"]
    shapes = jax.eval_shape(lambda: other.init({"params": key(0), "sample": key(1)}, x))
    assert jax.tree.structure(nn.unbox(shapes)["params"]) == jax.tree.structure(params)

    def grads(m):
        def loss(p):
            out = m.apply({"params": p}, x, sample_posterior=False)
            return jnp.mean((out.recon - x) ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    (l0, g0), (l1, g1) = grads(model), grads(other)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g0)
