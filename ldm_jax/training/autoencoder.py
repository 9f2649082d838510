"""First stage: the autoencoder train state, its pure train step and its eval step.

One step updates generator (encoder/decoder/quantiser, optional logvar) and the PatchGAN
discriminator from the same batch. The generator's gradient is composed by hand from
vector-Jacobian products so that each network is differentiated exactly once:

    x -> autoencoder -> x_hat -> { LPIPS + L1 -> nll ; D -> g_loss }

d(loss)/d(x_hat) from the two heads also gives the adaptive GAN weight, since the grads
at the decoder's last conv are a cheap VJP of that conv with the same cotangents.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from ldm_jax.data import images as images_lib
from ldm_jax.errors import UserError
from ldm_jax.evaluation import image_metrics
from ldm_jax.losses import autoencoder as ae_losses
from ldm_jax.models import autoencoder as ae_models
from ldm_jax.models import lpips as lpips_lib
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.parallel.mesh_run import MeshRun
from ldm_jax.training import state as state_lib
from ldm_jax.training.task import Task


@flax.struct.dataclass
class AutoencoderState:
    step: jax.Array  # int32 []
    gen_params: Any  # {'model': autoencoder params, 'logvar': []}
    gen_opt: Any
    disc_params: Any
    disc_stats: Any  # BatchNorm running statistics of the discriminator
    disc_opt: Any
    bad_step: jax.Array  # int32 []: first non-finite step, -1 if none
    skipped: jax.Array  # int32 []: updates dropped because of non-finite values


class AutoencoderTask(Task):
    """Everything the generic loop needs to train and evaluate a first-stage model."""

    stage = "autoencoder"
    state_type = AutoencoderState

    def __init__(self, config):
        super().__init__(config)
        self.model = ae_models.from_config(config.model)
        self.regularizer = config.model.type  # "kl" or "vq"
        loss_cfg = config.loss
        self.disc = NLayerDiscriminator(
            input_nc=loss_cfg.disc_in_channels,
            ndf=loss_cfg.disc_ndf,
            n_layers=loss_cfg.disc_num_layers,
        )
        self.disc_loss = ae_losses.disc_loss_fn(loss_cfg.disc_loss)
        lr = config.optim.base_learning_rate
        if config.optim.scale_lr:
            lr *= config.batch_size
        self.learning_rate = lr
        optim = config.optim
        adam = dict(b1=optim.b1, b2=optim.b2, eps=optim.eps)
        self.gen_tx = optax.adam(lr * optim.lr_g_factor, **adam)
        self.disc_tx = optax.adam(lr, **adam)

    def validate(self) -> None:
        super().validate()
        if int(self.config.train.get("grad_accum_steps", 1) or 1) != 1:
            raise UserError(
                "config.train.grad_accum_steps must be 1 for the autoencoder stage: the "
                "discriminator's BatchNorm statistics and the adaptive GAN weight are "
                "defined on the whole batch. Lower config.batch_size (or use fsdp / remat) "
                "to save memory instead."
            )
        size, f = self.config.data.image_size, ae_models.downsampling_factor(self.config.model)
        if size % f:
            raise UserError(
                f"config.data.image_size={size} is not divisible by the autoencoder's "
                f"downsampling factor f={f} (2 ** (len(ch_mult) - 1) with ch_mult="
                f"{tuple(self.config.model.ch_mult)}); use a multiple of {f}, e.g. "
                f"{max(f, size // f * f)}."
            )

    def device_batch(self, batch: dict, with_mask: bool = False) -> dict:
        """The arrays the step needs: images (and the padding mask when evaluating)."""
        keys = ("image", "mask") if with_mask else ("image",)
        return {k: batch[k] for k in keys}

    def sample_grid(self, state, batch, rows: int, frozen=None) -> list:
        """Originals over their reconstructions, `rows` images each: [orig, recon]."""
        recon = self._reconstruct_jit(state, batch["image"])
        take = lambda a: images_lib.to_uint8(MeshRun.all_rows(a)[:rows])
        return [take(batch["image"]), take(recon)]

    @functools.cached_property
    def _reconstruct_jit(self):  # one trace for every grid of the run
        return jax.jit(self.reconstruct)

    # ----- state -------------------------------------------------------------------------
    def frozen_params(self):
        """Frozen networks the loss needs, passed to the jitted step as an argument."""
        return {"lpips": lpips_lib.load_lpips_params()}

    def init_state(self, rng) -> AutoencoderState:
        """Boxed (logically annotated) initial state; the loop unboxes after sharding."""
        size = self.config.data.image_size
        x = jnp.zeros((1, size, size, self.config.model.in_channels), jnp.float32)
        r_model, r_disc, r_sample = jax.random.split(rng, 3)
        variables = self.model.init({"params": r_model, "sample": r_sample}, x)
        disc_vars = self.disc.init(r_disc, x, train=False)
        gen_params = {
            "model": variables["params"],
            "logvar": jnp.asarray(self.config.loss.logvar_init, jnp.float32),
        }
        disc_params = disc_vars["params"]
        return AutoencoderState(
            step=jnp.zeros((), jnp.int32),
            gen_params=gen_params,
            gen_opt=self.gen_tx.init(gen_params),  # boxed: moments inherit the axes
            disc_params=disc_params,
            disc_stats=disc_vars["batch_stats"],
            disc_opt=self.disc_tx.init(disc_params),
            bad_step=-jnp.ones((), jnp.int32),
            skipped=jnp.zeros((), jnp.int32),
        )

    def state_from_weights(self, weights: dict) -> AutoencoderState:
        """The step-0 state of an imported autoencoder's weights checkpoint
        ({'gen_params'}): a fresh discriminator (released ones are not imported) and fresh
        Adam moments, made when the run is opened rather than stored by the import."""
        gen_params = weights["gen_params"]
        size = self.config.data.image_size
        x = jnp.zeros((1, size, size, self.config.model.in_channels), jnp.float32)
        disc_vars = nn.unbox(self.disc.init(jax.random.PRNGKey(self.config.seed), x, train=False))
        return AutoencoderState(
            step=jnp.zeros((), jnp.int32),
            gen_params=gen_params,
            gen_opt=self.gen_tx.init(gen_params),
            disc_params=disc_vars["params"],
            disc_stats=disc_vars["batch_stats"],
            disc_opt=self.disc_tx.init(disc_vars["params"]),
            bad_step=-jnp.ones((), jnp.int32),
            skipped=jnp.zeros((), jnp.int32),
        )

    def inference_fields(self, state) -> dict:
        """Reconstruction reads the generator alone: not the discriminator or the moments."""
        return {"step": state.step, "gen_params": state.gen_params}

    # ----- training ----------------------------------------------------------------------
    def generator_grads(self, state: AutoencoderState, x, rng, frozen):
        """Gradient of the generator loss (adaptive GAN weight included) and its pieces.

        Returns (grads, recon, metrics); recon [B, H, W, 3] feeds the discriminator.
        """
        loss_cfg = self.config.loss
        r_sample, r_drop = jax.random.split(rng)
        factor = ae_losses.disc_factor(
            state.step, disc_start=loss_cfg.disc_start, factor=loss_cfg.disc_factor
        )
        reg_weight = loss_cfg.kl_weight if self.regularizer == "kl" else loss_cfg.codebook_weight

        def ae_forward(model_params):
            out = self.model.apply(
                {"params": self.for_compute(model_params, "gen_params", "model")},
                x,
                train=True,
                rngs={"sample": r_sample, "dropout": r_drop},
            )
            # fp32 out, whatever the compute dtype: the loss heads' cotangents are fp32
            # and jax.vjp wants them in its outputs' dtypes.
            recon, reg = out.recon.astype(jnp.float32), out.reg_loss.astype(jnp.float32)
            return (recon, reg), (out.hidden, out.metrics)

        model_params = state.gen_params["model"]
        (recon, reg_loss), ae_vjp, (hidden, model_metrics) = jax.vjp(
            ae_forward, model_params, has_aux=True
        )
        logvar = state.gen_params["logvar"]
        nll, d_nll_recon, d_nll_logvar, nll_metrics = self._nll_cotangents(x, recon, logvar, frozen)
        g_loss, d_adv_recon = self._adv_cotangent(state, recon)

        # Adaptive weight: the same cotangents pulled back through the decoder's last conv.
        last = _get_path(
            self.for_compute(model_params, "gen_params", "model"), ae_models.LAST_LAYER_PATH
        )
        _, conv_vjp = jax.vjp(
            lambda p: ae_models.apply_output_conv(p, hidden).astype(jnp.float32), last
        )
        (nll_last,) = conv_vjp(d_nll_recon)
        (adv_last,) = conv_vjp(d_adv_recon)
        d_weight = ae_losses.adaptive_weight(
            nll_last["kernel"], adv_last["kernel"], loss_cfg.disc_weight
        )
        adv_scale = d_weight * factor

        cotangent = (d_nll_recon + adv_scale * d_adv_recon, jnp.asarray(reg_weight, jnp.float32))
        (model_grads,) = ae_vjp(cotangent)
        learn_logvar = 1.0 if loss_cfg.learn_logvar else 0.0
        gen_grads = {"model": model_grads, "logvar": d_nll_logvar * learn_logvar}
        gen_loss = nll + reg_weight * reg_loss + adv_scale * g_loss
        metrics = {
            "loss": gen_loss,
            "nll": nll,
            "reg_loss": reg_loss,
            "g_loss": g_loss,
            "d_weight": d_weight,
            "disc_factor": factor,
            **nll_metrics,
            **model_metrics,
        }
        return gen_grads, recon, metrics

    def _nll_cotangents(self, x, recon, logvar, frozen):
        """The NLL head (L1 + LPIPS with the logvar) and its cotangents on recon and logvar."""
        loss_cfg = self.config.loss

        def nll_head(recon, logvar):
            if loss_cfg.perceptual_weight:
                perceptual = lpips_lib.lpips_loss(frozen["lpips"], x, recon)
            else:  # LPIPS off: skip the VGG16 pass entirely
                perceptual = jnp.zeros((x.shape[0],), x.dtype)
            return ae_losses.reconstruction_nll(
                x, recon, perceptual, logvar, perceptual_weight=loss_cfg.perceptual_weight,
                kind=self.regularizer,
            )  # fmt: skip

        nll, nll_vjp, nll_metrics = jax.vjp(nll_head, recon, logvar, has_aux=True)
        d_recon, d_logvar = nll_vjp(jnp.ones_like(nll))
        return nll, d_recon, d_logvar, nll_metrics

    def _adv_cotangent(self, state, recon):
        """The adversarial head -mean D(recon) and its cotangent on recon."""
        disc_params = self.for_compute(state.disc_params, "disc_params")

        def adv_head(recon):
            logits, _ = self.disc.apply(
                {"params": disc_params, "batch_stats": state.disc_stats},
                recon,
                train=True,
                mutable=["batch_stats"],
            )
            return ae_losses.generator_adv_loss(logits)

        g_loss, adv_vjp = jax.vjp(adv_head, recon)
        (d_recon,) = adv_vjp(jnp.ones_like(g_loss))
        return g_loss, d_recon

    def train_step(self, state: AutoencoderState, batch, rng, frozen):
        """Pure step: (state, batch, rng, frozen) -> (state, metrics)."""
        x = batch["image"]  # [B, H, W, 3] in [-1, 1]
        rng = jax.random.fold_in(rng, state.step)
        gen_grads, recon, gen_metrics = self.generator_grads(state, x, rng, frozen)
        factor = gen_metrics["disc_factor"]

        # Discriminator on real images and this step's (detached) reconstructions.
        fake = jax.lax.stop_gradient(recon)

        def disc_objective(disc_params):
            disc_params = self.for_compute(disc_params, "disc_params")
            variables = {"params": disc_params, "batch_stats": state.disc_stats}
            logits_real, upd = self.disc.apply(variables, x, train=True, mutable=["batch_stats"])
            variables = {"params": disc_params, "batch_stats": upd["batch_stats"]}
            logits_fake, upd = self.disc.apply(variables, fake, train=True, mutable=["batch_stats"])
            loss = factor * self.disc_loss(logits_real, logits_fake)
            return loss, (upd["batch_stats"], jnp.mean(logits_real), jnp.mean(logits_fake))

        (disc_loss, (disc_stats, logits_real, logits_fake)), disc_grads = jax.value_and_grad(
            disc_objective, has_aux=True
        )(state.disc_params)

        gen_updates, gen_opt = self.gen_tx.update(gen_grads, state.gen_opt, state.gen_params)
        disc_updates, disc_opt = self.disc_tx.update(disc_grads, state.disc_opt, state.disc_params)
        finite = state_lib.all_finite(gen_metrics["loss"], disc_loss, gen_grads, disc_grads)
        candidate = state.replace(
            gen_params=optax.apply_updates(state.gen_params, gen_updates),
            gen_opt=gen_opt,
            disc_params=optax.apply_updates(state.disc_params, disc_updates),
            disc_stats=disc_stats,
            disc_opt=disc_opt,
        )
        new_state = state_lib.advance(state, candidate, finite)
        metrics = {
            **gen_metrics,
            "disc_loss": disc_loss,
            "logits_real": logits_real,
            "logits_fake": logits_fake,
            "grad_norm_gen": state_lib.tree_norm(gen_grads),
            "grad_norm_disc": state_lib.tree_norm(disc_grads),
            "param_norm_gen": state_lib.tree_norm(state.gen_params),
            "update_norm_gen": state_lib.tree_norm(gen_updates),
            "finite": finite.astype(jnp.float32),
        }
        return new_state, metrics

    # ----- evaluation --------------------------------------------------------------------
    def reconstruct(self, state: AutoencoderState, images):
        """Deterministic reconstruction (posterior mode), clipped to [-1, 1]."""
        model_params = state.gen_params["model"]
        if self.regularizer == "kl":
            out = self.model.apply({"params": model_params}, images, sample_posterior=False)
        else:
            out = self.model.apply({"params": model_params}, images)
        return jnp.clip(out.recon, -1.0, 1.0)

    def eval_step(self, state: AutoencoderState, batch, frozen):
        """Per-example PSNR / SSIM / LPIPS of reconstructions: each [B]."""
        x = batch["image"]
        recon = self.reconstruct(state, x)
        return {
            "psnr": image_metrics.psnr(x, recon, data_range=2.0),
            "ssim": image_metrics.ssim(x, recon, data_range=2.0),
            "lpips": lpips_lib.lpips_distance(frozen["lpips"], x, recon),
        }


def _get_path(tree, path):
    return functools.reduce(lambda t, k: t[k], path, tree)
