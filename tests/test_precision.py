"""Accelerator paths checked on a CPU: the cuDNN flash path for the Stable Diffusion head
layouts, and fp32 statistics under bf16 compute.

cuDNN without a GPU: a CPU-only jaxlib has no CUDA plugin, so jax's cuDNN attention stops
at its first line (`check_cudnn_version`: "cuDNN is not detected"). With a cuDNN version
and a compute capability faked in jax/_src/cudnn/fused_attention_stablehlo.py, jax runs
all of its own checks (check_layout; check_is_flash_attention, the inference one in the
primal and the training one in the VJP's forward rule) and lowers for CUDA from here:
`jit(f).trace(*ShapeDtypeStructs).lower(lowering_platforms=("cuda",))`, whose StableHLO
holds the `__cudnn$fmha*` custom calls. (`jax.export` refuses to serialise those custom
calls, which carry no compatibility guarantee, so the Lowered text is read instead.) What
stays unchecked is XLA:GPU's compilation of the call and cuDNN's run-time plan choice.
"""

import functools
import re
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo as fa
from jax.extend import core as jcore

from ldm_jax.models import attention as attn
from ldm_jax.models import autoencoder, layers
from ldm_jax.models import unet as unet_lib
from ldm_jax.models.unet_configs import PAPER_UNETS, unet_kwargs

S = jax.ShapeDtypeStruct
B = 2  # classifier-free guidance: a conditional and an unconditional row
CONTEXT = 77  # CLIP / OpenCLIP tokens
F32 = {jnp.dtype(jnp.float32)}
HALF = (jnp.bfloat16, jnp.float16)
FWD, BWD = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"
FWD_MASK, BWD_MASK = "__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"


# ----------------------------------------------------------------------------- fake GPU


def _cc(s: str) -> tuple[int, ...]:
    return tuple(int(p) for p in s.split("."))


class _JaxOnGpu:
    """`jax` as attention.py sees it on a CUDA host: default backend "gpu" and one device
    with the given compute capability; everything else is the real jax."""

    def __init__(self, cc: str):
        self._device = SimpleNamespace(platform="gpu", compute_capability=cc)

    def __getattr__(self, name):
        return getattr(jax, name)

    def default_backend(self):
        return "gpu"

    def devices(self, *args, **kwargs):
        return [self._device]


@pytest.fixture
def gpu(monkeypatch):
    """gpu(cc) makes attention() and jax's cuDNN checks see a GPU of compute capability cc
    with cuDNN 9.8; lowering is for CUDA explicitly (_lower), the backend stays the CPU."""

    def use(cc: str = "9.0", cudnn: int = 90800):
        monkeypatch.setattr(attn, "jax", _JaxOnGpu(cc))
        monkeypatch.setattr(fa, "cuda_versions", SimpleNamespace(cudnn_get_version=lambda: cudnn))
        monkeypatch.setattr(fa, "check_compute_capability", lambda c: _cc(cc) >= _cc(c))
        monkeypatch.setattr(fa, "is_cuda_compute_capability_equal", lambda c: _cc(cc) == _cc(c))

    return use


def _fresh(fn):
    # jit and eval_shape cache traces per function object; the fake device changes what
    # the same function traces to, so each call gets a new one.
    return lambda *args: fn(*args)


def _lower_cuda(fn, *args):
    return jax.jit(_fresh(fn)).trace(*args).lower(lowering_platforms=("cuda",))


_CALL = re.compile(r"custom_call @(__cudnn\$fmha\w+)\(.*\} : \(([^)]*)\) ->")


def _fmha(fn, *args) -> set[tuple]:
    """{(target, q shape, k shape, bias shape or None)} of the cuDNN attention custom calls
    in fn lowered for CUDA."""
    text = _lower_cuda(fn, *args).as_text()
    calls = set()
    for line in text.splitlines():
        m = _CALL.search(line)
        if m:
            shapes = [
                tuple(int(d) for d in t.split("x")[:-1])
                for t in re.findall(r"tensor<([0-9a-z]+)>", m.group(2))
            ]
            bias = shapes[3] if m.group(1).startswith("__cudnn$fmhaScaleBias") else None
            calls.add((m.group(1), shapes[0], shapes[1], bias))
    return calls


