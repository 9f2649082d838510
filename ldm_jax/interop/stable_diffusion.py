"""Stable Diffusion releases <-> ldm_jax runs.

Import reads a CompVis / Stability single file (`.safetensors`, `.ckpt`) of SD 1.x or 2.x,
or a diffusers folder (`unet/`, `vae/`, `text_encoder/`, `scheduler/`, `tokenizer/`), into
an `ImportedModel` (configs + params), which `write_run` turns into an ordinary ldm_jax
diffusion run directory:

    <workdir>/first_stage/checkpoints/0   the VAE as a first stage (its params only)
    <workdir>/text_encoder.safetensors   the CLIP text encoder (ldm_jax naming)
    <workdir>/checkpoints/0              the UNet at step 0: params = EMA, fresh AdamW

so `ldm_jax.sample`, `ldm_jax.evaluate` and `ldm_jax.train` (fine-tuning) take it as they
take any run. The architecture comes from the original YAML config when given
(`original_config`), else from the release's preset, checked tensor by tensor; the CLIP
tower's shape is read from its tensors (64-wide heads, as every CLIP text tower).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping

import numpy as np

from ldm_jax.errors import UserError
from ldm_jax.interop import tensor_files

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # OpenAI CLIP (transformers)
SD2_CLIP_PREFIX = "cond_stage_model.model."  # OpenCLIP
SCALE_FACTOR = 0.18215
SD_SCHEDULE = dict(beta_schedule="linear", linear_start=0.00085, linear_end=0.012, timesteps=1000)
PARAMETERIZATIONS = ("eps", "v")
# openaimodel UNet arguments of a CompVis YAML that ldm_jax's UNet takes as they are.
_YAML_UNET_KEYS = (
    "in_channels", "out_channels", "model_channels", "attention_resolutions",
    "num_res_blocks", "channel_mult", "num_heads", "num_head_channels",
    "use_spatial_transformer", "transformer_depth", "context_dim",
    "use_linear_in_transformer", "legacy",
)  # fmt: skip


@dataclasses.dataclass
class ImportedModel:
    unet: dict  # UNet config (ldm_jax.models.unet_configs keys)
    unet_params: dict
    vae: dict  # autoencoder model config (config.model of an autoencoder run)
    vae_params: dict
    clip: dict  # CLIPTextEncoder fields
    clip_params: dict
    tokenizer: str  # "sd1" (pads with <|endoftext|>) or "sd2" (pads with 0)
    parameterization: str
    schedule: dict
    scale_factor: float
    image_size: int  # pixels
    source: str


def kl_f8_vae() -> dict:
    """The SD VAE's model config (configs/autoencoder/kl_f8.py)."""
    from ldm_jax import config_common

    c = config_common.autoencoder_config(
        kind="kl", embed_dim=4, ch_mult=(1, 2, 4, 4), attn_resolutions=()
    )
    return c.model.to_dict()


# ----- architecture -----------------------------------------------------------------------
def _clip_fields(state: Mapping[str, np.ndarray], variant: str) -> dict:
    """CLIPTextEncoder fields from the text tower's tensors in a single file."""
    if variant == "sd1":
        p = SD1_CLIP_PREFIX
        vocab, width = state[p + "embeddings.token_embedding.weight"].shape
        context = state[p + "embeddings.position_embedding.weight"].shape[0]
        mlp = state[p + "encoder.layers.0.mlp.fc1.weight"].shape[0]
        layer_keys = [k for k in state if k.startswith(p + "encoder.layers.")]
        layers = 1 + max(int(k[len(p + "encoder.layers.") :].split(".")[0]) for k in layer_keys)
        act, output = "quick_gelu", "last"
    else:
        p = SD2_CLIP_PREFIX
        vocab, width = state[p + "token_embedding.weight"].shape
        context = state[p + "positional_embedding"].shape[0]
        mlp = state[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
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
        root = yaml.safe_load(pathlib.Path(path).read_text())["model"]["params"]
        unet_p = dict(root["unet_config"]["params"])
        dd = dict(root["first_stage_config"]["params"]["ddconfig"])
        embed_dim = int(root["first_stage_config"]["params"]["embed_dim"])
    except (OSError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a CompVis LatentDiffusion config ({e!r})") from e
    unet = {k: unet_p[k] for k in _YAML_UNET_KEYS if k in unet_p}
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
    from ldm_jax.interop import unet_weights, vae_weights
    from ldm_jax.models import clip, unet_configs

    state = tensor_files.load_state_dict(path)
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
        clip_params = clip.convert_hf_clip(state, encoder, prefix=SD1_CLIP_PREFIX)
    else:
        clip_params = clip.convert_open_clip(state, encoder, prefix=SD2_CLIP_PREFIX)
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


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} is missing: not a diffusers Stable Diffusion folder")
    return json.loads(path.read_text())


def _weights_in(folder: pathlib.Path) -> pathlib.Path:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.bin", "pytorch_model.bin"):  # fmt: skip
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder} holds no weights file (diffusion_pytorch_model.safetensors, ...)")


