"""UNetModel params <-> PyTorch state dicts: CompVis/Stability single files and diffusers.

CompVis (`model.diffusion_model.input_blocks.1.1.proj_in.weight` in an SD checkpoint) is
the naming ldm_jax's UNet already uses, with dots for underscores. diffusers'
`UNet2DConditionModel` regroups the same tensors per resolution level:

    input_blocks.0.0                 conv_in
    input_blocks.{1 + l*(n+1) + j}   down_blocks.l.{resnets,attentions}.j   (j < n)
    input_blocks.{1 + l*(n+1) + n}   down_blocks.l.downsamplers.0           (.op -> .conv)
    middle_block.{0,1,2}             mid_block.{resnets.0, attentions.0, resnets.1}
    output_blocks.{k*(n+1) + j}      up_blocks.k.{resnets,attentions,upsamplers}
    time_embed.{0,2}, out.{0,2}      time_embedding.linear_{1,2}, conv_norm_out, conv_out

with n = num_res_blocks. Tensor shapes are the same in both layouts (1x1-conv proj_in/out
for SD v1, Linear for SD v2's use_linear_in_transformer), so only names change.
"""

from __future__ import annotations

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
from ldm_jax.models.unet import UNetModel

COMPVIS_UNET_PREFIX = "model.diffusion_model."
_HINT = (
    "Build the UNetModel from the checkpoint's own config (for diffusers: "
    "ldm_jax.interop.diffusers_config.unet_config_from_diffusers(config.json))."
)
# openaimodel ResBlock -> diffusers ResnetBlock2D
_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


@cached_per_model
def _abstract(model: UNetModel) -> dict:
    f = 2 ** (len(model.channel_mult) - 1)  # smallest input the levels can halve
    x = jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    context = None
    if model.context_dim is not None:
        context = jax.ShapeDtypeStruct((1, 1, model.context_dim), jnp.float32)
    y = None if model.num_classes is None else jax.ShapeDtypeStruct((1,), jnp.int32)
    return abstract_params(model, x, t, context, y)


def _compvis_name(path: tuple[str, ...]) -> str:
    """("input_blocks_1_1", "proj_in", "kernel") -> "input_blocks.1.1.proj_in.weight"."""
    return ".".join([dotted(m) for m in path[:-1]] + [torch_leaf(path)])


def _resnet(rest: str) -> str:
    module, _, leaf = rest.rpartition(".")
    return f"{_RESNET.get(module, module)}.{leaf}"


def _diffusers_name(compvis: str, num_res_blocks: int) -> str:
    """A CompVis UNet tensor name (no prefix) in diffusers' UNet2DConditionModel naming."""
    per_level = num_res_blocks + 1
    parts = compvis.split(".")
    head, rest = parts[0], ".".join(parts[1:])
    if head == "time_embed":  # time_embed.{0,2}.weight
        return f"time_embedding.linear_{1 if parts[1] == '0' else 2}.{parts[2]}"
    if head == "label_emb":
        return f"class_embedding.{rest}"
    if head == "out":  # out.0 = GroupNorm, out.2 = conv
        return f"{'conv_norm_out' if parts[1] == '0' else 'conv_out'}.{parts[2]}"
    if head == "middle_block":
        sub, rest = parts[1], ".".join(parts[2:])
        if sub == "1":
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{0 if sub == '0' else 1}.{_resnet(rest)}"
    index, sub, rest = int(parts[1]), parts[2], ".".join(parts[3:])
    if head == "input_blocks":
        if index == 0:
            return f"conv_in.{rest}"
        level, j = divmod(index - 1, per_level)
        if j == num_res_blocks:  # the level's Downsample: its conv is `op`
            return f"down_blocks.{level}.downsamplers.0.conv.{rest.removeprefix('op.')}"
        if sub == "0":
            return f"down_blocks.{level}.resnets.{j}.{_resnet(rest)}"
        return f"down_blocks.{level}.attentions.{j}.{rest}"
    if head == "output_blocks":
        level, j = divmod(index, per_level)
        if sub == "0":
            return f"up_blocks.{level}.resnets.{j}.{_resnet(rest)}"
        if rest.startswith("conv."):  # the Upsample after the resnet (and attention)
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        return f"up_blocks.{level}.attentions.{j}.{rest}"
    raise UserError(f"no diffusers name for UNet tensor {compvis!r}")


def _check_diffusers_expressible(model: UNetModel) -> None:
    # diffusers' UNet2DConditionModel has Transformer2DModel attention and plain
    # conv resamplers only; openaimodel's AttentionBlock and ResBlock up/down have no slot.
    if not model.use_spatial_transformer:
        raise UserError(
            "diffusers' UNet2DConditionModel needs cross-attention (use_spatial_transformer"
            "=True); this UNet has openaimodel AttentionBlocks: use the CompVis layout"
        )
    if model.resblock_updown:
        raise UserError(
            "resblock_updown=True has no UNet2DConditionModel equivalent (its resamplers "
            "are convs); use the CompVis layout"
        )


def _compvis_table(model: UNetModel, prefix: str) -> tuple[dict, list[Entry]]:
    abstract = _abstract(model)
    return abstract, named_table(abstract, lambda path: prefix + _compvis_name(path))


def _diffusers_table(model: UNetModel) -> tuple[dict, list[Entry]]:
    _check_diffusers_expressible(model)
    abstract, table = _compvis_table(model, "")
    n = model.num_res_blocks
    return abstract, [e._replace(name=_diffusers_name(e.name, n)) for e in table]


def unet_from_compvis(
    state: dict[str, np.ndarray], model: UNetModel, prefix: str = COMPVIS_UNET_PREFIX
) -> dict:
    """{'params': ...} for `model` from a CompVis/Stability state dict.

    Only keys under `prefix` count (an SD file also holds the VAE and text encoder); use
    prefix="" for a bare openaimodel UNet state dict.
    """
    abstract, table = _compvis_table(model, prefix)
    what = "UNet (CompVis layout)"
    return import_state(state, table, abstract, what=what, prefix=prefix, hint=_HINT)


def unet_to_compvis(
    params: Any, model: UNetModel, prefix: str = COMPVIS_UNET_PREFIX, dtype: Any = None
) -> dict[str, np.ndarray]:
    """{CompVis name: array} of `params`, torch layouts (OIHW convs, [out, in] linears)."""
    abstract, table = _compvis_table(model, prefix)
    return export_state(params, table, abstract, what="UNet (CompVis layout)", dtype=dtype)


def unet_from_diffusers(state: dict[str, np.ndarray], model: UNetModel) -> dict:
    """{'params': ...} for `model` from a diffusers UNet2DConditionModel state dict
    (diffusion_pytorch_model.safetensors of a `unet/` folder)."""
    abstract, table = _diffusers_table(model)
    return import_state(state, table, abstract, what="UNet (diffusers layout)", hint=_HINT)


def unet_to_diffusers(params: Any, model: UNetModel, dtype: Any = None) -> dict[str, np.ndarray]:
    """{diffusers name: array} of `params`, loadable by UNet2DConditionModel."""
    abstract, table = _diffusers_table(model)
    return export_state(params, table, abstract, what="UNet (diffusers layout)", dtype=dtype)
