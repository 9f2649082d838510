"""CompVis model-zoo releases (model.ckpt + config.yaml) as ordinary ldm_jax runs.

    first stage (AutoencoderKL / VQModel)    <workdir>/checkpoints/0: an autoencoder run
    LDM (LatentDiffusion)                    <workdir>/first_stage/checkpoints/0: its first
                                             stage, from the file's first_stage_model.*
                                             <workdir>/checkpoints/0: the UNet (the EMA
                                             copy where the file has one, as the reference
                                             samples), the trained conditioning encoder
                                             ('cond') or semantic rescaler ('dense')

Both are weights checkpoints (the params once; optimizer moments, and for an autoencoder
a fresh discriminator, are made when the run is opened), so `ldm_jax.sample`,
`ldm_jax.evaluate` and `ldm_jax.train` take them as any run. The YAML's mapping to a
config is `ldm_jax.training.compvis_configs`; tensor names are the interop name tables.
Everything is read, converted and checked before anything is written.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ldm_jax import storage
from ldm_jax.data.pipeline import TrainIterator
from ldm_jax.diffusion import schedules
from ldm_jax.errors import UserError
from ldm_jax.interop import cond_stage_weights, tensor_files, unet_weights, vae_weights
from ldm_jax.models import autoencoder as ae_models
from ldm_jax.training import checkpoint as ckpt_lib
from ldm_jax.training import compvis_configs, sd_runs
from ldm_jax.training.first_stage import FirstStage

FIRST_STAGE = "first_stage"  # the LDM's autoencoder run, inside its run
UNET_PREFIX = unet_weights.COMPVIS_UNET_PREFIX  # model.diffusion_model.
EMA_PREFIX = "model_ema."  # LitEma: the UNet's names without their dots
_EMA_BUFFERS = ("model_ema.decay", "model_ema.num_updates")


def _refuse_existing(workdir: storage.Path) -> None:
    for sub in ("checkpoints", FIRST_STAGE):
        if (workdir / sub).exists():
            raise UserError(
                f"{workdir / sub} exists: import into a new --workdir (nothing was changed)."
            )


def import_release(checkpoint, config_path, workdir) -> tuple[storage.Path, str]:
    """Writes the run of the release (`checkpoint`, its `config_path` YAML) into a new
    `workdir`; -> (workdir, what was imported, in words)."""
    release = compvis_configs.read_release(config_path)
    workdir = storage.path(workdir)
    _refuse_existing(workdir)
    with tensor_files.open_state_dict(checkpoint) as state:  # tensors read as converted
        if release.stage == "autoencoder":
            what = _import_autoencoder(release, state, workdir)
        else:
            what = _import_ldm(release, state, workdir)
    return workdir, what


# ----- autoencoders ------------------------------------------------------------------------
def _autoencoder_weights(state: Mapping, prefix: str, config) -> dict:
    """{'gen_params': {'model', 'logvar'}}: the autoencoder's params under `prefix` (its
    training loss, `loss.*`, is skipped) and the KL loss's learned log-variance."""
    model = ae_models.from_config(config.model)
    params = vae_weights.vae_from_compvis(state, model, prefix=prefix)["params"]
    logvar = config.loss.logvar_init
    if prefix + "loss.logvar" in state:
        logvar = float(np.asarray(state[prefix + "loss.logvar"]).reshape(()))
    return {"gen_params": {"model": params, "logvar": np.float32(logvar)}}


def write_autoencoder_run(workdir, weights: dict, config) -> None:
    """`<workdir>/checkpoints/0` of an autoencoder run holding `weights` only: a diffusion
    run's first stage (FirstStage reads its params), and an autoencoder run that
    `AutoencoderTask.state_from_weights` completes for evaluation or fine-tuning."""
    data_state = TrainIterator.initial_state(config.seed, config.batch_size)
    ckpt_lib.Checkpointer.write_weights(
        storage.path(workdir) / "checkpoints", weights, data_state, config
    )


def _import_autoencoder(release, state: Mapping, workdir: storage.Path) -> str:
    config = compvis_configs.autoencoder_run_config(release)
    weights = _autoencoder_weights(state, "", config)
    write_autoencoder_run(workdir, weights, config)
    return f"{config.model.type.upper()} autoencoder (f={ae_models.downsampling_factor(config.model)})"  # fmt: skip