def _targets(calls) -> set[str]:
    return {c[0] for c in calls}


def _jax_cudnn(q, k, v, mask=None):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


def _loss(fn):
    return lambda *a: jnp.sum(fn(*a).astype(jnp.float32))


def _grad_remat(fn):
    # nn.remat / jax.checkpoint: traced first, differentiated afterwards (fwd rule late)
    return jax.grad(_loss(jax.checkpoint(fn)), argnums=(0, 1, 2))


def _jax_accepts(fn, *args) -> bool:
    try:
        jax.eval_shape(_fresh(fn), *args)
    except (NotImplementedError, RuntimeError, ValueError):
        return False
    return True


# ----------------------------------------------------------------------------- SD layouts


def _sd_layouts(name: str) -> set[tuple[int, int, int]]:
    """{(tokens, heads, dim_head)} of every attention in a PAPER_UNETS model at its latent
    size, walked as the UNet builds its blocks."""
    cfg = PAPER_UNETS[name]
    inputs, middle, outputs = unet_lib._plan(unet_lib.UNetModel(**unet_kwargs(cfg)))
    side, found = cfg["image_size"], set()
    for blk in inputs:
        if blk.attn:
            found.add((side * side, *blk.attn))
        side //= 2 if blk.resample == "down" else 1
    found.add((side * side, *middle.attn))
    for blk in outputs:
        if blk.attn:
            found.add((side * side, *blk.attn))
        side *= 2 if blk.resample == "up" else 1
    return found


SD1 = {(4096, 8, 40), (1024, 8, 80), (256, 8, 160), (64, 8, 160)}  # 320/640/1280 ch, 8 heads
SD2 = {(4096, 5, 64), (1024, 10, 64), (256, 20, 64), (64, 20, 64)}  # heads of 64
LAYOUTS = [("sd-v1", *t) for t in sorted(SD1)] + [("sd-v2", *t) for t in sorted(SD2)]
LAYOUT_IDS = [f"{m}-L{n}-H{h}-D{d}" for m, n, h, d in LAYOUTS]


def test_sd_head_layouts_are_the_configs():
    assert _sd_layouts("sd-v1") == SD1
    assert _sd_layouts("sd-v2") == SD2
    assert (PAPER_UNETS["sd-v1"]["context_dim"], PAPER_UNETS["sd-v2"]["context_dim"]) == (
        768,
        1024,
    )


def test_offline_cudnn_is_refused_and_falls_back():
    """As shipped on this CPU: jax's cuDNN path raises at once, attention() computes XLA's."""
    if fa.cuda_versions is not None:
        pytest.skip("a CUDA plugin is installed")
    q = jnp.ones((1, 16, 2, 8), jnp.bfloat16)
    with pytest.raises(RuntimeError, match="cuDNN is not detected"):
        _jax_cudnn(q, q, q)
    run = jax.jit(attn.attention, static_argnames="impl")
    np.testing.assert_array_equal(run(q, q, q, impl="cudnn"), run(q, q, q, impl="xla"))


@pytest.mark.parametrize("cc", ["8.0", "9.0"])  # A100, H100
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("model,tokens,heads,dim", LAYOUTS, ids=LAYOUT_IDS)
def test_sd_layouts_take_cudnn(gpu, cc, dtype, model, tokens, heads, dim):
    """impl="auto" on a GPU. Self-attention lowers to cuDNN flash attention wherever
    jax's checks accept the head (all but heads of 160 before Hopper), else to XLA.
    Cross-attention over 77 tokens: jax accepts it for inference but refuses it once
    differentiated (odd key length; see the remat test), so it is XLA's in both."""
    gpu(cc)
    q = S((B, tokens, heads, dim), dtype)
    kc = S((B, CONTEXT, heads, dim), dtype)
    head_ok = dim <= (256 if cc == "9.0" else 128)
    assert _jax_accepts(_jax_cudnn, q, q, q) == _jax_accepts(_jax_cudnn, q, kc, kc) == head_ok
    assert attn._cudnn_supported(q) == head_ok and not attn._cudnn_supported(q, kc)
    assert attn._resolve("auto", q) == ("cudnn" if head_ok else "xla")
    calls = _fmha(attn.attention, q, q, q)
    assert calls == ({(FWD, q.shape, q.shape, None)} if head_ok else set())
    assert _fmha(attn.attention, q, kc, kc) == set()


