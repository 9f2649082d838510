"""Stable Diffusion releases as ldm_jax runs, and runs exported back to release layouts.

`write_run` turns an `ImportedModel` (read by `ldm_jax.interop.stable_diffusion`) into an
ordinary ldm_jax diffusion run directory:

    <workdir>/first_stage/checkpoints/0   the VAE as a first stage (its params only)
    <workdir>/text_encoder.safetensors   the CLIP text encoder (ldm_jax naming)
    <workdir>/checkpoints/0              the UNet at step 0: params = EMA, fresh AdamW

so `ldm_jax.sample`, `ldm_jax.evaluate` and `ldm_jax.train` (fine-tuning) take it as they
take any run. `export_run` writes a diffusion run's EMA UNet, first stage and text
encoder in one of EXPORT_LAYOUTS. Each piece of a run is made by its owner (the diffusion
task's step-0 state, the first stage's checkpoint, the data iterator's initial state);
the names and configs of the release layouts are converted by `ldm_jax.interop`.
Workdirs and exports may be local or URLs (gs://..., through `ldm_jax.storage`): files
that only a local writer makes (safetensors, the tokenizer folder) are written locally
and then renamed into place or uploaded (`storage.staged`).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import linen as nn

from ldm_jax import config_common, storage
from ldm_jax.data.pipeline import TrainIterator
from ldm_jax.errors import UserError
from ldm_jax.interop import clip_weights, diffusers_config, tensor_files, unet_weights, vae_weights
from ldm_jax.interop import stable_diffusion as sd
from ldm_jax.models import clip_tokenizer
from ldm_jax.training import checkpoint as ckpt_lib
from ldm_jax.training.diffusion import DiffusionTask
from ldm_jax.training.first_stage import FirstStage
from ldm_jax.training.restore import load_run

FIRST_STAGE = "first_stage"  # the imported VAE's autoencoder workdir, inside the run
TEXT_ENCODER = "text_encoder.safetensors"
TOKENIZER = "tokenizer"  # a folder's own tokenizer, where it has one (see write_run)
# UNet fields the diffusion task derives itself (from the first stage and the conditioner).
_DERIVED = ("in_channels", "out_channels", "context_dim", "image_size", "num_classes")


# ----- import: an ImportedModel as a run ---------------------------------------------------
def run_config(model: sd.ImportedModel, workdir):
    """The diffusion config of an imported model living in `workdir`."""
    workdir = storage.path(workdir)
    c = config_common.diffusion_config(
        first_stage_workdir=str(workdir / FIRST_STAGE),
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
        c.cond.weights = str(workdir / TEXT_ENCODER)
        c.cond.tokenizer_dir = str(workdir / TOKENIZER) if model.own_tokenizer else ""
    c.diffusion.update(model.schedule)
    c.diffusion.parameterization = model.parameterization
    c.diffusion.scale_factor = model.scale_factor
    c.diffusion.scale_by_std = False
    c.data.image_size = model.image_size
    c.data.resize = model.image_size
    # diffusers' grid: `--steps n` is n steps, as SD users expect.
    c.sampling.update(
        dict(sampler="ddim", steps=50, eta=0.0, spacing="leading", guidance_scale=7.5)
    )
    c.optim.base_learning_rate = 1.0e-4
    c.optim.scale_lr = False
    c.ema.decay = 0.9999
    with c.unlocked():
        c.imported_from = model.source
    return c


def _first_stage_config(model: sd.ImportedModel):
    """The autoencoder config that the imported VAE's checkpoint is written with."""
    c = config_common.autoencoder_config(
        kind="kl", embed_dim=model.vae["embed_dim"], ch_mult=tuple(model.vae["ch_mult"]),
        attn_resolutions=tuple(model.vae["attn_resolutions"]),
    )  # fmt: skip
    c.model.update({k: tuple(v) if isinstance(v, list) else v for k, v in model.vae.items()})
    with c.unlocked():
        c.imported_from = model.source
    return c


def _refuse_existing(workdir: storage.Path) -> None:
    for sub in ("checkpoints", FIRST_STAGE, TEXT_ENCODER):
        if (workdir / sub).exists():
            raise UserError(
                f"{workdir / sub} exists: import into a new --workdir (nothing was changed)."
            )


def _check_params(task: DiffusionTask, params: dict) -> None:
    """The converted params have the tree, shapes and dtypes of the run's own."""

    def spec(a):
        return tuple(a.shape), np.dtype(a.dtype)

    want = nn.unbox(jax.eval_shape(task.init_state, jax.random.PRNGKey(0)).params)
    have, want = jax.tree.map(spec, params), jax.tree.map(spec, want)
    if have != want:
        raise UserError(
            "the converted weights do not match the run's model (internal error): "
            f"{jax.tree.structure(have)} vs {jax.tree.structure(want)}"[:500]
        )


