"""Second stage: a UNet trained with the DDPM objective on a frozen autoencoder's latents.

batch -> first stage encode (x scale_factor) -> q_sample(t, noise) -> UNet(z_t [+ the
dense condition's features, training/dense.py], t, context/y from the conditioner, with
CFG dropout) -> eps / x0 / v loss -> AdamW -> EMA of the UNet (LDM warm-up:
decay_n = min(decay, (1 + n) / (10 + n))).
Sampling runs one jitted lax loop (samplers in ldm_jax.diffusion) on the EMA weights,
with classifier-free guidance and optional mask guidance (the known region of a latent
kept), then decodes through the first stage.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.data import images as images_lib
from ldm_jax.data import latent_cache
from ldm_jax.diffusion import guidance, objectives, samplers, schedules
from ldm_jax.errors import UserError
from ldm_jax.models import unet_configs
from ldm_jax.parallel.mesh_run import MeshRun
from ldm_jax.training import accumulate, dense, lr_schedules
from ldm_jax.training import state as state_lib
from ldm_jax.training.conditioner import Conditioner
from ldm_jax.training.first_stage import FirstStage
from ldm_jax.training.task import Task

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm")


@flax.struct.dataclass
class DiffusionState:
    step: jax.Array  # int32 []
    params: Any  # {'unet', 'cond' (trainable conditioning encoder, may be empty), and
    #               'dense' for a dense condition with weights (the semantic rescaler)}
    opt_state: Any
    ema_params: Any  # EMA of params['unet']
    scale_factor: jax.Array  # float32 []: latents are multiplied by it before diffusion
    bad_step: jax.Array
    skipped: jax.Array


def ema_decay(step, decay: float):
    """The reference LitEma warm-up: min(decay, (1 + n) / (10 + n))."""
    n = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


class DiffusionTask(Task):
    stage = "diffusion"
    state_type = DiffusionState

    def __init__(self, config, first_stage: FirstStage | None = None):
        """`first_stage` defaults to the checkpoint config.first_stage names."""
        super().__init__(config)
        if config.conditioning_key not in CONDITIONING_KEYS:
            raise UserError(
                f"unknown config.conditioning_key {config.conditioning_key!r}; "
                f"valid: {list(CONDITIONING_KEYS)}"
            )
        self.first_stage = first_stage or FirstStage(config.first_stage)
        self.cond = Conditioner(config.cond, config.conditioning_key)
        self.sched = schedules.make_schedule(config.diffusion)
        self.dense = dense.make(config, self.first_stage)
        self.unet = unet_configs.from_config(self.unet_config())
        lr = config.optim.base_learning_rate * (config.batch_size if config.optim.scale_lr else 1)
        self.learning_rate = lr
        self.tx = optax.adamw(
            lr_schedules.make(config.optim, lr), weight_decay=config.optim.weight_decay
        )

    def unet_config(self):
        """config.model with the fields the task derives: channels from the first stage
        and the dense condition, context width and class count from the conditioner."""
        u = self.config.model.copy_and_resolve_references()
        c = self.first_stage.latent_channels
        with u.unlocked():
            u.in_channels = c + self.dense.channels
            u.out_channels = c
            u.context_dim = self.cond.context_dim
            if self.config.conditioning_key == "adm":
                u.num_classes = self.cond.n_classes + 1  # the last id is the null class
        return u

    @property
    def concat(self) -> bool:
        """Whether the UNet takes a dense condition beside z_t."""
        return self.dense.channels > 0

    @property
    def from_condition(self) -> bool:
        """Whether samples are drawn from a condition's arrays (an image, a mask, a map):
        a dense condition with batch keys."""
        return bool(self.dense.keys)

    @property
    def grad_accum_steps(self) -> int:
        return int(self.config.train.get("grad_accum_steps", 1) or 1)

    def validate(self) -> None:
        super().validate()
        k, b = self.grad_accum_steps, self.config.batch_size
        if k < 1 or b % k:
            raise UserError(
                f"config.train.grad_accum_steps={k} must be >= 1 and divide "
                f"config.batch_size={b} (microbatches of equal size)."
            )
        if _cache_enabled(self.config):
            latent_cache.check_cacheable(self.config)
        size, f, unit = self.config.data.image_size, self.first_stage.factor, self.size_multiple
        if size % unit:
            raise UserError(
                f"config.data.image_size={size} must be divisible by the first stage's f={f} "
                f"times the UNet's downsampling {unit // f}; use a multiple of {unit}."
            )
        self.dense.check_sizes(size, self.latent_size)

    @property
    def size_multiple(self) -> int:
        """What every image side must be a multiple of: the first stage's f times the
        UNet's downsampling."""
        return self.first_stage.factor * 2 ** (len(self.config.model.channel_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.config.data.image_size // self.first_stage.factor

    # ----- state -------------------------------------------------------------------------
    def frozen_params(self):
        return {"first_stage": self.first_stage.load_params(), **self.cond.frozen_params()}

    def init_state(self, rng) -> DiffusionState:
        s, c = self.latent_size, self.unet.in_channels
        r_unet, r_cond, r_dense = jax.random.split(rng, 3)
        x = jnp.zeros((1, s, s, c), jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        context = None
        if self.cond.context_dim is not None:
            context = jnp.zeros((1, 1, self.cond.context_dim), jnp.float32)
        y = jnp.zeros((1,), jnp.int32) if self.config.conditioning_key == "adm" else None
        unet_params = self.unet.init(r_unet, x, t, context=context, y=y)["params"]
        return self.state_from_params(
            unet_params, self.cond.init(r_cond), dense_params=self.dense.init(r_dense)
        )

    def state_from_params(self, unet_params, cond_params=None, scale_factor=None,
                          dense_params=None):  # fmt: skip
        """A step-0 state of given weights: the EMA equal to the UNet, fresh AdamW moments,
        `scale_factor` (default: the config's)."""
        params = {"unet": unet_params, "cond": {} if cond_params is None else cond_params}
        if dense_params is not None:
            params["dense"] = dense_params
        if scale_factor is None:
            scale_factor = self.config.diffusion.scale_factor
        return DiffusionState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            ema_params=unet_params,
            scale_factor=jnp.asarray(scale_factor, jnp.float32),
            bad_step=-jnp.ones((), jnp.int32),
            skipped=jnp.zeros((), jnp.int32),
        )

    def state_from_weights(self, weights: dict):
        """The step-0 state of an imported run's weights checkpoint ({'params',
        'scale_factor'}): EMA = the UNet, fresh AdamW moments (made here, when the run is
        opened, not stored by the import)."""
        params = weights["params"]
        return self.state_from_params(
            params["unet"], params.get("cond") or None, weights["scale_factor"],
            params.get("dense"),
        )  # fmt: skip

    def inference_fields(self, state) -> dict:
        """Sampling reads the EMA UNet, the conditioning encoder, the dense condition's
        weights and the latent scale: not the trained UNet copy or the AdamW moments."""
        return {
            "step": state.step,
            "params": {k: v for k, v in state.params.items() if k != "unet"},
            "ema_params": state.ema_params,
            "scale_factor": state.scale_factor,
        }

    def initialize_from_batch(self, state, batch, frozen, rng):
        """scale_by_std: scale_factor = 1 / std(z) of the first training batch (fresh runs
        only; a restored state keeps the value it was trained with)."""
        if not self.config.diffusion.scale_by_std:
            return state
        return state.replace(scale_factor=1.0 / jnp.std(self._latents(frozen, batch, rng)))

    @property
    def uses_first_batch(self) -> bool:
        return bool(self.config.diffusion.scale_by_std)

    def train_source(self, mesh_run):
        """The latent cache as the training source (built on first use), or None to read
        images."""
        if not _cache_enabled(self.config):
            return None
        encode = mesh_run.jit_on_batch(
            lambda frozen, images: self.first_stage.codes(frozen["first_stage"], images)
        )
        return latent_cache.build(self.config, self.first_stage, encode, mesh_run)

    def device_batch(self, batch: dict, with_mask: bool = False) -> dict:
        key = "latent" if "latent" in batch else "image"
        out = {key: batch[key], **self.cond.host_inputs(batch), **self.dense.host_inputs(batch)}
        if with_mask:
            out["mask"] = batch["mask"]
        return out

    # ----- training ----------------------------------------------------------------------
    def dense_features(self, state, frozen, batch: dict, latent_hw, params=None):
        """The dense condition's features [B, h, w, k] of a batch's condition arrays
        (None without a dense condition), with `params` (default: the state's)."""
        params = state.params if params is None else params
        dense_params = params.get("dense")
        if dense_params is not None:
            dense_params = self.for_compute(dense_params, "params", "dense")
        return self.dense.features(
            dense_params, frozen, batch, tuple(latent_hw), state.scale_factor
        )

    def _compute_params(self, unet_params, cond_params):
        """The UNet's and the conditioning encoder's weights in their compute layout
        (whole over fsdp): XLA all-gathers them for the forward pass."""
        return (
            self.for_compute(unet_params, "params", "unet"),
            self.for_compute(cond_params, "params", "cond"),
        )

    def _apply(self, unet_params, cond_params, frozen, z_t, t, inputs, features, train,
               rng=None):  # fmt: skip
        unet_params, cond_params = self._compute_params(unet_params, cond_params)
        return self._apply_gathered(
            unet_params, cond_params, frozen, z_t, t, inputs, features, train, rng
        )

    def _apply_gathered(self, unet_params, cond_params, frozen, z_t, t, inputs, features,
                        train, rng=None):  # fmt: skip
        """The UNet's output at z_t; `features` (the dense condition's, or None) are
        concatenated with z_t on the channel axis."""
        context, y = self.cond.embed(cond_params, frozen, inputs)
        drawn = self.dense.from_cond_inputs(inputs, z_t.shape[1:3])
        if drawn is not None:  # e.g. a layout's boxes: dropped and guided with `inputs`
            features = drawn if features is None else jnp.concatenate([features, drawn], -1)
        if features is not None:
            if features.shape[0] == 1:  # made from the size alone (coords)
                features = jnp.broadcast_to(features, z_t.shape[:3] + features.shape[3:])
            z_t = jnp.concatenate([z_t, features.astype(z_t.dtype)], axis=-1)
        rngs = {"dropout": rng} if rng is not None else {}
        return self.unet.apply(
            {"params": unet_params}, z_t, t, context=context, y=y, train=train, rngs=rngs
        )

    def _latents(self, frozen, batch, rng):
        """Unscaled first-stage latents of a batch of images or of cached codes."""
        if "latent" in batch:
            return self.first_stage.latents_from_codes(batch["latent"], rng)
        return self.first_stage.encode(frozen["first_stage"], batch["image"], rng)

    def _noised_latents(self, state, frozen, batch, r_enc, r_t, r_noise):
        """Scaled first-stage latents z0, timesteps t, noise and z_t = q_sample(z0, t)."""
        z0 = self._latents(frozen, batch, r_enc) * state.scale_factor
        t = objectives.sample_timesteps(r_t, z0.shape[0], self.sched.num_timesteps)
        noise = jax.random.normal(r_noise, z0.shape, z0.dtype)
        return z0, t, noise, objectives.q_sample(self.sched, z0, t, noise)

    def train_step(self, state: DiffusionState, batch, rng, frozen):
        diffusion_cfg = self.config.diffusion
        rng = jax.random.fold_in(rng, state.step)
        r_enc, r_t, r_noise, r_cfg, r_drop = jax.random.split(rng, 5)
        z0, t, noise, z_t = self._noised_latents(state, frozen, batch, r_enc, r_t, r_noise)
        inputs = self.cond.drop(_cond_inputs(batch), r_cfg, self.config.cond.drop_rate)

        def loss_fn(params, mb, r_drop):
            features = self.dense_features(state, frozen, mb["dense"], mb["z_t"].shape[1:3], params)
            out = self._apply(
                params["unet"], params["cond"], frozen, mb["z_t"], mb["t"], mb["inputs"],
                features, True, r_drop,
            )  # fmt: skip
            loss, _ = objectives.diffusion_loss(
                self.sched,
                out,
                mb["z0"],
                mb["noise"],
                mb["t"],
                parameterization=diffusion_cfg.parameterization,
                loss_type=diffusion_cfg.loss_type,
                min_snr_gamma=diffusion_cfg.min_snr_gamma,
            )
            return loss

        mb = {"z0": z0, "t": t, "noise": noise, "z_t": z_t, "inputs": inputs,
              "dense": self.dense.host_inputs(batch)}  # fmt: skip
        loss, grads = accumulate.mean_value_and_grad(
            loss_fn, state.params, mb, self.grad_accum_steps, r_drop
        )
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(state.step, self.config.ema.decay)
        ema = jax.tree_util.tree_map(
            lambda e, p: e - (1.0 - decay) * (e - p), state.ema_params, params["unet"]
        )
        finite = state_lib.all_finite(loss, grads)
        candidate = state.replace(params=params, opt_state=opt_state, ema_params=ema)
        new_state = state_lib.advance(state, candidate, finite)
        metrics = {
            "loss": loss,
            "ema_decay": decay,
            "scale_factor": state.scale_factor,
            "grad_norm": state_lib.tree_norm(grads),
            "param_norm": state_lib.tree_norm(state.params),
            "update_norm": state_lib.tree_norm(updates),
            "latent_std": jnp.std(z0),
            "finite": finite.astype(jnp.float32),
        }
        return new_state, metrics

    # ----- evaluation and sampling -------------------------------------------------------
    def eval_step(self, state: DiffusionState, batch, frozen):
        """Per-example diffusion loss of the EMA UNet at fixed random t and noise."""
        rng = jax.random.PRNGKey(1234)
        r_enc, r_t, r_noise = jax.random.split(rng, 3)
        z0, t, noise, z_t = self._noised_latents(state, frozen, batch, r_enc, r_t, r_noise)
        features = self.dense_features(state, frozen, batch, z_t.shape[1:3])
        out = self._apply(
            state.ema_params, state.params["cond"], frozen, z_t, t, _cond_inputs(batch),
            features, False,
        )  # fmt: skip
        _, per_example = objectives.diffusion_loss(
            self.sched,
            out,
            z0,
            noise,
            t,
            parameterization=self.config.diffusion.parameterization,
            loss_type=self.config.diffusion.loss_type,
        )
        return {"loss": per_example}

    def sample(self, state, frozen, inputs, rng, **kwargs):
        """Latent sampling + decoding: -> images [B, H, W, 3] in [-1, 1]; the keyword
        arguments are `sample_latents`'."""
        latents = self.sample_latents(state, frozen, inputs, rng, **kwargs)
        return self.decode(state, frozen, latents)

    def sample_latents(
        self, state, frozen, inputs, rng, *, dense=None, shape=None, sampling=None,
        noise=None, uncond=None, init_latents=None, strength=None, known=None,
    ):  # fmt: skip
        """Scaled latents sampled on the EMA weights.

        `inputs` are device conditioning inputs (`cond.inputs`); `shape` (B, h, w, c) may
        exceed the trained latent size (convolutional sampling); `noise` (that shape)
        replaces the drawn starting latents x_T; `dense` holds the dense condition's
        arrays (`dense.keys`, e.g. `low_res`) for a run that has one.
        `uncond` replaces the null condition of classifier-free guidance (a negative
        prompt's inputs, same batch as `inputs`). `init_latents` (scaled, as
        `encode_images` gives) with `strength` in (0, 1] is image-to-image: they are noised
        to the step `strength` of the way up the sampler's grid and denoised from there.
        `known` = (keep [B, h, w, 1] in {0, 1}, x0 scaled latents) is mask guidance: at
        each step the kept region is replaced by x0 noised to that step, and at the end
        by x0 itself (`samplers.Known`).
        """
        sampling = sampling or self.config.sampling
        opts = samplers.options(sampling)
        if init_latents is not None:
            r_noise, rng = jax.random.split(rng)
            opts["skip"], noise = self._img2img_noised(
                init_latents, strength, sampling, noise, r_noise
            )
        if known is not None:
            opts["known"] = samplers.Known(*known)
        start = tuple(shape) if noise is None else noise  # the sampler takes either
        batch, latent_hw = (
            (shape[0], shape[1:3]) if noise is None else (noise.shape[0], noise.shape[1:3])
        )
        uncond = self.cond.null_inputs(batch) if uncond is None else uncond
        features = None
        if self.concat:
            if dense is None and self.from_condition:
                raise UserError(f"this run samples from a {self.dense.kind} condition; give it.")
            features = self.dense_features(state, frozen, dense or {}, latent_hw)
        fn = self._guided_model_fn(state, frozen, inputs, uncond, features, sampling, batch)
        return samplers.get_sampler(sampling.sampler)(
            fn, self.sched, start, rng, parameterization=self.config.diffusion.parameterization,
            **opts,
        )  # fmt: skip

    def _guided_model_fn(self, state, frozen, inputs, uncond, features, sampling, batch: int):
        """The EMA UNet as a function of (x, t), with guidance when it applies."""
        # FSDP: gather the weights once, not in every step of the sampler's loop.
        ema, cond_params = self._compute_params(state.ema_params, state.params["cond"])

        def model_fn(x, t, c):
            f = features
            if f is not None and f.shape[0] == batch != x.shape[0]:
                # guidance doubles the batch: the features are repeated with it
                f = jnp.concatenate([f] * (x.shape[0] // batch), axis=0)
            return self._apply_gathered(ema, cond_params, frozen, x, t, c, f, False)

        scale = float(sampling.guidance_scale)
        if inputs and scale != 1.0:
            uncond = {k: jnp.asarray(v) for k, v in uncond.items()}
            return guidance.guided_model_fn(model_fn, inputs, uncond, scale)
        return lambda x, t: model_fn(x, t, inputs)

    def sample_from_condition(
        self, state, frozen, inputs, rng, condition: dict, sampling=None, uncond=None
    ):
        """Images [B, H, W, 3] in [-1, 1] sampled from a dense condition, at the size it
        implies (any size `check_sample_size` accepts: convolutional sampling).

        `condition` holds the arrays the data pipeline makes (`low_res`; or `image`,
        `inpaint_mask`, `masked_image`; `dense.user_inputs` makes them from files). A run
        trained with the condition takes it at the UNet's input; a run without an inpaint
        condition inpaints by mask guidance (`known`): the kept latents are E(image) where
        no pixel of their f x f patch is masked. Inpainted images keep the original
        outside the mask (the reference's composite). `uncond` is `sample_latents`'.
        """
        f, c = self.first_stage.factor, self.first_stage.latent_channels
        b, h, w = self.dense.sample_shape(condition)
        known = None
        if "inpaint_mask" in condition and self.dense.kind != "inpaint":
            r_enc, rng = jax.random.split(rng)
            x0 = self.encode_images(state, frozen, condition["image"], r_enc)
            touched = jax.lax.reduce_window(
                condition["inpaint_mask"], -jnp.inf, jax.lax.max, (1, f, f, 1), (1, f, f, 1),
                "VALID",
            )  # fmt: skip
            known = (1.0 - touched, x0)
        dense_inputs = self.dense.host_inputs(condition) if self.concat else None
        x = self.sample(
            state, frozen, inputs, rng, dense=dense_inputs, shape=(b, h // f, w // f, c),
            sampling=sampling, known=known, uncond=uncond,
        )  # fmt: skip
        if "inpaint_mask" in condition:
            mask = condition["inpaint_mask"]
            x = mask * x + (1.0 - mask) * condition["image"]
        return x

    def check_sample_size(self, height: int, width: int) -> None:
        """Refuses an output size the first stage and the UNet's downsampling do not divide."""
        unit = self.size_multiple
        if height % unit or width % unit:
            raise UserError(
                f"the output would be {height}x{width}, but this run samples sizes that are "
                f"multiples of {unit} (first stage f={self.first_stage.factor} times the "
                "UNet's downsampling); crop or pad the input to such a size."
            )

    def _img2img_noised(self, init_latents, strength, sampling, noise, rng):
        """(grid steps skipped, the init latents noised to the step `strength` names)."""
        skip, t_start = self.img2img_start(strength, sampling)
        if noise is None:
            noise = jax.random.normal(rng, init_latents.shape, jnp.float32)
        t = jnp.full((init_latents.shape[0],), t_start, jnp.int32)
        return skip, objectives.q_sample(self.sched, init_latents, t, noise)

    def decode(self, state, frozen, latents):
        """Scaled latents -> images [B, H, W, 3] in [-1, 1] through the first stage."""
        return self.first_stage.decode(frozen["first_stage"], latents / state.scale_factor)

    def img2img_start(self, strength: float, sampling=None) -> tuple[int, int]:
        """(grid steps skipped, timestep the image is noised to) at `strength`."""
        sampling = sampling or self.config.sampling
        grid = samplers.sampling_grid(sampling, self.sched.num_timesteps)
        return samplers.img2img_start(grid, float(strength))

    def encode_images(self, state, frozen, images, rng):
        """images [B, H, W, 3] in [-1, 1] -> the scaled latents the UNet samples (a
        posterior sample for KL first stages, as training and the reference's img2img)."""
        return self.first_stage.encode(frozen["first_stage"], images, rng) * state.scale_factor

    def _fixed_grid_conditions(self) -> list:
        """`sampling.grid_conditions`: the class ids (class runs) or prompts (text runs)
        every sample grid shows, one per column, the same at every step; () for none."""
        fixed = list(self.config.sampling.get("grid_conditions", ()) or ())
        if fixed and not (self.cond.kind == "class" or self.cond.is_text):
            raise UserError(
                "config.sampling.grid_conditions takes class ids (class runs) or prompts "
                f"(text runs); this run's condition is {self.cond.kind!r}: leave it empty."
            )
        return fixed

    def grid_columns(self, batch: dict, rows: int) -> int:
        """A sample grid's columns: one per fixed grid condition where the config names
        them; else one per class (up to `rows`) for class models, one per eval example
        for text, layout and dense-condition models, `rows` otherwise."""
        if fixed := self._fixed_grid_conditions():
            return len(fixed)
        if self.cond.kind == "class":
            return min(rows, self.cond.n_classes)
        if self.from_condition or self.cond.per_example:
            return min(rows, batch["image"].shape[0])
        return rows

    def grid_captions(self, batch, rows: int) -> list[str] | None:
        """The condition under each grid column: the class id, or the prompt (the eval
        batch's tokens decoded where no prompts are fixed)."""
        cols = self.grid_columns(batch, rows)
        if fixed := self._fixed_grid_conditions():
            return [str(c) for c in fixed]
        if self.cond.kind == "class":
            return [str(c) for c in range(cols)]
        if self.cond.is_text:
            tokens = MeshRun.all_rows(batch["tokens"])[:cols]
            return [self.cond.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        return None

    def sample_grid(self, state, batch, rows: int, frozen) -> list:
        """Rows of samples, one column per condition (`grid_columns`); text, layout and
        dense models show the eval batch's images as the first row (unless the prompts
        are fixed), layout and dense models their condition as pictures
        (`condition_images`) as the second."""
        cols = self.grid_columns(batch, rows)
        fixed = self._fixed_grid_conditions()
        if fixed or self.cond.kind == "class":
            inputs = self.cond.inputs(fixed or range(cols))
        else:  # the eval batch's tokens (text) are device inputs already
            inputs = _cond_inputs(batch)
        grid = []
        if (self.from_condition or self.cond.per_example) and not fixed:
            grid.append(images_lib.to_uint8(MeshRun.all_rows(batch["image"])[:cols]))
        if self.cond.kind == "layout":
            size = batch["image"].shape[1]
            tokens = MeshRun.all_rows(batch["tokens"])[:cols]
            grid.append(np.stack([self.cond.layout_picture(t, size) for t in tokens]))
        condition = {}
        if self.from_condition:
            condition = {"image": batch["image"], **self.dense.host_inputs(batch)}
            shown = self.condition_images({k: MeshRun.all_rows(v) for k, v in condition.items()})
            grid.append(images_lib.to_uint8(shown[:cols]))
        fn = self._sampler_fn(cols)
        for r in range(self.config.sampling.grid_rows):
            rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 17), r)
            x = fn(state, frozen, inputs, condition, rng)
            grid.append(images_lib.to_uint8(MeshRun.all_rows(x)))
        return grid

    def condition_images(self, dense_inputs: dict):
        """The dense condition as pictures at the output size (host arrays in [-1, 1]): the
        low-res image nearest-upscaled, the masked image, or the coloured class map."""
        return self.dense.pictures(dense_inputs)

    def _sampler_fn(self, n: int):
        """A jitted sampler for n samples (cached: one compile per n)."""
        cache = self.__dict__.setdefault("_sampler_cache", {})
        if n not in cache:
            s, c = self.latent_size, self.first_stage.latent_channels

            def fn(state, frozen, inputs, condition, rng):
                inputs = {k: v[:n] for k, v in inputs.items()}
                if self.from_condition:  # inpainting keeps the image outside the mask
                    condition = {k: v[:n] for k, v in condition.items()}
                    return self.sample_from_condition(state, frozen, inputs, rng, condition)
                return self.sample(state, frozen, inputs, rng, shape=(n, s, s, c))

            cache[n] = jax.jit(fn)
        return cache[n]


def _cache_enabled(config) -> bool:
    return bool(config.get("latent_cache") and config.latent_cache.enabled)


def _cond_inputs(batch: dict) -> dict:
    """The conditioning arrays of a device batch (labels or tokens), whichever it has."""
    return {k: batch[k] for k in ("label", "tokens", "token_mask") if k in batch}