@pytest.mark.parametrize("model,tokens,heads,dim", LAYOUTS, ids=LAYOUT_IDS)
def test_sd_layouts_cudnn_training_under_remat(gpu, model, tokens, heads, dim):
    """Gradients through nn.remat-style checkpointing on Hopper: self-attention runs cuDNN
    forward and backward kernels; 77-token cross-attention lowers (to XLA) instead of
    raising jax's "Unsupported sequence length" out of the training step."""
    gpu("9.0")
    q = S((B, tokens, heads, dim), jnp.bfloat16)
    kc = S((B, CONTEXT, heads, dim), jnp.bfloat16)
    assert _targets(_fmha(_grad_remat(attn.attention), q, q, q)) == {FWD, BWD}
    with pytest.raises(NotImplementedError, match="Unsupported sequence length"):
        jax.eval_shape(_grad_remat(_jax_cudnn), q, kc, kc)
    assert _fmha(_grad_remat(attn.attention), q, kc, kc) == set()


@pytest.mark.parametrize("model,tokens,heads,dim", LAYOUTS, ids=LAYOUT_IDS)
def test_masked_cross_attention(gpu, model, tokens, heads, dim):
    """A [B, 1, 1, Lk] context mask. cuDNN takes it as a bias of the full [B, H, Lq, Lk]
    (a broadcastable one fails jax's check_layout, which would be a silent XLA fallback):
    a padded 78-token context runs cuDNN forward and backward; 77 tokens lower to XLA."""
    gpu("9.0")
    mk = lambda n: jnp.ones((B, 1, 1, n), bool)  # noqa: E731
    masked = lambda n: lambda q, k, v: attn.attention(q, k, v, mask=mk(n))  # noqa: E731
    q = S((B, tokens, heads, dim), jnp.bfloat16)
    k77, k78 = (S((B, n, heads, dim), jnp.bfloat16) for n in (77, 78))
    bias = (B, heads, tokens, 78)
    with pytest.raises(ValueError, match="Bias must have same seq length"):
        jax.eval_shape(_fresh(_jax_cudnn), q, k78, k78, S((B, 1, 1, 78), jnp.bool_))
    assert _jax_accepts(_jax_cudnn, q, k78, k78, S(bias, jnp.bool_))
    assert _fmha(masked(78), q, k78, k78) == {(FWD_MASK, q.shape, k78.shape, bias)}
    assert _targets(_fmha(_grad_remat(masked(78)), q, k78, k78)) == {FWD_MASK, BWD_MASK}
    assert _fmha(masked(77), q, k77, k77) == set()
    assert _fmha(_grad_remat(masked(77)), q, k77, k77) == set()


def _agrees_with_jax(dtype, d, lq, lk, masked):
    q, k = S((1, lq, 2, d), dtype), S((1, lk, 2, d), dtype)
    m = jnp.ones((1, 2, lq, lk), bool) if masked else None
    f = lambda q, k, v: _jax_cudnn(q, k, v, m)  # noqa: E731
    jax_ok = _jax_accepts(_grad_remat(f), q, k, k)  # runs jax's inference check first
    assert attn._cudnn_supported(q, k) == jax_ok, (dtype, d, lq, lk, masked)
    assert not jax_ok or _jax_accepts(f, q, k, k)


