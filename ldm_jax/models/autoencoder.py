"""First-stage autoencoders of LDM: Encoder/Decoder, KL (diagonal Gaussian) and VQ models.

Submodule names mirror the CompVis reference state dict (`down.1.block.0` ->
`down_1_block_0`), so PyTorch weight import is a renaming. Architecture only: the losses
that use `AutoencoderOutput` live in `ldm_jax.losses`.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import layers
from ldm_jax.models.layers import AttnBlock, Downsample, ResnetBlock, Upsample, swish

Dtype = Any

ATTN_TYPES = ("vanilla", "none")
MODEL_TYPES = ("kl", "vq")
# Where the decoder's final conv sits in the autoencoder param tree (adaptive GAN weight).
LAST_LAYER_PATH = ("decoder", "conv_out")


@flax.struct.dataclass
class AutoencoderOutput:
    recon: jax.Array  # [B, H, W, out_ch]
    hidden: jax.Array  # [B, H, W, C0] input of decoder.conv_out (after norm_out + swish)
    reg_loss: jax.Array  # scalar: KL sum / batch size, or VQ codebook loss
    metrics: dict  # scalars


def _check_attn_type(attn_type: str) -> None:
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r}")


REMAT_POLICIES = ("none", "attention", "full")


class Encoder(nn.Module):
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    resolution: int = 256
    z_channels: int = 4
    double_z: bool = True
    attn_type: str = "vanilla"
    norm_groups: int = 32
    remat: str = "none"  # "attention" / "full": recompute those blocks in the backward pass
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        # x [B, H, W, in_ch] -> [B, H/f, W/f, (2*)z_channels]
        _check_attn_type(self.attn_type)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        use_attn = self.attn_type != "none"
        h = layers.conv(self.ch, 3, name="conv_in", **kw)(x)  # [B, H, W, ch]
        curr_res = self.resolution
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = _resnet(self)(
                    self.ch * mult, self.dropout, norm_groups=self.norm_groups,
                    name=f"down_{i}_block_{j}", **kw,
                )(h, None, train)  # fmt: skip
                if use_attn and curr_res in self.attn_resolutions:
                    h = _attn(self)(self.norm_groups, name=f"down_{i}_attn_{j}", **kw)(h)
            if i != len(self.ch_mult) - 1:
                h = Downsample(h.shape[-1], name=f"down_{i}_downsample", **kw)(h)
                curr_res //= 2
        h = _mid(self, h, train)
        h = swish(layers.group_norm(self.norm_groups, name="norm_out", **kw)(h))
        out_ch = 2 * self.z_channels if self.double_z else self.z_channels
        return layers.conv(out_ch, 3, name="conv_out", **kw)(h)


def _mid(mod: nn.Module, h: jax.Array, train: bool) -> jax.Array:
    """block_1 -> attn_1 -> block_2 at the bottleneck; attention unless attn_type == 'none'."""
    kw = dict(dtype=mod.dtype, param_dtype=mod.param_dtype, norm_groups=mod.norm_groups)
    c = h.shape[-1]
    h = _resnet(mod)(c, mod.dropout, name="mid_block_1", **kw)(h, None, train)
    if mod.attn_type != "none":
        h = _attn(mod)(name="mid_attn_1", **kw)(h)
    return _resnet(mod)(c, mod.dropout, name="mid_block_2", **kw)(h, None, train)


def _check_remat(remat: str) -> None:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat {remat!r}; valid: {list(REMAT_POLICIES)}")


def _resnet(mod: nn.Module):
    """ResnetBlock, rematerialised under remat='full' (static_argnums count self:
    (self, x, temb, train))."""
    _check_remat(mod.remat)
    return nn.remat(ResnetBlock, static_argnums=(3,)) if mod.remat == "full" else ResnetBlock


def _attn(mod: nn.Module):
    return nn.remat(AttnBlock) if mod.remat in ("attention", "full") else AttnBlock


class Decoder(nn.Module):
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    resolution: int = 256
    attn_type: str = "vanilla"
    norm_groups: int = 32
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, *, train: bool = False, return_hidden: bool = False):
        # z [B, h, w, z_channels] -> recon [B, H, W, out_ch] (and hidden [B, H, W, ch*ch_mult[0]])
        _check_attn_type(self.attn_type)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        use_attn = self.attn_type != "none"
        n_levels = len(self.ch_mult)
        curr_res = self.resolution // 2 ** (n_levels - 1)
        h = layers.conv(self.ch * self.ch_mult[-1], 3, name="conv_in", **kw)(z)
        h = _mid(self, h, train)
        # The reference indexes up levels by i_level but builds/runs them deepest first.
        for i in reversed(range(n_levels)):
            for j in range(self.num_res_blocks + 1):
                h = _resnet(self)(
                    self.ch * self.ch_mult[i], self.dropout, norm_groups=self.norm_groups,
                    name=f"up_{i}_block_{j}", **kw,
                )(h, None, train)  # fmt: skip
                if use_attn and curr_res in self.attn_resolutions:
                    h = _attn(self)(self.norm_groups, name=f"up_{i}_attn_{j}", **kw)(h)
            if i != 0:
                h = Upsample(h.shape[-1], name=f"up_{i}_upsample", **kw)(h)
                curr_res *= 2
        hidden = swish(layers.group_norm(self.norm_groups, name="norm_out", **kw)(h))
        recon = layers.conv(self.out_ch, 3, name="conv_out", **kw)(hidden)
        return (recon, hidden) if return_hidden else recon


def apply_output_conv(conv_params: Any, hidden: jax.Array) -> jax.Array:
    """The decoder's `conv_out` as a pure function of its params: hidden [B,H,W,C] -> recon."""
    conv_params = nn.unbox(conv_params)
    out_ch = conv_params["kernel"].shape[-1]
    mod = layers.conv(out_ch, 3, dtype=hidden.dtype)
    return mod.apply({"params": conv_params}, hidden)