def write_run(model: sd.ImportedModel, workdir) -> storage.Path:
    """Writes the run directory described in this module's docstring; refuses a workdir
    that already holds checkpoints (nothing is overwritten)."""
    workdir = storage.path(workdir)
    _refuse_existing(workdir)
    if not storage.is_remote(workdir):  # an object store has no folders to make
        workdir.mkdir(parents=True, exist_ok=True)
    config = run_config(model, workdir)
    if model.own_tokenizer is not None:  # the folder's tokenizer, kept with the run
        with storage.staged(workdir / TOKENIZER) as folder:
            model.own_tokenizer.save_pretrained(os.fspath(folder))
    # The first stage: its params only (no discriminator or optimizer was released).
    FirstStage.save_params(workdir / FIRST_STAGE, model.vae_params, _first_stage_config(model))
    tensor_files.save_params(workdir / TEXT_ENCODER, model.clip_params)
    task = DiffusionTask(config)
    write_weights_checkpoint(workdir, config, task, {"unet": model.unet_params},
                             model.scale_factor)  # fmt: skip
    return workdir


def write_weights_checkpoint(workdir, config, task: DiffusionTask, params: dict,
                             scale_factor: float) -> None:  # fmt: skip
    """`<workdir>/checkpoints/0` of a diffusion run whose weights were made elsewhere (an
    import): `params` is the train state's params tree ({'unet', and 'cond' / 'dense'
    where the run trains them}); `config` and `task` are the run's. A weights checkpoint:
    the params are written once (the EMA is them at step 0) and the optimizer moments are
    made when the run is opened (`DiffusionTask.state_from_weights`), not held here."""
    params = {"cond": {}, **params}
    _check_params(task, params)
    weights = {"params": params, "scale_factor": np.float32(scale_factor)}
    data_state = TrainIterator.initial_state(config.seed, config.batch_size)
    ckpt_lib.Checkpointer.write_weights(
        storage.path(workdir) / "checkpoints", weights, data_state, config
    )


# ----- export: a run in a release layout ---------------------------------------------------
EXPORT_LAYOUTS = ("ldm_jax", "msgpack", "compvis", "diffusers")


def _run_parts(workdir, step: int):
    """(config, task, {unet: EMA params, vae, text_encoder or a trained cond}) of a run."""
    config, task, state, _ = load_run(workdir, step, stage="diffusion", inference=True)
    parts = {
        "unet": jax.device_get(state.ema_params),
        "vae": jax.device_get(task.first_stage.load_params()),
    }
    if task.cond.kind == "clip":
        parts["text_encoder"] = task.cond.frozen_params()["text_encoder"]
    elif task.cond.trainable:
        parts["cond"] = jax.device_get(state.params["cond"])
    return config, task, parts


def _unet_config(task: DiffusionTask) -> dict:
    """The run's UNet config with every derived field filled in."""
    unet_cfg = dict(task.unet_config().to_dict())
    unet_cfg.setdefault("image_size", task.latent_size)
    return unet_cfg


def _export_tree(config, parts: dict, out: storage.Path, layout: str) -> None:
    """ldm_jax / msgpack: the parts as one param tree, the run's config beside it."""
    settings = json.loads(config.to_json())
    # msgpack files hold no metadata: there the config is in the .json only.
    metadata = {"config": json.dumps(settings)} if layout != "msgpack" else None
    tensor_files.save_params(out, parts, metadata)
    storage.write_atomic(out.with_suffix(".json"), json.dumps(settings, indent=2) + "\n")


def _export_compvis(config, task: DiffusionTask, parts: dict, out: storage.Path) -> None:
    """One .safetensors in the SD single-file naming, plus its inference .yaml."""
    import yaml

    if task.cond.kind == "clip" and task.cond.module.output != "last":
        raise UserError(
            "an SD 2.x (OpenCLIP, penultimate) text encoder has no CompVis export here: its "
            "unused last block is not kept; export --layout diffusers instead."
        )
    tensors = unet_weights.unet_to_compvis(parts["unet"], task.unet, prefix=sd.UNET_PREFIX)
    tensors |= vae_weights.vae_to_compvis(
        parts["vae"], task.first_stage.model, prefix=sd.VAE_PREFIX
    )
    text = parts.get("text_encoder")
    if text is not None:
        tensors |= clip_weights.export_hf_clip(text, prefix=sd.SD1_CLIP_PREFIX)
    tensor_files.save_safetensors(out, tensors)
    fs = task.first_stage.model_cfg.to_dict()
    settings = sd.compvis_yaml(config.diffusion, _unet_config(task), fs)
    storage.write_atomic(out.with_suffix(".yaml"), yaml.safe_dump(settings, sort_keys=False))


