"""UNet hyper-parameters: ConfigDict -> UNetModel, and the paper's LDM UNets.

PAPER_UNETS holds the `unet_config.params` of the CompVis / Stability configs (values
from /work/shared/PAPER_FACTS.md 2(b) and 3(b)); `image_size` is the latent size the
model was trained at (the reference also stores it, and its UNet ignores it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from ldm_jax.models.unet import UNetModel

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# UNetModel fields a config may set (the module's parent/name are not hyper-parameters).
UNET_KEYS = tuple(f.name for f in dataclasses.fields(UNetModel) if f.name not in ("parent", "name"))
_INFO_KEYS = ("image_size",)  # recorded with the model, not a constructor argument
_TUPLE_KEYS = ("channel_mult", "attention_resolutions")


def unet_kwargs(unet_cfg: Mapping[str, Any]) -> dict:
    """UNetModel keyword arguments from a ConfigDict (or dict); unknown keys are errors."""
    cfg = dict(unet_cfg.items()) if hasattr(unet_cfg, "items") else dict(unet_cfg)
    unknown = sorted(set(cfg) - set(UNET_KEYS) - set(_INFO_KEYS))
    if unknown:
        raise ValueError(f"unknown UNet config keys {unknown}; valid: {sorted(UNET_KEYS)}")
    kw = {k: v for k, v in cfg.items() if k in UNET_KEYS}
    for k in _TUPLE_KEYS:
        if k in kw:
            kw[k] = tuple(int(v) for v in kw[k])
    for k in ("dtype", "param_dtype"):
        if isinstance(kw.get(k), str):
            if kw[k] not in _DTYPES:
                raise ValueError(f"unknown {k} {kw[k]!r}; valid: {tuple(_DTYPES)}")
            kw[k] = _DTYPES[kw[k]]
    return kw


def from_config(unet_cfg: Mapping[str, Any]) -> UNetModel:
    return UNetModel(**unet_kwargs(unet_cfg))


# Unconditional LDM-VQ-4 (CelebA-HQ, FFHQ, LSUN-Bedrooms share one UNet).
_VQ4_UNCOND = dict(
    image_size=64, in_channels=3, out_channels=3, model_channels=224,
    attention_resolutions=(8, 4, 2), num_res_blocks=2, channel_mult=(1, 2, 3, 4),
    num_head_channels=32,
)  # fmt: skip

# Stable Diffusion v1/v2 (and the txt2img-1p4B layout): latent 64 = 512 px; the YAMLs'
# image_size 32 is marked unused there.
_SD = dict(
    image_size=64, in_channels=4, out_channels=4, model_channels=320,
    attention_resolutions=(4, 2, 1), num_res_blocks=2, channel_mult=(1, 2, 4, 4),
    use_spatial_transformer=True, transformer_depth=1, legacy=False,
)  # fmt: skip

PAPER_UNETS: dict[str, dict] = {
    "celebahq-ldm-vq-4": dict(_VQ4_UNCOND),
    "ffhq-ldm-vq-4": dict(_VQ4_UNCOND),
    "lsun_bedrooms-ldm-vq-4": dict(_VQ4_UNCOND),
    "lsun_churches-ldm-kl-8": dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=192,
        attention_resolutions=(1, 2, 4, 8), num_res_blocks=2, channel_mult=(1, 2, 2, 4, 4),
        num_heads=8, use_scale_shift_norm=True, resblock_updown=True,
    ),
    # ImageNet LDM-4-G: class labels enter by cross-attention (ClassEmbedder, [B, 1, 512]).
    "cin256-v2": dict(
        image_size=64, in_channels=3, out_channels=3, model_channels=192,
        attention_resolutions=(8, 4, 2), num_res_blocks=2, channel_mult=(1, 2, 3, 5),
        num_heads=1, use_spatial_transformer=True, transformer_depth=1, context_dim=512,
    ),
    # ImageNet LDM-8.
    "cin-ldm-vq-f8": dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=256,
        attention_resolutions=(4, 2, 1), num_res_blocks=2, channel_mult=(1, 2, 4),
        num_head_channels=32, use_spatial_transformer=True, transformer_depth=1,
        context_dim=512,
    ),
    # Super-resolution on VQ-f4 latents: the low-res image is concatenated (3 + 3 channels).
    "bsr_sr": dict(
        image_size=64, in_channels=6, out_channels=3, model_channels=160,
        attention_resolutions=(16, 8), num_res_blocks=2, channel_mult=(1, 2, 2, 4),
        num_head_channels=32,
    ),
    # Inpainting on VQ-f4-noattn latents: z, E(masked image) and the mask (3 + 3 + 1).
    "inpainting_big": dict(
        image_size=64, in_channels=7, out_channels=3, model_channels=256,
        attention_resolutions=(8, 4, 2), num_res_blocks=2, channel_mult=(1, 2, 3, 4),
        num_heads=8, num_head_channels=-1, resblock_updown=True,
    ),
    # Semantic synthesis on VQ-f4 latents: the rescaled class map is concatenated (3 + 3);
    # attention only in the middle block (attention_resolutions 32/16/8 name no level).
    "semantic_synthesis": dict(
        image_size=64, in_channels=6, out_channels=3, model_channels=128,
        attention_resolutions=(32, 16, 8), num_res_blocks=2, channel_mult=(1, 4, 8),
        num_heads=8,
    ),
    # Layout-to-image on VQ-f4 latents: the layout's tokens by cross-attention (512 wide).
    "layout2img": dict(
        image_size=64, in_channels=3, out_channels=3, model_channels=128,
        attention_resolutions=(8, 4, 2), num_res_blocks=2, channel_mult=(1, 2, 3, 4),
        num_head_channels=32, use_spatial_transformer=True, transformer_depth=3,
        context_dim=512,
    ),
    # LDM-KL-8 text-to-image with the 1.4B-parameter model (BERT context 1280).
    "txt2img-1p4B": dict(_SD, image_size=32, num_heads=8, context_dim=1280),
    "sd-v1": dict(_SD, num_heads=8, context_dim=768),
    # The reference runs SD v2 in fp16 (use_fp16: True); dtype is a runtime choice here.
    "sd-v2": dict(_SD, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
}  # fmt: skip