@jax.tree_util.register_pytree_node_class
class DiagonalGaussian:
    """Diagonal Gaussian posterior from moments [..., 2*C] = (mean, logvar) split on channels."""

    def __init__(self, moments: jax.Array):  # [B, h, w, 2C]
        mean, logvar = jnp.split(moments, 2, axis=-1)
        self.mean = mean  # [B, h, w, C]
        self.logvar = jnp.clip(logvar, -30.0, 20.0)  # [B, h, w, C]

    @classmethod
    def from_mean_logvar(cls, mean: jax.Array, logvar: jax.Array) -> DiagonalGaussian:
        return cls(jnp.concatenate([mean, logvar], axis=-1))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        eps = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:  # [B]: KL(q || N(0, I)) summed over H, W, C
        return 0.5 * jnp.sum(self.mean**2 + self.var - 1.0 - self.logvar, axis=(1, 2, 3))

    def nll(self, sample: jax.Array) -> jax.Array:  # [B]
        terms = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean) ** 2 / self.var
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))

    # pytree protocol, so a posterior can leave jit; unflatten must not re-clip sentinels.
    def tree_flatten(self):
        return (self.mean, self.logvar), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.mean, obj.logvar = children
        return obj


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser (taming VectorQuantizer2, legacy=True loss form)."""

    n_embed: int
    embed_dim: int
    beta: float = 0.25
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array):  # h [B, h, w, D] -> z_q [B, h, w, D], loss, info
        lim = 1.0 / self.n_embed
        init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -lim, lim)
        codebook = self.param(
            "embedding",
            nn.with_logical_partitioning(init, ("codebook", "latent")),
            (self.n_embed, self.embed_dim),
            self.param_dtype,
        )  # [K, D]
        # Distances in fp32 whatever the compute dtype: ties and near-ties decide indices.
        h = h.astype(jnp.float32)
        e = codebook.astype(jnp.float32)
        flat = h.reshape(-1, self.embed_dim)  # [N, D]
        d = (
            jnp.sum(flat**2, axis=1, keepdims=True)
            + jnp.sum(e**2, axis=1)[None, :]
            - 2.0 * flat @ e.T
        )  # [N, K]
        idx = jnp.argmin(d, axis=1)  # [N]
        z_q = e[idx].reshape(h.shape)  # [B, h, w, D]
        sg = jax.lax.stop_gradient
        # legacy form: beta weights the codebook term, not the commitment term.
        loss = jnp.mean((sg(z_q) - h) ** 2) + self.beta * jnp.mean((z_q - sg(h)) ** 2)
        z_q = h + sg(z_q - h)  # straight-through estimator
        counts = jnp.bincount(idx, length=self.n_embed)  # [K]
        p = counts / idx.shape[0]
        perplexity = jnp.exp(-jnp.sum(p * jnp.log(p + 1e-10)))
        info = {
            "indices": idx.reshape(h.shape[:-1]),  # [B, h, w]
            "perplexity": perplexity,
            "codebook_usage": jnp.mean((counts > 0).astype(jnp.float32)),
        }
        return z_q, loss, info


def _coder_kwargs(m: nn.Module) -> dict:
    return dict(
        ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
        resolution=m.resolution, attn_type=m.attn_type, norm_groups=m.norm_groups,
        remat=m.remat, dtype=m.dtype, param_dtype=m.param_dtype,
    )  # fmt: skip


class AutoencoderKL(nn.Module):
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True
    attn_type: str = "vanilla"
    norm_groups: int = 32
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if not self.double_z:
            raise ValueError("AutoencoderKL needs double_z=True (the encoder emits mean, logvar)")
        kw = _coder_kwargs(self)
        self.encoder = Encoder(z_channels=self.z_channels, double_z=True, **kw)
        self.decoder = Decoder(out_ch=self.out_ch, **kw)
        ckw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.quant_conv = layers.conv(2 * self.embed_dim, 1, **ckw)
        self.post_quant_conv = layers.conv(self.z_channels, 1, **ckw)

    def encode(self, x: jax.Array, *, train: bool = False) -> DiagonalGaussian:
        moments = self.quant_conv(self.encoder(x, train=train))  # [B, h, w, 2*embed_dim]
        return DiagonalGaussian(moments.astype(jnp.float32))

    def decode(self, z: jax.Array, *, train: bool = False) -> jax.Array:
        return self.decoder(self.post_quant_conv(z), train=train)  # [B, H, W, out_ch]

    def __call__(
        self, x: jax.Array, *, sample_posterior: bool = True, train: bool = False
    ) -> AutoencoderOutput:
        post = self.encode(x, train=train)
        z = post.sample(self.make_rng("sample")) if sample_posterior else post.mode()
        recon, hidden = self.decoder(self.post_quant_conv(z), train=train, return_hidden=True)
        kl = jnp.sum(post.kl()) / x.shape[0]  # reference: sum over all elements / batch
        metrics = {"kl": kl, "posterior_std": jnp.mean(post.std)}
        return AutoencoderOutput(recon=recon, hidden=hidden, reg_loss=kl, metrics=metrics)


class VQModel(nn.Module):
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256
    z_channels: int = 4
    embed_dim: int = 4
    n_embed: int = 16384
    beta: float = 0.25
    attn_type: str = "vanilla"
    norm_groups: int = 32
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = _coder_kwargs(self)
        self.encoder = Encoder(z_channels=self.z_channels, double_z=False, **kw)
        self.decoder = Decoder(out_ch=self.out_ch, **kw)
        ckw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.quant_conv = layers.conv(self.embed_dim, 1, **ckw)
        self.post_quant_conv = layers.conv(self.z_channels, 1, **ckw)
        self.quantizer = VectorQuantizer(
            self.n_embed, self.embed_dim, self.beta, param_dtype=self.param_dtype, name="quantize"
        )

    def encode(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        # Pre-quantisation h, as LDM's VQModelInterface.encode returns it.
        return self.quant_conv(self.encoder(x, train=train))  # [B, h, w, embed_dim]

    def quantize(self, h: jax.Array):
        return self.quantizer(h)

    def decode(self, h: jax.Array, *, train: bool = False, quantize: bool = True) -> jax.Array:
        if quantize:
            h, _, _ = self.quantizer(h)
        return self.decoder(self.post_quant_conv(h), train=train)

    def __call__(self, x: jax.Array, *, train: bool = False) -> AutoencoderOutput:
        z_q, loss, info = self.quantizer(self.encode(x, train=train))
        recon, hidden = self.decoder(self.post_quant_conv(z_q), train=train, return_hidden=True)
        metrics = {"perplexity": info["perplexity"], "codebook_usage": info["codebook_usage"]}
        return AutoencoderOutput(recon=recon, hidden=hidden, reg_loss=loss, metrics=metrics)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def from_config(model_cfg) -> nn.Module:
    """Build AutoencoderKL / VQModel from a ConfigDict (or dict) with the keys of the brief."""
    get = model_cfg.get
    kind = get("type", "kl")
    if kind not in MODEL_TYPES:
        raise ValueError(f"unknown autoencoder type {kind!r}; valid types: {MODEL_TYPES}")
    dtype_name = get("dtype", "float32")
    if dtype_name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype_name!r}; valid: {tuple(_DTYPES)}")
    common = dict(
        ch=get("ch"), ch_mult=tuple(get("ch_mult")), num_res_blocks=get("num_res_blocks"),
        attn_resolutions=tuple(get("attn_resolutions", ())), dropout=get("dropout", 0.0),
        in_channels=get("in_channels", 3), out_ch=get("out_ch", 3),
        resolution=get("resolution"), z_channels=get("z_channels"),
        embed_dim=get("embed_dim"), attn_type=get("attn_type", "vanilla"),
        norm_groups=get("norm_groups", 32), remat=get("remat", "none"),
        dtype=_DTYPES[dtype_name],
    )  # fmt: skip
    if kind == "kl":
        return AutoencoderKL(double_z=get("double_z", True), **common)
    # VQ encoders never double z; a double_z key shared with KL configs is ignored here.
    return VQModel(n_embed=get("n_embed"), beta=get("beta", 0.25), **common)


def downsampling_factor(model_cfg) -> int:
    return 2 ** (len(model_cfg.get("ch_mult")) - 1)