def from_diffusers(path, *, image_size: int | None = None) -> ImportedModel:
    """A diffusers Stable Diffusion folder -> ImportedModel."""
    from ldm_jax.interop import diffusers_config, unet_weights, vae_weights
    from ldm_jax.models import clip

    root = pathlib.Path(path)
    unet_cfg = diffusers_config.unet_config_from_diffusers(_read_json(root / "unet/config.json"))
    vae_json = _read_json(root / "vae/config.json")
    vae_cfg = kl_f8_vae() | diffusers_config.vae_config_from_diffusers(vae_json)
    text_json = _read_json(root / "text_encoder/config.json")
    encoder = clip.clip_from_hf_config(text_json)
    sched = _read_json(root / "scheduler/scheduler_config.json")
    if sched.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise UserError(
            f"scheduler beta_schedule {sched['beta_schedule']!r}: Stable Diffusion uses "
            "'scaled_linear' (ldm_jax's 'linear'); other schedules are not imported."
        )
    prediction = {"epsilon": "eps", "v_prediction": "v"}.get(
        sched.get("prediction_type", "epsilon")
    )
    if prediction is None:
        raise UserError(
            f"prediction_type {sched['prediction_type']!r}: use epsilon or v_prediction"
        )
    pad = tokenizer_padding(root / "tokenizer")
    unet = unet_weights.unet_from_diffusers(
        tensor_files.load_state_dict(_weights_in(root / "unet")), _unet_model(unet_cfg)
    )
    vae = vae_weights.vae_from_diffusers(
        tensor_files.load_state_dict(_weights_in(root / "vae")), _vae_model(vae_cfg)
    )
    text = clip.convert_hf_clip(
        tensor_files.load_state_dict(_weights_in(root / "text_encoder")), encoder
    )
    clip_cfg = {f.name: getattr(encoder, f.name) for f in dataclasses.fields(encoder)
                if f.name in ("width", "num_layers", "num_heads", "mlp_dim", "vocab_size",
                              "context_length", "activation", "output", "layer_norm_eps")}  # fmt: skip
    schedule = dict(
        beta_schedule="linear", linear_start=float(sched.get("beta_start", 0.00085)),
        linear_end=float(sched.get("beta_end", 0.012)),
        timesteps=int(sched.get("num_train_timesteps", 1000)),
    )  # fmt: skip
    factor = 2 ** (len(vae_cfg["ch_mult"]) - 1)
    return ImportedModel(
        unet=unet_cfg, unet_params=unet["params"], vae=vae_cfg, vae_params=vae["params"],
        clip=clip_cfg, clip_params=text["params"], tokenizer=pad, parameterization=prediction,
        schedule=schedule, scale_factor=float(vae_json.get("scaling_factor", SCALE_FACTOR)),
        image_size=int(image_size or unet_cfg.get("image_size", 64) * factor), source=str(root),
    )  # fmt: skip


def tokenizer_padding(folder: pathlib.Path) -> str:
    """'sd1' or 'sd2': the CLIP padding of a diffusers `tokenizer/` folder. The pad token
    sits in `tokenizer_config.json` (what current transformers writes) and, in older
    folders, in `special_tokens_map.json`, which overrides it as transformers' loader
    does; neither file (or no pad token) means CLIP's default, <|endoftext|>."""
    from ldm_jax.models import clip_tokenizer

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


# ----- an ldm_jax run ---------------------------------------------------------------------
# UNet fields the diffusion task derives itself (from the first stage and the conditioner).
_DERIVED = ("in_channels", "out_channels", "context_dim", "image_size", "num_classes")