def _export_diffusers(config, task: DiffusionTask, parts: dict, out: storage.Path) -> None:
    """A diffusers pipeline folder: configs, tokenizer and the three models' weights,
    written in a local folder (transformers writes a tokenizer folder locally only) that
    then becomes `out` (`storage.staged`: renamed locally, uploaded to a remote `out`)."""
    files = {
        "model_index.json": diffusers_config.pipeline_index(),
        "unet/config.json": diffusers_config.unet_config_to_diffusers(_unet_config(task)),
        "vae/config.json": diffusers_config.vae_config_to_diffusers(
            task.first_stage.model_cfg.to_dict(), float(config.diffusion.scale_factor)
        ),
        "text_encoder/config.json": diffusers_config.clip_config_to_transformers(
            dict(config.cond.clip)
        ),
        "scheduler/scheduler_config.json": diffusers_config.scheduler_config_to_diffusers(
            config.diffusion
        ),
    }
    with storage.staged(out) as folder:
        # The pad token and vocabulary as transformers itself writes a tokenizer folder
        # (tokenizer.json), and the vocabulary and merges as separate files too, for the
        # readers that take only those.
        task.cond.tokenizer.save_pretrained(os.fspath(folder / "tokenizer"))
        _write_vocabulary_files(task.cond.tokenizer, folder / "tokenizer")
        for name, content in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(json.dumps(content, indent=2) + "\n")
        # One model's converted tensors at a time: a full UNet is gigabytes.
        tensor_files.save_safetensors(
            folder / "unet/diffusion_pytorch_model.safetensors",
            unet_weights.unet_to_diffusers(parts["unet"], task.unet),
        )
        tensor_files.save_safetensors(
            folder / "vae/diffusion_pytorch_model.safetensors",
            vae_weights.vae_to_diffusers(parts["vae"], task.first_stage.model),
        )
        tensor_files.save_safetensors(
            folder / "text_encoder/model.safetensors",
            clip_weights.export_hf_clip(parts["text_encoder"], prefix="text_model."),
        )


def _write_vocabulary_files(tokenizer, folder) -> None:
    """vocab.json and merges.txt (with its version header) of a fast CLIP tokenizer."""
    for name, text in clip_tokenizer.bpe_file_texts(*clip_tokenizer.bpe_tables(tokenizer)).items():
        (folder / name).write_text(text)


# The file each single-file layout writes, and the file written beside it.
_SUFFIXES = {"ldm_jax": (".safetensors", ".json"), "msgpack": (".msgpack", ".json"),
             "compvis": (".safetensors", ".yaml")}  # fmt: skip


def _refuse_targets(layout: str, out: storage.Path) -> None:
    """An export writes new paths only: `out` (and for a single-file layout, its config
    beside it) must not exist, and the file's suffix must be the layout's."""

    def refuse_existing(target):
        if target.exists():
            raise UserError(f"{target} exists: export to a new path (nothing was changed).")

    refuse_existing(out)
    if layout in _SUFFIXES:
        suffix, beside = _SUFFIXES[layout]
        if out.suffix != suffix:
            raise UserError(f"--layout {layout} writes one {suffix} file; name --out accordingly")
        refuse_existing(out.with_suffix(beside))


def export_run(workdir, layout: str, out, step: int = -1) -> storage.Path:
    """A diffusion run's EMA UNet, first stage and text encoder in one of EXPORT_LAYOUTS:
    ldm_jax (.safetensors, names `unet/...`, `vae/...`, `text_encoder/...`), msgpack, a
    CompVis single file (+ its inference YAML), or a diffusers folder."""
    if layout not in EXPORT_LAYOUTS:
        raise UserError(f"layout {layout!r}: use one of {list(EXPORT_LAYOUTS)}")
    out = storage.path(out)
    _refuse_targets(layout, out)
    config, task, parts = _run_parts(workdir, step)
    if layout == "diffusers" and task.cond.kind != "clip":
        raise UserError("--layout diffusers needs a CLIP-conditioned (Stable Diffusion) run")
    if layout in ("ldm_jax", "msgpack"):
        _export_tree(config, parts, out, layout)
    elif layout == "compvis":
        _export_compvis(config, task, parts, out)
    else:
        _export_diffusers(config, task, parts, out)
    return out