# ----- latent diffusion models -------------------------------------------------------------
class _EmaUNet(Mapping):
    """The UNet's tensors under their `model.diffusion_model.*` names, read from the file's
    LitEma copies (`model_ema.diffusion_modelinput_blocks00weight`: the name without its
    dots), so that the UNet's name table reads the EMA weights."""

    def __init__(self, state: Mapping):
        self._state = state
        self._names = {
            name: EMA_PREFIX + name.removeprefix("model.").replace(".", "")
            for name in state
            if name.startswith(UNET_PREFIX)
        }
        copies = {k for k in state if k.startswith(EMA_PREFIX) and k not in _EMA_BUFFERS}
        if set(self._names.values()) != copies or len(copies) != len(self._names):
            raise UserError(
                f"the checkpoint's EMA copies ({len(copies)} model_ema.* tensors) are not those "
                f"of its UNet ({len(self._names)} model.diffusion_model.* tensors)"
            )

    def shape(self, name: str) -> tuple[int, ...]:
        return tensor_files.shape_of(self._state, self._names[name])

    def __getitem__(self, name: str):
        return self._state[self._names[name]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def has_ema(state: Mapping) -> bool:
    return any(k.startswith(EMA_PREFIX) and k not in _EMA_BUFFERS for k in state)


def _check_schedule(state: Mapping, config) -> None:
    """The file's own `betas` buffer, where it has one, is the YAML's schedule."""
    if "betas" not in state:
        return
    d = config.diffusion
    want = schedules.make_betas(
        d.beta_schedule, d.timesteps, d.linear_start, d.linear_end, d.cosine_s
    )
    have = np.asarray(state["betas"], np.float64)
    if have.shape != want.shape or not np.allclose(have, want, rtol=1e-5, atol=1e-9):
        raise UserError(
            f"the checkpoint's betas ({have.shape[0]} steps, {have[0]:.6g} .. {have[-1]:.6g}) are "
            f"not the YAML's schedule ({d.beta_schedule}, {want.shape[0]} steps, "
            f"{want[0]:.6g} .. {want[-1]:.6g})"
        )


def _scale_factor(state: Mapping, config) -> float:
    """scale_by_std releases keep the factor their first batch gave in a buffer."""
    if "scale_factor" in state:
        return float(np.asarray(state["scale_factor"]).reshape(()))
    return float(config.diffusion.scale_factor)


def _trained_params(task, state: Mapping, kind: str) -> dict:
    """{'unet', 'cond', 'dense'} of the run's train state from the file's tensors."""
    unet_state = _EmaUNet(state) if has_ema(state) else state
    params = {"unet": unet_weights.unet_from_compvis(unet_state, task.unet)["params"]}
    cond = task.cond.module
    if kind == "class":
        params["cond"] = cond_stage_weights.class_table_from_compvis(state, cond)["params"]
    elif kind in ("text", "layout"):
        params["cond"] = cond_stage_weights.transformer_from_compvis(state, cond)["params"]
    elif kind == "semantic":
        module = task.dense.module
        params["dense"] = cond_stage_weights.rescaler_from_compvis(state, module)["params"]
    elif kind != "inpaint" and any(k.startswith(cond_stage_weights.COND_PREFIX) for k in state):
        # (the inpainting model's cond stage is its first stage, stored twice)
        raise UserError(
            f"the checkpoint holds cond_stage_model.* tensors, but its YAML's cond stage "
            f"({kind!r}) has no weights: the YAML is not this checkpoint's"
        )
    return params


def _condition_kind(config) -> str:
    dense = config.data.condition.kind
    return dense if dense != "none" else config.cond.kind


def _import_ldm(release, state: Mapping, workdir: storage.Path) -> str:
    from ldm_jax.training.diffusion import DiffusionTask

    config, fs_config = compvis_configs.diffusion_run_config(release, workdir / FIRST_STAGE)
    _check_schedule(state, config)
    fs_weights = _autoencoder_weights(state, vae_weights.COMPVIS_VAE_PREFIX, fs_config)
    task = DiffusionTask(config, first_stage=FirstStage.from_model_config(fs_config.model))
    task.validate()
    kind = _condition_kind(config)
    params = _trained_params(task, state, kind)
    scale_factor = _scale_factor(state, config)
    if not storage.is_remote(workdir):  # an object store has no folders to make
        workdir.mkdir(parents=True, exist_ok=True)
    write_autoencoder_run(workdir / FIRST_STAGE, fs_weights, fs_config)
    sd_runs.write_weights_checkpoint(workdir, config, task, params, scale_factor)
    ema = "EMA " if has_ema(state) else ""
    return f"LDM ({kind} conditioning, {ema}UNet, {fs_config.model.type.upper()} first stage)"
