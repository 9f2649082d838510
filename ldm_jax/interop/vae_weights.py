"""First-stage autoencoder params <-> PyTorch state dicts: CompVis and diffusers layouts.

CompVis (`first_stage_model.encoder.down.0.block.1.norm1.weight` in an SD checkpoint) is
ldm_jax's own naming with dots. diffusers' `AutoencoderKL` renames and reorders:

    encoder.down.i.block.j          encoder.down_blocks.i.resnets.j
    encoder.down.i.downsample       encoder.down_blocks.i.downsamplers.0
    decoder.up.i.block.j            decoder.up_blocks.{L-1-i}.resnets.j
    decoder.up.i.upsample           decoder.up_blocks.{L-1-i}.upsamplers.0
    mid.block_{1,2}, mid.attn_1     mid_block.resnets.{0,1}, mid_block.attentions.0
    attn_1.{norm,q,k,v,proj_out}    group_norm, to_q, to_k, to_v, to_out.0
    nin_shortcut, norm_out          conv_shortcut, conv_norm_out

The decoder's up blocks run deepest first; diffusers numbers them in that order, CompVis by
resolution level. The mid attention's q/k/v/proj_out are 1x1 convs in CompVis files and
Linear layers in diffusers (older diffusers files: query/key/value/proj_attn, some of them
stored as [C, C, 1, 1]; both are read).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import UserError
from ldm_jax.interop.mapping import (
    Entry,
    abstract_params,
    cached_per_model,
    dotted,
    export_state,
    import_state,
    named_table,
    torch_leaf,
)
from ldm_jax.models.autoencoder import AutoencoderKL, VQModel

COMPVIS_VAE_PREFIX = "first_stage_model."
_HINT = (
    "Build the autoencoder from the checkpoint's own config (for diffusers: "
    "ldm_jax.interop.diffusers_config.vae_config_from_diffusers(config.json))."
)
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_MID = re.compile(r"mid_(block|attn)_(\d+)")
_LEVEL_ATTN = re.compile(r"(down|up)_\d+_attn_\d+")  # attention inside a resolution level


@cached_per_model
def _abstract(model: AutoencoderKL | VQModel) -> dict:
    f = 2 ** (len(model.ch_mult) - 1)
    x = jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32)
    if isinstance(model, AutoencoderKL):  # the mode instead of a sample: no rng needed
        return abstract_params(model, x, sample_posterior=False)
    return abstract_params(model, x)


def _compvis_module(module: str) -> str:
    # mid_block_1 -> mid.block_1 (CompVis keeps that underscore); down_0_block_1 -> down.0.block.1
    mid = _MID.fullmatch(module)
    return f"mid.{mid[1]}_{mid[2]}" if mid else dotted(module)


def _compvis_name(path: tuple[str, ...]) -> str:
    if path == ("quantize", "embedding"):  # VQModel's codebook: an nn.Embedding in torch
        return "quantize.embedding.weight"
    return ".".join([_compvis_module(m) for m in path[:-1]] + [torch_leaf(path)])


def _diffusers_name(compvis: str, n_levels: int) -> str:
    """A CompVis autoencoder tensor name (no prefix) in diffusers' AutoencoderKL naming."""
    parts = compvis.split(".")
    coder, rest = parts[0], parts[1:]
    if coder not in ("encoder", "decoder"):  # quant_conv, post_quant_conv
        return compvis
    head = rest[0]
    if head in ("down", "up"):
        level = int(rest[1]) if head == "down" else n_levels - 1 - int(rest[1])
        blocks = f"{coder}.{head}_blocks.{level}"
        if rest[2] in ("downsample", "upsample"):
            return f"{blocks}.{rest[2]}rs.0.{'.'.join(rest[3:])}"
        # (attentions at down/up levels have no slot in diffusers' AutoencoderKL: refused
        # before naming, in _check_diffusers_expressible)
        module = "conv_shortcut" if rest[4] == "nin_shortcut" else rest[4]
        return f"{blocks}.resnets.{rest[3]}.{module}.{'.'.join(rest[5:])}"
    if head == "mid":
        if rest[1] == "attn_1":
            return f"{coder}.mid_block.attentions.0.{_ATTN[rest[2]]}.{rest[3]}"
        index = int(rest[1].removeprefix("block_")) - 1
        module = "conv_shortcut" if rest[2] == "nin_shortcut" else rest[2]
        return f"{coder}.mid_block.resnets.{index}.{module}.{'.'.join(rest[3:])}"
    if head == "norm_out":
        return f"{coder}.conv_norm_out.{rest[1]}"
    return compvis  # conv_in, conv_out


