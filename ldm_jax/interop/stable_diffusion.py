"""Stable Diffusion releases -> ImportedModel, and the inference YAML of an ldm_jax model.

Import reads a CompVis / Stability single file (`.safetensors`, `.ckpt`) of SD 1.x or 2.x,
or a diffusers folder (`unet/`, `vae/`, `text_encoder/`, `scheduler/`, `tokenizer/`), into
an `ImportedModel` (configs + params), which `ldm_jax.import_sd` writes as an ordinary
ldm_jax diffusion run (`ldm_jax.export` writes runs back in these layouts). The architecture
comes from the original YAML config when given (`original_config`), else from the
release's preset, checked tensor by tensor; the CLIP tower's shape is read from its
tensors (64-wide heads, as every CLIP text tower). `compvis_yaml` writes the inference
YAML that `original_config` reads back. Every path may be local or a URL (gs://...,
through `ldm_jax.storage`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from ldm_jax import storage
from ldm_jax.errors import UserError
from ldm_jax.interop import tensor_files

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # OpenAI CLIP (transformers)
SD2_CLIP_PREFIX = "cond_stage_model.model."  # OpenCLIP
SCALE_FACTOR = 0.18215
SD_SCHEDULE = dict(beta_schedule="linear", linear_start=0.00085, linear_end=0.012, timesteps=1000)
PARAMETERIZATIONS = ("eps", "v")
# The KL-f8 autoencoder of every SD 1.x / 2.x release (keys of an autoencoder config.model).
SD_VAE = dict(
    type="kl", ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(),
    attn_type="vanilla", dropout=0.0, in_channels=3, out_ch=3, resolution=256,
    z_channels=4, embed_dim=4, double_z=True, norm_groups=32,
)  # fmt: skip
# openaimodel UNet arguments of a CompVis YAML that ldm_jax's UNet takes as they are.
YAML_UNET_KEYS = (
    "in_channels", "out_channels", "model_channels", "attention_resolutions",
    "num_res_blocks", "channel_mult", "num_heads", "num_head_channels",
    "use_spatial_transformer", "transformer_depth", "context_dim",
    "use_linear_in_transformer", "legacy",
)  # fmt: skip


@dataclasses.dataclass
class ImportedModel:
    unet: dict  # UNet config (ldm_jax.models.unet_configs keys)
    unet_params: dict
    vae: dict  # autoencoder architecture (keys of an autoencoder run's config.model)
    vae_params: dict
    clip: dict  # CLIPTextEncoder fields
    clip_params: dict
    tokenizer: str  # "sd1" (pads with <|endoftext|>) or "sd2" (pads with 0)
    parameterization: str
    schedule: dict
    scale_factor: float
    image_size: int  # pixels
    source: str
    # The folder's own tokenizer where it is not the built-in CLIP BPE with `tokenizer`'s
    # padding (e.g. tokens added by textual inversion); None where it is.
    own_tokenizer: Any = None


def kl_f8_vae() -> dict:
    """The SD VAE's architecture (configs/autoencoder/kl_f8.py's), the base that a YAML's
    or a diffusers folder's fields override."""
    return dict(SD_VAE)


