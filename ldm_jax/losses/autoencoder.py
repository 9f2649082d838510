"""First-stage losses: L1 + LPIPS reconstruction NLL, KL/codebook regulariser, PatchGAN.

Plain functions over arrays; the training step composes them. Conventions follow the
reference loss classes (PAPER_FACTS section 4):
  KL:  rec = |x - x_hat| + w_p * LPIPS (LPIPS broadcast to every pixel),
       nll = sum(rec / exp(logvar) + logvar) / B, regulariser = sum(KL) / B.
  VQ:  nll = mean(rec) (no logvar), regulariser = codebook loss (mean convention).
  GAN: g_loss = -mean(D(x_hat)); adaptive weight ||grad nll|| / (||grad g|| + 1e-4) at the
       decoder's last layer, clipped to [0, 1e4], times disc_weight; zero before disc_start.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reconstruction_nll(x, recon, perceptual, logvar, *, perceptual_weight, kind):
    """x, recon: [B, H, W, C]; perceptual: [B] LPIPS distances; logvar: scalar.

    Returns (nll, metrics) where nll is the scalar the generator minimises.
    """
    abs_err = jnp.abs(x - recon)  # [B, H, W, C]
    rec = abs_err + perceptual_weight * perceptual[:, None, None, None]
    if kind == "kl":
        nll = jnp.sum(rec / jnp.exp(logvar) + logvar) / x.shape[0]
    else:
        nll = jnp.mean(rec)
    metrics = {
        "rec_loss": jnp.mean(rec),
        "l1": jnp.mean(abs_err),
        "lpips": jnp.mean(perceptual),
        "logvar": logvar,
    }
    return nll, metrics


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (
        jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake))
    )


def vanilla_d_loss(logits_real, logits_fake):
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def disc_loss_fn(name: str):
    if name not in DISC_LOSSES:
        raise ValueError(f"unknown loss.disc_loss {name!r}; valid: {sorted(DISC_LOSSES)}")
    return DISC_LOSSES[name]


def generator_adv_loss(logits_fake):
    return -jnp.mean(logits_fake)


def adaptive_weight(nll_last_grad, g_last_grad, disc_weight):
    """||dNLL/dW_last|| / (||dG/dW_last|| + 1e-4), clipped to [0, 1e4], times disc_weight."""
    nll_norm = jnp.linalg.norm(nll_last_grad.ravel())
    g_norm = jnp.linalg.norm(g_last_grad.ravel())
    w = jnp.clip(nll_norm / (g_norm + 1e-4), 0.0, 1e4)
    return jax.lax.stop_gradient(w) * disc_weight


def disc_factor(step, *, disc_start, factor):
    """The GAN terms are off (0) before `disc_start` steps have been taken."""
    return jnp.where(step >= disc_start, factor, 0.0)