@pytest.mark.parametrize("cc", ["8.0", "9.0"])
def test_cudnn_supported_matches_jax_checks(gpu, cc):
    """_cudnn_supported says yes exactly where jax's cuDNN checks pass both for inference
    and for training under remat: fp32, head dims over 128 (256 from Hopper) or not
    multiples of 8, and odd lengths (masked or not) are refused, so the try/except
    fallback is never what picks XLA."""
    gpu(cc)
    cases = ((64, 64, False), (64, 77, False), (77, 64, False), (64, 78, True), (64, 77, True))
    for d in (8, 20, 36, 40, 64, 80, 100, 128, 136, 160, 256, 264, 512):
        for case in cases:
            _agrees_with_jax(jnp.bfloat16, d, *case)
    for dtype in (jnp.float16, jnp.float32):
        for d in (64, 160):
            for case in cases[:2]:
                _agrees_with_jax(dtype, d, *case)


@pytest.mark.parametrize("cc", ["7.5", "8.6", "8.9", "10.0", "12.0"])
def test_cudnn_head_limit_by_capability(gpu, cc):
    gpu(cc)
    for d in (128, 136, 256, 264):
        _agrees_with_jax(jnp.bfloat16, d, 64, 64, False)


def test_cudnn_refused_on_rocm(gpu):
    """ROCm reports compute capabilities like "gfx90a": no cuDNN, and no ValueError."""
    gpu("gfx90a")
    q = S((B, 64, 8, 40), jnp.bfloat16)
    assert not attn._cudnn_supported(q)
    assert attn._resolve("auto", q) == "xla"


@pytest.mark.parametrize("model", ["sd-v1", "sd-v2"])
def test_transformer_block_bf16_takes_cudnn(gpu, model):
    """A whole BasicTransformerBlock, bf16 compute over fp32 params, at the first level's
    latent and the model's context width: self-attention is a bf16 cuDNN call, the
    77-token cross-attention XLA's; under nn.remat its parameter gradient lowers with
    cuDNN's backward kernel (before the length check it raised)."""
    gpu("9.0")
    tokens, heads, dim = max(_sd_layouts(model))
    block = attn.BasicTransformerBlock(heads, dim, dtype=jnp.bfloat16)
    x = S((B, tokens, heads * dim), jnp.float32)
    ctx = S((B, CONTEXT, PAPER_UNETS[model]["context_dim"]), jnp.float32)
    params = jax.eval_shape(block.init, jax.random.key(0), x, ctx)
    assert {p.dtype for p in jax.tree.leaves(params)} == F32
    q = (B, tokens, heads, dim)
    assert _fmha(block.apply, params, x, ctx) == {(FWD, q, q, None)}
    text = _lower_cuda(block.apply, params, x, ctx).as_text()
    assert f"tensor<{B}x{tokens}x{heads}x{dim}xbf16>" in text
    remat = nn.remat(attn.BasicTransformerBlock)(heads, dim, dtype=jnp.bfloat16)
    loss = lambda p, x, c: jnp.sum(remat.apply(p, x, c).astype(jnp.float32))  # noqa: E731
    assert _targets(_fmha(jax.grad(loss), params, x, ctx)) == {FWD, BWD}


def test_vae_mid_attention_is_not_cudnn(gpu):
    """The autoencoder's AttnBlock (one head of 512 at the bottleneck) computes its own
    fp32 softmax and does not call attention(); cuDNN would refuse a head of 512 anyway."""
    gpu("9.0")
    block = layers.AttnBlock(dtype=jnp.bfloat16)
    x = S((1, 8, 8, 512), jnp.bfloat16)
    params = jax.eval_shape(block.init, jax.random.key(0), x)
    assert _fmha(block.apply, params, x) == set()
    q = S((1, 64, 1, 512), jnp.bfloat16)
    assert not attn._cudnn_supported(q) and not _jax_accepts(_jax_cudnn, q, q, q)


# ----------------------------------------------------------------------------- precision

