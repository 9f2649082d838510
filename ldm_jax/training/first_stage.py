"""The frozen first stage that a diffusion run encodes with and decodes through.

A diffusion config names an autoencoder *workdir* (`config.first_stage.workdir`) and
optionally a step; the architecture comes from that checkpoint's own metadata, so the
autoencoder can never be rebuilt with the wrong shapes. Only the autoencoder's
parameters are read (orbax partial restore), not its discriminator or optimizer state;
`FirstStage.save_params` writes a checkpoint of those parameters alone (an autoencoder
that was not trained here, e.g. an imported VAE).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import linen as nn

from ldm_jax import storage
from ldm_jax.errors import UserError
from ldm_jax.models import autoencoder as ae_models
from ldm_jax.training import checkpoint as ckpt_lib

# Where an autoencoder run's checkpointed state keeps the autoencoder's parameters
# (AutoencoderState.gen_params["model"], beside the loss's logvar and the optimizers).
_PARAMS_PATH = ("gen_params", "model")


def _params_item(params) -> dict:
    """A checkpoint state holding `params` at _PARAMS_PATH and nothing else."""
    outer, inner = _PARAMS_PATH
    return {outer: {inner: params}}


def _params_in(state) -> dict:
    outer, inner = _PARAMS_PATH
    return state[outer][inner]


def _checkpoint_dir(workdir: storage.Path) -> storage.Path:
    return workdir / "checkpoints"


class FirstStage:
    def __init__(self, fs_cfg):
        self.workdir = storage.path(fs_cfg.workdir)
        ckpt_dir = _checkpoint_dir(self.workdir)
        train_cmd = (
            "python -m ldm_jax.train --config configs/autoencoder/<experiment>.py "
            f"--workdir {self.workdir}"
        )
        if not ckpt_dir.is_dir():
            raise UserError(
                f"config.first_stage.workdir={self.workdir} holds no autoencoder checkpoints "
                f"({ckpt_dir} is missing). Train the first stage there first: {train_cmd}"
            )
        self.manager = ocp.CheckpointManager(
            ckpt_dir,
            options=ocp.CheckpointManagerOptions(read_only=True),
            item_names=("state", "data", "meta"),
        )
        steps = self.manager.all_steps()
        step = fs_cfg.get("step", None)
        step = (max(steps) if steps else None) if step in (None, -1) else int(step)
        if step is None or step not in steps:
            raise UserError(
                f"no autoencoder checkpoint at step {step} in {ckpt_dir} (steps there: "
                f"{sorted(steps)}); set config.first_stage.step to one of them or -1 (latest)."
            )
        self.step, self.path = step, ckpt_dir / str(step)
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta["meta"]
        if meta.get("stage") != "autoencoder":
            raise UserError(
                f"{self.path} is a {meta.get('stage')!r} checkpoint, not an autoencoder; point "
                "config.first_stage.workdir at a first-stage run."
            )
        self._set_model(meta["model"])

    @classmethod
    def from_model_config(cls, model_cfg) -> FirstStage:
        """A first stage with no checkpoint behind it, for shape-only uses (eval_shape,
        ahead-of-time compiles in benches): `load_params` is unavailable."""
        obj = object.__new__(cls)
        obj.workdir = obj.manager = obj.path = None
        obj.step = -1
        obj._set_model(model_cfg)
        return obj

    @staticmethod
    def save_params(workdir, params, config, step: int = 0) -> None:
        """Writes `params` as the autoencoder checkpoint `step` of `workdir` (`config`: its
        autoencoder config), with no discriminator or optimizer state: a first stage that
        `FirstStage` reads as it reads a trained one."""
        directory = _checkpoint_dir(storage.path(workdir))
        ckpt = ckpt_lib.Checkpointer(
            directory, keep=1, async_save=False,
            save_concurrent_gb=ckpt_lib.IMPORT_CONCURRENT_GB,
        )  # fmt: skip
        ckpt.save(step, _params_item(params), {}, config)
        ckpt.close()

    def _set_model(self, model_cfg) -> None:
        self.model_cfg = ml_collections.ConfigDict(dict(model_cfg))
        self.model = ae_models.from_config(self.model_cfg)
        self.regularizer = self.model_cfg.type  # "kl" or "vq"
        self.factor = ae_models.downsampling_factor(self.model_cfg)
        self.latent_channels = self.model_cfg.embed_dim

    def abstract_params(self):
        """ShapeDtypeStructs of the autoencoder's parameters."""
        size = 8 * self.factor
        x = jax.ShapeDtypeStruct((1, size, size, self.model_cfg.in_channels), jnp.float32)
        rngs = {"params": jax.random.PRNGKey(0), "sample": jax.random.PRNGKey(0)}
        return nn.unbox(jax.eval_shape(lambda x: self.model.init(rngs, x), x))["params"]

    def load_params(self):
        """The autoencoder's parameters (host arrays), read from the checkpoint."""
        if self.manager is None:
            raise RuntimeError("this FirstStage was built from a model config, not a checkpoint")
        abstract = self.abstract_params()
        # Onto this process's first device; the loop then replicates it over the mesh.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract
        )
        target = _params_item(abstract)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        try:
            out = self.manager.restore(
                self.step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=target, restore_args=restore_args, partial_restore=True
                    )
                ),
            )
        except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable files
            raise UserError(
                f"cannot read the autoencoder parameters from {self.path} "
                f"({type(e).__name__}: {e})."
            ) from e
        return _params_in(out["state"])

    # ----- pure functions used inside jitted steps ---------------------------------------
    def codes(self, params, images):
        """images [B, H, W, 3] in [-1, 1] -> what the encoder determines, before any noise:
        KL: the posterior's moments [B, h, w, 2c] (mean, logvar); VQ: the
        pre-quantisation encoding [B, h, w, c]. This is what a latent cache stores."""
        if self.regularizer == "kl":
            posterior = self.model.apply({"params": params}, images, method="encode")
            return jax.lax.stop_gradient(jnp.concatenate([posterior.mean, posterior.logvar], -1))
        return jax.lax.stop_gradient(self.model.apply({"params": params}, images, method="encode"))

    @property
    def code_channels(self) -> int:
        return 2 * self.latent_channels if self.regularizer == "kl" else self.latent_channels

    def latents_from_codes(self, codes, rng):
        """codes -> latents [B, h, w, c] (unscaled). KL: a fresh posterior sample (the
        reference trains on samples); VQ: the codes themselves (quantised when decoding)."""
        if self.regularizer == "kl":
            return ae_models.DiagonalGaussian(codes).sample(rng)
        return codes

    def encode(self, params, images, rng):
        """images [B, H, W, 3] in [-1, 1] -> latents [B, H/f, W/f, c] (unscaled)."""
        return self.latents_from_codes(self.codes(params, images), rng)

    def decode(self, params, latents):
        """latents (unscaled) -> images [B, H, W, 3] clipped to [-1, 1]."""
        x = self.model.apply({"params": params}, latents, method="decode")
        return jnp.clip(x, -1.0, 1.0)