def _check_diffusers_expressible(model: AutoencoderKL, abstract: dict) -> None:
    if not isinstance(model, AutoencoderKL):
        name = type(model).__name__
        raise UserError(f"diffusers' AutoencoderKL layout needs an AutoencoderKL, got a {name}")
    if any(_LEVEL_ATTN.fullmatch(path[1]) for path in abstract):
        raise UserError(
            f"attn_resolutions={model.attn_resolutions}: diffusers' AutoencoderKL "
            "(DownEncoderBlock2D/UpDecoderBlock2D) has attention only in its mid blocks; "
            "use the CompVis layout"
        )
    if model.embed_dim != model.z_channels:
        raise UserError(
            f"embed_dim {model.embed_dim} != z_channels {model.z_channels}: diffusers' "
            "AutoencoderKL has one latent_channels for both"
        )


def _compvis_table(model, prefix: str) -> tuple[dict, list[Entry]]:
    abstract = _abstract(model)
    return abstract, named_table(abstract, lambda path: prefix + _compvis_name(path))


def _diffusers_table(model: AutoencoderKL) -> tuple[dict, list[Entry]]:
    abstract, table = _compvis_table(model, "")
    _check_diffusers_expressible(model, abstract)
    n_levels = len(model.ch_mult)
    out = []
    for e in table:
        layout = e.layout
        if e.path[1] == "mid_attn_1" and e.path[-1] == "kernel":
            layout = "conv1x1_as_linear"
        out.append(Entry(e.path, _diffusers_name(e.name, n_levels), layout))
    return abstract, out


def _modern_diffusers_names(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Older diffusers VAE files: query/key/value/proj_attn and [C, C, 1, 1] attention
    weights become to_q/to_k/to_v/to_out.0 and [C, C]."""
    out = {}
    for name, value in state.items():
        match = re.fullmatch(r"(.*\.mid_block\.attentions\.0\.)(.+)\.(weight|bias)", name)
        if match:
            module = _LEGACY_ATTN.get(match[2], match[2])
            name = f"{match[1]}{module}.{match[3]}"
            if match[3] == "weight" and np.ndim(value) == 4:
                value = np.asarray(value)[:, :, 0, 0]
        if name in out:
            raise UserError(f"VAE file holds attention tensor {name!r} under two names")
        out[name] = value
    return out


def vae_from_compvis(
    state: dict[str, np.ndarray],
    model: AutoencoderKL | VQModel,
    prefix: str = COMPVIS_VAE_PREFIX,
) -> dict:
    """{'params': ...} for `model` from a CompVis state dict.

    Only keys under `prefix` count; the training loss (`loss.*`: LPIPS, discriminator) of
    a CompVis autoencoder checkpoint is skipped. prefix="" reads a bare autoencoder file.
    """
    abstract, table = _compvis_table(model, prefix)
    return import_state(
        state,
        table,
        abstract,
        what="autoencoder (CompVis layout)",
        prefix=prefix,
        ignore_prefixes=(prefix + "loss.",),
        hint=_HINT,
    )


def vae_to_compvis(
    params: Any,
    model: AutoencoderKL | VQModel,
    prefix: str = COMPVIS_VAE_PREFIX,
    dtype: Any = None,
) -> dict[str, np.ndarray]:
    """{CompVis name: array} of `params`, torch layouts."""
    abstract, table = _compvis_table(model, prefix)
    return export_state(params, table, abstract, what="autoencoder (CompVis layout)", dtype=dtype)


def vae_from_diffusers(state: dict[str, np.ndarray], model: AutoencoderKL) -> dict:
    """{'params': ...} for `model` from a diffusers AutoencoderKL state dict (`vae/`)."""
    abstract, table = _diffusers_table(model)
    what = "autoencoder (diffusers layout)"
    return import_state(_modern_diffusers_names(state), table, abstract, what=what, hint=_HINT)


def vae_to_diffusers(params: Any, model: AutoencoderKL, dtype: Any = None) -> dict[str, np.ndarray]:
    """{diffusers name: array} of `params`, loadable by diffusers' AutoencoderKL."""
    abstract, table = _diffusers_table(model)
    what = "autoencoder (diffusers layout)"
    return export_state(params, table, abstract, what=what, dtype=dtype)