_LAYOUT_OPS = {
    "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "slice",
    "concatenate", "copy", "copy_p", "select_n", "dynamic_slice", "dynamic_update_slice",
    "gather", "scatter", "scatter-add", "pad", "stop_gradient", "convert_element_type",
}  # fmt: skip
_STAT_OPS = {"reduce_sum", "reduce_max", "exp", "rsqrt", "div", "log", "sub"}


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs in its equations' params."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    yield from _eqns(sub)


def _float_dtypes(eqn) -> set:
    avals = [v.aval for v in (*eqn.invars, *eqn.outvars) if hasattr(v, "aval")]
    return {a.dtype for a in avals if jnp.issubdtype(getattr(a, "dtype", None), jnp.floating)}


def _prims(jaxpr, ops=None) -> dict[str, set]:
    """{primitive: float dtypes of its operands and results} over the arithmetic (or `ops`)."""
    found: dict[str, set] = {}
    for eqn in _eqns(jaxpr.jaxpr):
        name = eqn.primitive.name
        if (ops is None and name not in _LAYOUT_OPS) or (ops is not None and name in ops):
            found.setdefault(name, set()).update(_float_dtypes(eqn))
    return found


def _gn_params(c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
            "bias": jnp.asarray(rng.normal(0, 0.5, c), jnp.float32),
        }
    }


GROUP_NORMS = {
    "layers.group_norm": lambda **kw: layers.group_norm(8, **kw),  # autoencoder, transformer
    "unet.group_norm": lambda **kw: unet_lib.group_norm(8, **kw),  # GroupNorm32, eps 1e-5
}


@pytest.mark.parametrize("which", list(GROUP_NORMS))
def test_group_norm_bf16_arithmetic_is_fp32(which):
    """bf16 in, bf16 out, fp32 params: every arithmetic op (both reductions, the variance,
    rsqrt, the normalisation, scale and bias) runs on fp32 (flax's force_float32_reductions,
    the default). The same walk flags flax with that switch off."""
    x = jnp.zeros((2, 4, 4, 16), jnp.bfloat16)
    gn = GROUP_NORMS[which](dtype=jnp.bfloat16)
    assert gn.force_float32_reductions and not gn.use_fast_variance
    jaxpr = jax.make_jaxpr(gn.apply)(_gn_params(16), x)
    prims = _prims(jaxpr)
    assert jaxpr.out_avals[0].dtype == jnp.bfloat16
    assert {"reduce_sum", "rsqrt", "sub"} <= set(prims)
    assert all(d == F32 for d in prims.values()), prims
    loose = nn.GroupNorm(8, dtype=jnp.bfloat16, force_float32_reductions=False)
    loose_prims = _prims(jax.make_jaxpr(loose.apply)(_gn_params(16), x))
    assert jnp.dtype(jnp.bfloat16) in loose_prims["rsqrt"]