# ----- architecture -----------------------------------------------------------------------
def _clip_fields(state: Mapping[str, np.ndarray], variant: str) -> dict:
    """CLIPTextEncoder fields from the text tower's tensors in a single file."""
    shape = lambda name: tensor_files.shape_of(state, name)  # noqa: E731 - read no tensor
    if variant == "sd1":
        p = SD1_CLIP_PREFIX
        vocab, width = shape(p + "embeddings.token_embedding.weight")
        context = shape(p + "embeddings.position_embedding.weight")[0]
        mlp = shape(p + "encoder.layers.0.mlp.fc1.weight")[0]
        layer_keys = [k for k in state if k.startswith(p + "encoder.layers.")]
        layers = 1 + max(int(k[len(p + "encoder.layers.") :].split(".")[0]) for k in layer_keys)
        act, output = "quick_gelu", "last"
    else:
        p = SD2_CLIP_PREFIX
        vocab, width = shape(p + "token_embedding.weight")
        context = shape(p + "positional_embedding")[0]
        mlp = shape(p + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        block_keys = [k for k in state if k.startswith(p + "transformer.resblocks.")]
        start = len(p + "transformer.resblocks.")
        layers = 1 + max(int(k[start:].split(".")[0]) for k in block_keys)
        act, output = "gelu", "penultimate"
    if width % 64:
        raise UserError(f"CLIP text width {width} is not a multiple of its 64-wide heads")
    return dict(
        width=int(width), num_layers=int(layers), num_heads=int(width) // 64, mlp_dim=int(mlp),
        vocab_size=int(vocab), context_length=int(context), activation=act, output=output,
    )  # fmt: skip


def _from_yaml(path) -> dict:
    """UNet / VAE configs and schedule settings of a CompVis inference YAML."""
    import yaml

    try:
        root = yaml.safe_load(storage.path(path).read_text())["model"]["params"]
        unet_p = dict(root["unet_config"]["params"])
        dd = dict(root["first_stage_config"]["params"]["ddconfig"])
        embed_dim = int(root["first_stage_config"]["params"]["embed_dim"])
    except (OSError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a CompVis LatentDiffusion config ({e!r})") from e
    unet = {k: unet_p[k] for k in YAML_UNET_KEYS if k in unet_p}
    unet["image_size"] = int(root.get("image_size", 64))
    vae = kl_f8_vae() | {
        "ch": int(dd["ch"]), "ch_mult": tuple(dd["ch_mult"]),
        "num_res_blocks": int(dd["num_res_blocks"]),
        "attn_resolutions": tuple(dd.get("attn_resolutions", ())),
        "in_channels": int(dd["in_channels"]), "out_ch": int(dd["out_ch"]),
        "resolution": int(dd["resolution"]), "z_channels": int(dd["z_channels"]),
        "embed_dim": embed_dim,
    }  # fmt: skip
    schedule = dict(
        beta_schedule="linear",
        linear_start=float(root.get("linear_start", SD_SCHEDULE["linear_start"])),
        linear_end=float(root.get("linear_end", SD_SCHEDULE["linear_end"])),
        timesteps=int(root.get("timesteps", 1000)),
    )
    return dict(
        unet=unet, vae=vae, schedule=schedule,
        parameterization=root.get("parameterization", "eps"),
        scale_factor=float(root.get("scale_factor", SCALE_FACTOR)),
    )  # fmt: skip


def _check_parameterization(value) -> str:
    if value not in PARAMETERIZATIONS:
        raise UserError(f"parameterization {value!r}: use one of {list(PARAMETERIZATIONS)}")
    return value


def _unet_model(cfg: dict):
    from ldm_jax.models import unet_configs

    return unet_configs.from_config({k: v for k, v in cfg.items()})


def _vae_model(cfg: dict):
    import ml_collections

    from ldm_jax.models import autoencoder

    return autoencoder.from_config(ml_collections.ConfigDict(cfg))


def from_single_file(
    path, *, parameterization: str | None = None, original_config=None,
    image_size: int | None = None,
) -> ImportedModel:  # fmt: skip
    """An SD 1.x / 2.x single-file checkpoint -> ImportedModel. SD 2.x exists as eps
    (512-base) and v (768-v) models that the weights cannot tell apart: without the
    original YAML, `parameterization` is required for them."""
    with tensor_files.open_state_dict(path) as state:  # tensors read as they are converted
        return _from_single_state(state, path, parameterization, original_config, image_size)


def _from_single_state(state, path, parameterization, original_config, image_size):
    from ldm_jax.interop import clip_weights, unet_weights, vae_weights
    from ldm_jax.models import clip, unet_configs

    if any(k.startswith(SD2_CLIP_PREFIX + "transformer.") for k in state):
        variant = "sd2"
    elif any(k.startswith(SD1_CLIP_PREFIX) for k in state):
        variant = "sd1"
    else:
        raise UserError(
            f"{path} holds no SD text encoder (no {SD1_CLIP_PREFIX!r} or {SD2_CLIP_PREFIX!r} "
            "tensors): not a Stable Diffusion 1.x / 2.x single-file checkpoint."
        )
    if original_config is not None:
        found = _from_yaml(original_config)
        if parameterization is not None:
            found["parameterization"] = parameterization
    else:
        if variant == "sd2" and parameterization is None:
            raise UserError(
                "SD 2.x checkpoints come as eps (512-base) and v-prediction (768-v) models; "
                "pass --parameterization eps or v (or --original_config with its YAML)."
            )
        preset = unet_configs.PAPER_UNETS["sd-v1" if variant == "sd1" else "sd-v2"]
        found = dict(
            unet=dict(preset), vae=kl_f8_vae(), schedule=dict(SD_SCHEDULE),
            parameterization=parameterization or "eps", scale_factor=SCALE_FACTOR,
        )  # fmt: skip
    param = _check_parameterization(found["parameterization"])
    clip_cfg = _clip_fields(state, variant)
    found["unet"]["context_dim"] = clip_cfg["width"]
    encoder = clip.CLIPTextEncoder(**clip_cfg)
    if variant == "sd1":
        clip_params = clip_weights.convert_hf_clip(state, encoder, prefix=SD1_CLIP_PREFIX)
    else:
        clip_params = clip_weights.convert_open_clip(state, encoder, prefix=SD2_CLIP_PREFIX)
    unet = unet_weights.unet_from_compvis(state, _unet_model(found["unet"]), prefix=UNET_PREFIX)
    vae = vae_weights.vae_from_compvis(state, _vae_model(found["vae"]), prefix=VAE_PREFIX)
    if image_size is None:  # SD 2's v model is the 768 px one
        image_size = 768 if (variant == "sd2" and param == "v") else 512
    return ImportedModel(
        unet=found["unet"], unet_params=unet["params"], vae=found["vae"],
        vae_params=vae["params"], clip=clip_cfg, clip_params=clip_params["params"],
        tokenizer=variant, parameterization=param, schedule=found["schedule"],
        scale_factor=found["scale_factor"], image_size=int(image_size), source=str(path),
    )  # fmt: skip


def _read_json(path: storage.Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} is missing: not a diffusers Stable Diffusion folder")
    return json.loads(path.read_text())


def _weights_in(folder: storage.Path) -> storage.Path:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.bin", "pytorch_model.bin"):  # fmt: skip
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder} holds no weights file (diffusion_pytorch_model.safetensors, ...)")


def from_diffusers(path, *, image_size: int | None = None) -> ImportedModel:
    """A diffusers Stable Diffusion folder -> ImportedModel."""
    from ldm_jax.interop import clip_weights, diffusers_config, unet_weights, vae_weights

    root = storage.path(path)
    unet_cfg = diffusers_config.unet_config_from_diffusers(_read_json(root / "unet/config.json"))
    vae_json = _read_json(root / "vae/config.json")
    vae_cfg = kl_f8_vae() | diffusers_config.vae_config_from_diffusers(vae_json)
    text_json = _read_json(root / "text_encoder/config.json")
    encoder = clip_weights.clip_from_hf_config(text_json)
    schedule, prediction = diffusers_config.schedule_from_diffusers(
        _read_json(root / "scheduler/scheduler_config.json")
    )
    pad = tokenizer_padding(root / "tokenizer")
    own_tokenizer = folder_tokenizer(root / "tokenizer", pad, encoder.vocab_size)
    # Each file's tensors are read one at a time as they are converted.
    with tensor_files.open_state_dict(_weights_in(root / "unet")) as state:
        unet = unet_weights.unet_from_diffusers(state, _unet_model(unet_cfg))
    with tensor_files.open_state_dict(_weights_in(root / "vae")) as state:
        vae = vae_weights.vae_from_diffusers(state, _vae_model(vae_cfg))
    with tensor_files.open_state_dict(_weights_in(root / "text_encoder")) as state:
        text = clip_weights.convert_hf_clip(state, encoder)
    clip_cfg = {f.name: getattr(encoder, f.name) for f in dataclasses.fields(encoder)
                if f.name in ("width", "num_layers", "num_heads", "mlp_dim", "vocab_size",
                              "context_length", "activation", "output", "layer_norm_eps")}  # fmt: skip
    factor = 2 ** (len(vae_cfg["ch_mult"]) - 1)
    return ImportedModel(
        unet=unet_cfg, unet_params=unet["params"], vae=vae_cfg, vae_params=vae["params"],
        clip=clip_cfg, clip_params=text["params"], tokenizer=pad, parameterization=prediction,
        schedule=schedule, scale_factor=float(vae_json.get("scaling_factor", SCALE_FACTOR)),
        image_size=int(image_size or unet_cfg.get("image_size", 64) * factor), source=str(root),
        own_tokenizer=own_tokenizer,
    )  # fmt: skip


def load_tokenizer_folder(folder):
    """transformers' CLIPTokenizer from a tokenizer folder's files (tokenizer.json, or
    vocab.json and merges.txt), local or remote (its few small files copied locally)."""
    from transformers import CLIPTokenizer

    folder = storage.path(folder)
    if not storage.is_remote(folder):
        return CLIPTokenizer.from_pretrained(os.fspath(folder))
    with tempfile.TemporaryDirectory() as local:
        for item in folder.iterdir():
            if item.is_file():
                (pathlib.Path(local) / item.name).write_bytes(item.read_bytes())
        return CLIPTokenizer.from_pretrained(local)


def folder_tokenizer(folder, variant: str, vocab_size: int):
    """The tokenizer of a diffusers `tokenizer/` folder when it differs from the built-in
    CLIP BPE padded as `variant` (more tokens, other merges); None when it is the same or
    the folder has no vocabulary (the built-in one is then used)."""
    from ldm_jax.models import clip_tokenizer

    folder = storage.path(folder)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        return None
    own = load_tokenizer_folder(folder)
    if _vocabulary(own) == _vocabulary(clip_tokenizer.clip_tokenizer(variant)):
        return None
    if len(own) > vocab_size:
        raise UserError(
            f"{folder} holds {len(own)} tokens but the text encoder embeds {vocab_size}: "
            "the tokenizer and text_encoder/ are from different models."
        )
    return own


def _vocabulary(tokenizer) -> tuple:
    """What decides a tokenizer's ids: its tokens (added ones included) and BPE merges."""
    from ldm_jax.models import clip_tokenizer

    return sorted(tokenizer.get_vocab().items()), clip_tokenizer.bpe_tables(tokenizer)[1]


def tokenizer_padding(folder) -> str:
    """'sd1' or 'sd2': the CLIP padding of a diffusers `tokenizer/` folder. The pad token
    sits in `tokenizer_config.json` (what current transformers writes) and, in older
    folders, in `special_tokens_map.json`, which overrides it as transformers' loader
    does; neither file (or no pad token) means CLIP's default, <|endoftext|>."""
    from ldm_jax.models import clip_tokenizer

    folder = storage.path(folder)
    token = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            value = _read_json(path).get("pad_token")
            token = (value.get("content") if isinstance(value, dict) else value) or token
    variants = {pad: variant for variant, pad in clip_tokenizer.PAD_TOKENS.items()}
    if token is not None and token not in variants:
        raise UserError(
            f"{folder}: pad token {token!r} is neither SD 1's {clip_tokenizer.EOS!r} nor SD 2's "
            "'!'; ldm_jax imports those two CLIP paddings only."
        )
    return variants.get(token, "sd1")


# ----- the other way: an ldm_jax model's CompVis inference YAML ---------------------------
def compvis_yaml(diffusion, unet_cfg: dict, fs: dict) -> dict:
    """A CompVis inference YAML (as a dict) of a diffusion config's schedule settings
    (`diffusion`), its UNet config (channels and image_size filled in) and its first
    stage's model config: `from_single_file` reads it back with `original_config`."""
    d = diffusion
    return {
        "model": {
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": d["linear_start"], "linear_end": d["linear_end"],
                "timesteps": d["timesteps"], "parameterization": d["parameterization"],
                "scale_factor": float(d["scale_factor"]), "image_size": int(unet_cfg["image_size"]),
                "channels": int(unet_cfg["in_channels"]),
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": {k: _plain(unet_cfg[k]) for k in YAML_UNET_KEYS if k in unet_cfg},
                },
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {
                        "embed_dim": fs["embed_dim"],
                        "ddconfig": {
                            "double_z": True, "z_channels": fs["z_channels"],
                            "resolution": fs["resolution"], "in_channels": fs["in_channels"],
                            "out_ch": fs["out_ch"], "ch": fs["ch"],
                            "ch_mult": list(fs["ch_mult"]),
                            "num_res_blocks": fs["num_res_blocks"],
                            "attn_resolutions": list(fs["attn_resolutions"]), "dropout": 0.0,
                        },
                    },
                },
                "cond_stage_config": {
                    "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
                },
            },
        }
    }  # fmt: skip


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