def run_config(model: ImportedModel, workdir):
    """The diffusion config of an imported model living in `workdir`."""
    from ldm_jax import config_common

    workdir = pathlib.Path(workdir).absolute()
    c = config_common.diffusion_config(
        first_stage_workdir=str(workdir / "first_stage"),
        model_channels=model.unet["model_channels"],
        channel_mult=tuple(model.unet["channel_mult"]),
        attention_resolutions=tuple(model.unet["attention_resolutions"]),
    )
    for key, value in model.unet.items():
        if key not in _DERIVED and value is not None:
            c.model[key] = tuple(value) if isinstance(value, list) else value
    # One of the two head settings is the model's; the other must not linger from the
    # defaults (heads do not change any shape, so a wrong count would load silently).
    c.model.num_heads = int(model.unet.get("num_heads", -1))
    c.model.num_head_channels = int(model.unet.get("num_head_channels", -1))
    c.conditioning_key = "crossattn"
    c.cond.kind = "clip"
    c.cond.max_length = model.clip["context_length"]
    c.cond.drop_rate = 0.1  # for fine-tuning with classifier-free guidance
    with c.cond.unlocked():
        c.cond.clip = dict(model.clip)
        c.cond.tokenizer = model.tokenizer
        c.cond.weights = str(workdir / "text_encoder.safetensors")
    c.diffusion.update(model.schedule)
    c.diffusion.parameterization = model.parameterization
    c.diffusion.scale_factor = model.scale_factor
    c.diffusion.scale_by_std = False
    c.data.image_size = model.image_size
    c.data.resize = model.image_size
    c.sampling.update(dict(sampler="ddim", steps=50, eta=0.0, guidance_scale=7.5))
    c.optim.base_learning_rate = 1.0e-4
    c.optim.scale_lr = False
    c.ema.decay = 0.9999
    with c.unlocked():
        c.imported_from = model.source
    return c


def _first_stage_config(model: ImportedModel):
    from ldm_jax import config_common

    c = config_common.autoencoder_config(
        kind="kl", embed_dim=model.vae["embed_dim"], ch_mult=tuple(model.vae["ch_mult"]),
        attn_resolutions=tuple(model.vae["attn_resolutions"]),
    )  # fmt: skip
    c.model.update({k: tuple(v) if isinstance(v, list) else v for k, v in model.vae.items()})
    with c.unlocked():
        c.imported_from = model.source
    return c


