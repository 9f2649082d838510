"""ldm_jax model configs <-> diffusers `config.json` dicts (UNet2DConditionModel,
AutoencoderKL, the scheduler), and a CLIPTextEncoder's transformers CLIPTextConfig.

The model results are plain dicts for `ldm_jax.models.unet_configs.from_config` and
`ldm_jax.models.autoencoder.from_config`; a scheduler config gives the diffusion
schedule and parameterization. A diffusers option that ldm_jax's models cannot
express is a UserError naming the key; keys that only affect numerics in half precision
(`upcast_attention`, `force_upcast`) or nothing in the model (`scaling_factor`, which is
the diffusion config's `scale_factor`) are not part of the result. Keys this module does
not know are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ldm_jax.errors import UserError

# key -> values ldm_jax's UNetModel reproduces (the first is diffusers' default).
_UNET_ACCEPTED = {
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),  # openaimodel's embedding is cos first
    "freq_shift": (0,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "act_fn": ("silu",),
    "norm_eps": (1e-5,),  # GroupNorm32 of openaimodel
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),  # None: a plain nn.Embedding when num_class_embeds is set
    "addition_embed_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "reverse_transformer_layers_per_block": (None,),
    "resnet_time_scale_shift": ("default", "scale_shift"),
}
_VAE_ACCEPTED = {
    "act_fn": ("silu",),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
    "mid_block_add_attention": (True, False),
}
_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"


def _check_class(config: Mapping, name: str) -> None:
    found = config.get("_class_name", name)
    if found != name:
        raise UserError(f"expected a diffusers {name} config, got _class_name {found!r}")


def _check_accepted(config: Mapping, accepted: Mapping[str, tuple], what: str) -> None:
    for key, values in accepted.items():
        value = config.get(key, values[0])
        if value not in values:
            raise UserError(
                f"{what} config {key}={value!r} has no ldm_jax equivalent (supported: "
                f"{', '.join(repr(v) for v in values)})"
            )


def _per_level(value: Any, key: str, n: int) -> list:
    """An int-or-list config value as one value per level."""
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if values is None:
        return [value] * n
    if len(values) != n:
        raise UserError(f"config {key}={value!r} needs one entry per level ({n})")
    return values


def _uniform(config: Mapping, key: str, default: Any, n: int) -> Any:
    values = _per_level(config.get(key, default), key, n)
    if len(set(values)) != 1:
        raise UserError(
            f"config {key}={values!r}: ldm_jax uses one value for every level; per-level "
            "values have no equivalent"
        )
    return values[0]


def _channels(config: Mapping, default: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    """block_out_channels -> (base channels, channel multipliers)."""
    channels = [int(c) for c in config.get("block_out_channels", default)]
    base = channels[0]
    if any(c % base for c in channels):
        raise UserError(
            f"block_out_channels {channels}: ldm_jax needs every level's channels to be a "
            f"multiple of the first ({base})"
        )
    return base, tuple(c // base for c in channels)


def _attention_levels(config: Mapping, n: int) -> list[int]:
    down = list(config.get("down_block_types", [_CROSS_DOWN] * (n - 1) + [_PLAIN_DOWN]))
    up = list(config.get("up_block_types", [_PLAIN_UP] + [_CROSS_UP] * (n - 1)))
    for types, known in ((down, (_CROSS_DOWN, _PLAIN_DOWN)), (up, (_CROSS_UP, _PLAIN_UP))):
        if len(types) != n or any(t not in known for t in types):
            raise UserError(
                f"block types {types}: ldm_jax's UNet has {n} levels of {' or '.join(known)}"
            )
    levels = [i for i, t in enumerate(down) if t == _CROSS_DOWN]
    if levels != [i for i, t in enumerate(reversed(up)) if t == _CROSS_UP]:
        raise UserError(
            f"down_block_types {down} and up_block_types {up} put cross-attention at "
            "different levels; ldm_jax's attention_resolutions applies to both paths"
        )
    return levels


def _heads(config: Mapping, channels: list[int], used: list[int]) -> dict:
    """diffusers' `attention_head_dim` is a head *count* (its known misnomer) unless
    num_attention_heads is set; ldm_jax takes one count or one head width for all levels."""
    n = len(channels)
    counts = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    counts = _per_level(counts, "attention_head_dim", n)
    used_counts = {counts[i] for i in used}
    if len(used_counts) == 1:
        return dict(num_heads=int(used_counts.pop()))
    widths = {channels[i] // counts[i] for i in used}
    if len(widths) == 1 and all(channels[i] % counts[i] == 0 for i in used):
        return dict(num_head_channels=int(widths.pop()))
    raise UserError(
        f"attention heads {counts} for channels {channels}: ldm_jax needs one head count or "
        "one head width for every attention level"
    )


def unet_config_from_diffusers(config: Mapping[str, Any]) -> dict:
    """ldm_jax UNet config (for unet_configs.from_config) of a diffusers UNet2DConditionModel.

    SD v1.x gives PAPER_UNETS['sd-v1'] (num_heads=8), SD v2.x PAPER_UNETS['sd-v2']
    (attention_head_dim [5, 10, 20, 20] -> num_head_channels=64, linear projections).
    """
    _check_class(config, "UNet2DConditionModel")
    _check_accepted(config, _UNET_ACCEPTED, "UNet2DConditionModel")
    base, mult = _channels(config, (320, 640, 1280, 1280))
    n = len(mult)
    if any(_per_level(config.get("only_cross_attention", False), "only_cross_attention", n)):
        raise UserError("only_cross_attention=True (no self-attention) has no ldm_jax equivalent")
    time_dim = config.get("time_embedding_dim")
    if time_dim not in (None, 4 * base):
        raise UserError(f"time_embedding_dim={time_dim}: ldm_jax uses 4 x {base} = {4 * base}")
    levels = _attention_levels(config, n)
    channels = [base * m for m in mult]
    out = dict(
        in_channels=int(config.get("in_channels", 4)),
        out_channels=int(config.get("out_channels", 4)),
        model_channels=base,
        channel_mult=mult,
        num_res_blocks=int(_uniform(config, "layers_per_block", 2, n)),
        attention_resolutions=tuple(2**i for i in levels),
        # the mid block's attention uses the last level's heads and depth
        **_heads(config, channels, sorted(set(levels) | {n - 1})),
        transformer_depth=int(_uniform(config, "transformer_layers_per_block", 1, n)),
        context_dim=int(_uniform(config, "cross_attention_dim", 1280, n)),
        use_spatial_transformer=True,
        use_linear_in_transformer=bool(config.get("use_linear_projection", False)),
        use_scale_shift_norm=config.get("resnet_time_scale_shift", "default") == "scale_shift",
        dropout=float(config.get("dropout", 0.0)),
        num_classes=config.get("num_class_embeds"),
        norm_groups=int(config.get("norm_num_groups", 32)),
        legacy=False,
    )
    if isinstance(config.get("sample_size"), int):
        out["image_size"] = config["sample_size"]
    return out


def vae_config_from_diffusers(config: Mapping[str, Any]) -> dict:
    """ldm_jax autoencoder config (for autoencoder.from_config) of a diffusers AutoencoderKL.

    The latent scale (`scaling_factor`, 0.18215 for SD) belongs in the diffusion config's
    `scale_factor`, not here.
    """
    _check_class(config, "AutoencoderKL")
    _check_accepted(config, _VAE_ACCEPTED, "AutoencoderKL")
    base, mult = _channels(config, (64,))
    n = len(mult)
    for key, kind in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        types = list(config.get(key, [kind]))
        if types != [kind] * n:
            raise UserError(f"{key} {types}: ldm_jax's autoencoder has {n} x {kind}")
    latent = int(config.get("latent_channels", 4))
    size = config.get("sample_size", 32)
    return dict(
        type="kl",
        ch=base,
        ch_mult=mult,
        num_res_blocks=int(config.get("layers_per_block", 1)),
        attn_resolutions=(),
        dropout=0.0,
        in_channels=int(config.get("in_channels", 3)),
        out_ch=int(config.get("out_channels", 3)),
        resolution=int(size if isinstance(size, int) else size[0]),
        z_channels=latent,
        embed_dim=latent,
        double_z=True,
        attn_type="vanilla" if config.get("mid_block_add_attention", True) else "none",
        norm_groups=int(config.get("norm_num_groups", 32)),
    )


# diffusers' prediction_type -> ldm_jax's parameterization, and back
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_PREDICTION_TYPES = {v: k for k, v in _PREDICTIONS.items()}


def schedule_from_diffusers(config: Mapping[str, Any]) -> tuple[dict, str]:
    """(diffusion schedule settings, parameterization) of a diffusers scheduler config.
    diffusers' 'scaled_linear' betas are ldm_jax's (and CompVis') 'linear' schedule."""
    if config.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise UserError(
            f"scheduler beta_schedule {config['beta_schedule']!r}: Stable Diffusion uses "
            "'scaled_linear' (ldm_jax's 'linear'); other schedules are not imported."
        )
    prediction = _PREDICTIONS.get(config.get("prediction_type", "epsilon"))
    if prediction is None:
        raise UserError(
            f"prediction_type {config['prediction_type']!r}: use one of {sorted(_PREDICTIONS)}"
        )
    schedule = dict(
        beta_schedule="linear", linear_start=float(config.get("beta_start", 0.00085)),
        linear_end=float(config.get("beta_end", 0.012)),
        timesteps=int(config.get("num_train_timesteps", 1000)),
    )  # fmt: skip
    return schedule, prediction


# ----- the other way: ldm_jax configs -> diffusers config.json dicts -----------------------
def pipeline_index() -> dict:
    """model_index.json of an exported StableDiffusionPipeline folder: each component's
    library and class, with no safety checker or feature extractor (a run has neither)."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }  # fmt: skip


def scheduler_config_to_diffusers(diffusion: Mapping[str, Any]) -> dict:
    """diffusers DDIMScheduler config of a diffusion config's schedule settings (an x0
    run's prediction_type is diffusers' 'sample')."""
    if diffusion.get("beta_schedule", "linear") != "linear":
        raise UserError(
            f"beta_schedule {diffusion['beta_schedule']!r} has no diffusers scheduler here: "
            "only the linear (diffusers' scaled_linear) schedule is exported."
        )
    return {
        "_class_name": "DDIMScheduler",
        "beta_start": diffusion["linear_start"], "beta_end": diffusion["linear_end"],
        "beta_schedule": "scaled_linear", "num_train_timesteps": diffusion["timesteps"],
        "prediction_type": _PREDICTION_TYPES[diffusion["parameterization"]],
        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    }  # fmt: skip


def unet_config_to_diffusers(unet: Mapping[str, Any]) -> dict:
    """diffusers UNet2DConditionModel config of an ldm_jax SD-style UNet config (with
    in/out channels and context_dim filled in)."""
    mult = [int(m) for m in unet["channel_mult"]]
    base, n = int(unet["model_channels"]), len(mult)
    channels = [base * m for m in mult]
    levels = {i for i in range(n) if 2**i in tuple(unet["attention_resolutions"])}
    if unet.get("num_head_channels", -1) not in (-1, None):
        heads = [c // int(unet["num_head_channels"]) for c in channels]
    else:
        heads = [int(unet["num_heads"])] * n
    if not unet.get("use_spatial_transformer", False):
        raise UserError("only UNets with spatial transformers (SD-style) have a diffusers layout")
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": int(unet.get("image_size", 64)),
        "in_channels": int(unet["in_channels"]),
        "out_channels": int(unet["out_channels"]),
        "block_out_channels": channels,
        "layers_per_block": int(unet["num_res_blocks"]),
        "down_block_types": [_CROSS_DOWN if i in levels else _PLAIN_DOWN for i in range(n)],
        "up_block_types": [_CROSS_UP if i in levels else _PLAIN_UP for i in reversed(range(n))],
        "cross_attention_dim": int(unet["context_dim"]),
        "attention_head_dim": heads,
        "use_linear_projection": bool(unet.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": int(unet.get("transformer_depth", 1)),
        "norm_num_groups": int(unet.get("norm_groups", 32)),
        "resnet_time_scale_shift": (
            "scale_shift" if unet.get("use_scale_shift_norm", False) else "default"
        ),
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def vae_config_to_diffusers(vae: Mapping[str, Any], scaling_factor: float) -> dict:
    """diffusers AutoencoderKL config of an ldm_jax KL autoencoder config."""
    if vae.get("type", "kl") != "kl" or tuple(vae.get("attn_resolutions", ())):
        raise UserError("only KL autoencoders without level attention have a diffusers layout")
    n = len(vae["ch_mult"])
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": int(vae["in_channels"]),
        "out_channels": int(vae["out_ch"]),
        "block_out_channels": [int(vae["ch"]) * int(m) for m in vae["ch_mult"]],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": int(vae["num_res_blocks"]),
        "latent_channels": int(vae["embed_dim"]),
        "norm_num_groups": int(vae.get("norm_groups", 32)),
        "sample_size": int(vae.get("resolution", 256)),
        "scaling_factor": float(scaling_factor),
        "mid_block_add_attention": vae.get("attn_type", "vanilla") != "none",
    }


def clip_config_to_transformers(clip: Mapping[str, Any]) -> dict:
    """transformers CLIPTextConfig dict of a CLIPTextEncoder's fields (its built layers)."""
    layers = int(clip["num_layers"]) - (clip.get("output", "last") == "penultimate")
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": int(clip["width"]),
        "num_hidden_layers": layers,
        "num_attention_heads": int(clip["num_heads"]),
        "intermediate_size": int(clip.get("mlp_dim") or 4 * int(clip["width"])),
        "vocab_size": int(clip["vocab_size"]),
        "max_position_embeddings": int(clip["context_length"]),
        "hidden_act": clip["activation"],
        "layer_norm_eps": float(clip.get("layer_norm_eps", 1e-5)),
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
        "projection_dim": int(clip["width"]),
    }