@pytest.mark.parametrize("which", list(GROUP_NORMS))
def test_group_norm_bf16_large_offset_matches_fp64(which):
    """Activations 1000 + N(0, 8^2) in bf16 (a grid of 4 there): the output matches the
    fp64 closed form on those same bf16 inputs to bf16 rounding. With bf16 statistics the
    mean alone is off by up to 2 (a quarter of a standard deviation)."""
    rng = np.random.default_rng(0)
    c, groups = 16, 8
    x = jnp.asarray(1000 + 8 * rng.standard_normal((2, 8, 8, c)), jnp.bfloat16)
    params = _gn_params(c, seed=1)
    gn = GROUP_NORMS[which](dtype=jnp.bfloat16)
    out = np.asarray(jax.jit(gn.apply)(params, x), np.float64)

    xs = np.asarray(x, np.float64).reshape(2, -1, groups, c // groups)
    mean = xs.mean(axis=(1, 3), keepdims=True)
    var = ((xs - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    ref = ((xs - mean) / np.sqrt(var + gn.epsilon)).reshape(x.shape)
    ref = ref * np.asarray(params["params"]["scale"]) + np.asarray(params["params"]["bias"])
    tol = 2.0**-8 * np.abs(ref) + 1e-3  # bf16 output rounding (half an ulp is 2^-9)
    assert np.all(np.abs(out - ref) <= tol), np.max(np.abs(out - ref) - tol)

    loose = nn.GroupNorm(groups, epsilon=gn.epsilon, dtype=jnp.bfloat16, force_float32_reductions=False)  # fmt: skip
    bad = np.asarray(jax.jit(loose.apply)(params, x), np.float64)
    assert np.max(np.abs(bad - ref)) > 0.05


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("impl", ["naive", "chunked", "xla", "cudnn"])
def test_attention_softmax_fp32_under_bf16(monkeypatch, impl, masked):
    """bf16 q/k/v: the softmax's max, exp, sum and division (and their VJP) run on fp32
    for every impl this CPU runs ("cudnn" falls back to XLA here; on a GPU cuDNN keeps
    fp32 softmax statistics itself). naive/chunked do all their arithmetic in fp32."""
    monkeypatch.setattr(attn, "CHUNK_BYTES", 64 << 10)  # chunked: blocks at this toy size
    q = jnp.zeros((1, 256, 2, 8), jnp.bfloat16)
    mask = jnp.ones((1, 1, 1, 256), bool) if masked else None
    f = lambda q, k, v: attn.attention(q, k, v, impl=impl, mask=mask)  # noqa: E731
    fwd = jax.make_jaxpr(f)(q, q, q)
    grad = jax.make_jaxpr(jax.grad(_loss(f), argnums=(0, 1, 2)))(q, q, q)
    assert fwd.out_avals[0].dtype == jnp.bfloat16
    for jaxpr in (fwd, grad):
        stats = _prims(jaxpr, _STAT_OPS)
        assert {"reduce_max", "exp", "reduce_sum"} <= set(stats)
        assert all(d == F32 for d in stats.values()), (impl, stats)
        if impl in ("naive", "chunked"):
            arith = _prims(jaxpr)
            assert all(d == F32 for n, d in arith.items() if n != "dot_general"), arith
    prims = {e.primitive.name for e in _eqns(fwd.jaxpr)}
    assert ("scan" in prims) == (impl == "chunked")


def test_bf16_models_keep_statistics_fp32():
    """A toy SD-style UNet (SpatialTransformer, cross-attention) and KL autoencoder
    (AttnBlock) in bf16 compute with fp32 params: every reduction, exp, rsqrt, log and
    division of their forward passes (traced through init) runs on fp32."""
    bf16 = jnp.bfloat16
    unet = unet_lib.UNetModel(
        in_channels=4, out_channels=4, model_channels=16, num_res_blocks=1,
        attention_resolutions=(1, 2), channel_mult=(1, 2), num_heads=2,
        use_spatial_transformer=True, context_dim=24, legacy=False, norm_groups=8,
        attention_impl="chunked", dtype=bf16,
    )  # fmt: skip
    x, t, ctx = S((1, 8, 8, 4), jnp.float32), S((1,), jnp.float32), S((1, 5, 24), jnp.float32)
    ae = autoencoder.AutoencoderKL(
        ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=8,
        z_channels=4, embed_dim=4, norm_groups=4, dtype=bf16,
    )  # fmt: skip
    img = S((1, 8, 8, 3), jnp.float32)
    key = jax.random.key(0)
    # init runs the forward pass (one trace instead of init + apply)
    for jaxpr in (
        jax.make_jaxpr(unet.init)(key, x, t, ctx),
        jax.make_jaxpr(functools.partial(ae.init, sample_posterior=False))(key, img),
    ):
        assert {a.dtype for a in jaxpr.out_avals} == F32  # the params
        stats = _prims(jaxpr, _STAT_OPS - {"sub"})
        assert {"reduce_sum", "reduce_max", "exp", "rsqrt"} <= set(stats)
        assert all(d == F32 for d in stats.values()), stats
        assert jnp.dtype(bf16) in set().union(*_prims(jaxpr, {"conv_general_dilated", "dot_general"}).values())  # fmt: skip