def write_run(model: ImportedModel, workdir) -> pathlib.Path:
    """Writes the run directory described in this module's docstring; refuses a workdir
    that already holds checkpoints (nothing is overwritten)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from ldm_jax.training import checkpoint as ckpt_lib
    from ldm_jax.training.diffusion import DiffusionState, DiffusionTask

    workdir = pathlib.Path(workdir).absolute()
    for sub in ("checkpoints", "first_stage", "text_encoder.safetensors"):
        if (workdir / sub).exists():
            raise UserError(
                f"{workdir / sub} exists: import into a new --workdir (nothing was changed)."
            )
    workdir.mkdir(parents=True, exist_ok=True)
    config = run_config(model, workdir)
    # The first stage: its params only (no discriminator or optimizer was released).
    fs = ckpt_lib.Checkpointer(workdir / "first_stage" / "checkpoints", keep=1, async_save=False)
    fs.save(0, {"gen_params": {"model": model.vae_params}}, {}, _first_stage_config(model))
    fs.close()
    tensor_files.save_params(workdir / "text_encoder.safetensors", model.clip_params)

    task = DiffusionTask(config)
    params = {"unet": model.unet_params, "cond": {}}
    want = jax.eval_shape(task.init_state, jax.random.PRNGKey(0))
    have = jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype)), params["unet"])
    expect = jax.tree.map(
        lambda a: (tuple(a.shape), np.dtype(a.dtype)), nn.unbox(want.params["unet"])
    )
    if have != expect:
        raise UserError("the converted UNet does not match the run's UNet (internal error)")
    state = DiffusionState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=task.tx.init(params),
        ema_params=model.unet_params,
        scale_factor=jnp.asarray(model.scale_factor, jnp.float32),
        bad_step=-jnp.ones((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
    )
    data_state = {"next_batch": 0, "seed": config.seed, "global_batch_size": config.batch_size}
    run = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=3, async_save=False)
    run.save(0, state, data_state, config, force=True)
    run.close()
    return workdir


# ----- export -----------------------------------------------------------------------------
EXPORT_LAYOUTS = ("ldm_jax", "msgpack", "compvis", "diffusers")


def _compvis_yaml(config, unet_cfg, fs: dict) -> dict:
    """A CompVis inference YAML (as a dict) describing an exported run: `from_single_file`
    reads it back with `original_config`."""
    d = config.diffusion
    return {
        "model": {
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": d.linear_start, "linear_end": d.linear_end,
                "timesteps": d.timesteps, "parameterization": d.parameterization,
                "scale_factor": float(d.scale_factor), "image_size": int(unet_cfg["image_size"]),
                "channels": int(unet_cfg["in_channels"]),
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": {k: _plain(unet_cfg[k]) for k in _YAML_UNET_KEYS if k in unet_cfg},
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


def _run_parts(workdir, step: int):
    import jax

    from ldm_jax.training.restore import load_run

    config, task, state, step = load_run(workdir, step, stage="diffusion")
    parts = {
        "unet": jax.device_get(state.ema_params),
        "vae": jax.device_get(task.first_stage.load_params()),
    }
    if task.cond.kind == "clip":
        parts["text_encoder"] = task.cond.frozen_params()["text_encoder"]
    elif task.cond.trainable:
        parts["cond"] = jax.device_get(state.params["cond"])
    return config, task, parts, step


def export_run(workdir, layout: str, out, step: int = -1) -> pathlib.Path:
    """A diffusion run's EMA UNet, first stage and text encoder in one of EXPORT_LAYOUTS:
    ldm_jax (.safetensors, names `unet/...`, `vae/...`, `text_encoder/...`), msgpack, a
    CompVis single file (+ its inference YAML), or a diffusers folder."""
    from ldm_jax.interop import diffusers_config, unet_weights, vae_weights
    from ldm_jax.models import clip

    if layout not in EXPORT_LAYOUTS:
        raise UserError(f"layout {layout!r}: use one of {list(EXPORT_LAYOUTS)}")
    out = pathlib.Path(out).absolute()
    if out.exists():
        raise UserError(f"{out} exists: export to a new path (nothing was changed).")
    config, task, parts, step = _run_parts(workdir, step)
    settings = json.loads(config.to_json())
    if layout in ("ldm_jax", "msgpack"):
        suffix = ".safetensors" if layout == "ldm_jax" else ".msgpack"
        if out.suffix != suffix:
            raise UserError(f"--layout {layout} writes a {suffix} file; name --out accordingly")
        out.parent.mkdir(parents=True, exist_ok=True)
        tensor_files.save_params(
            out, parts, {"config": json.dumps(settings)} if suffix != ".msgpack" else None
        )
        out.with_suffix(".json").write_text(json.dumps(settings, indent=2) + "\n")
        return out
    unet_cfg = dict(task._unet_cfg().to_dict())
    unet_cfg.setdefault("image_size", task.latent_size)
    text = parts.get("text_encoder")
    if task.cond.kind == "clip" and task.cond.module.output != "last":
        if layout == "compvis":
            raise UserError(
                "an SD 2.x (OpenCLIP, penultimate) text encoder has no CompVis export here: its "
                "unused last block is not kept; export --layout diffusers instead."
            )
    if layout == "compvis":
        if out.suffix != ".safetensors":
            raise UserError("--layout compvis writes one .safetensors file; name --out accordingly")
        tensors = unet_weights.unet_to_compvis(parts["unet"], task.unet, prefix=UNET_PREFIX)
        tensors |= vae_weights.vae_to_compvis(
            parts["vae"], task.first_stage.model, prefix=VAE_PREFIX
        )
        if text is not None:
            tensors |= clip.export_hf_clip(text, prefix=SD1_CLIP_PREFIX)
        out.parent.mkdir(parents=True, exist_ok=True)
        tensor_files.save_safetensors(out, tensors)
        import yaml

        yaml_path = out.with_suffix(".yaml")
        yaml_path.write_text(
            yaml.safe_dump(
                _compvis_yaml(config, unet_cfg, task.first_stage.model_cfg.to_dict()),
                sort_keys=False,
            )
        )
        return out
    # diffusers
    if task.cond.kind != "clip":
        raise UserError("--layout diffusers needs a CLIP-conditioned (Stable Diffusion) run")
    sched = {
        "_class_name": "DDIMScheduler",
        "beta_start": config.diffusion.linear_start, "beta_end": config.diffusion.linear_end,
        "beta_schedule": "scaled_linear", "num_train_timesteps": config.diffusion.timesteps,
        "prediction_type": "v_prediction" if config.diffusion.parameterization == "v" else "epsilon",
        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    }  # fmt: skip
    files = {
        "unet/config.json": diffusers_config.unet_config_to_diffusers(unet_cfg),
        "vae/config.json": diffusers_config.vae_config_to_diffusers(
            task.first_stage.model_cfg.to_dict(), float(config.diffusion.scale_factor)
        ),
        "text_encoder/config.json": diffusers_config.clip_config_to_transformers(
            dict(config.cond.clip)
        ),
        "scheduler/scheduler_config.json": sched,
    }
    # Vocabulary, merges and pad token, as transformers itself writes a tokenizer folder.
    task.cond.tokenizer.save_pretrained(out / "tokenizer")
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    tensor_files.save_safetensors(
        out / "unet/diffusion_pytorch_model.safetensors",
        unet_weights.unet_to_diffusers(parts["unet"], task.unet),
    )
    tensor_files.save_safetensors(
        out / "vae/diffusion_pytorch_model.safetensors",
        vae_weights.vae_to_diffusers(parts["vae"], task.first_stage.model),
    )
    tensor_files.save_safetensors(
        out / "text_encoder/model.safetensors", clip.export_hf_clip(text, prefix="text_model.")
    )
    return out
