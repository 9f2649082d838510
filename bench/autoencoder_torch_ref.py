"""PyTorch twin of ldm_jax's first-stage train step (bench/autoencoder_step_vs_torch.py).

diffusers' AutoencoderKL loaded with ldm_jax's VAE weights (ldm_jax.interop.vae_weights),
and small torch modules written here for LPIPS-VGG16 (ScalingLayer, VGG16 features, unit
normalisation, the v0.1 linear heads) and the PatchGAN (taming's NLayerDiscriminator
indices), loaded from ldm_jax's params (flax HWIO kernels -> torch OIHW).

The step is ldm_jax's `AutoencoderTask.train_step` in torch: L1 + LPIPS nll with the
logvar, KL, the adaptive GAN weight at the decoder's conv_out, hinge discriminator loss on
real images and this step's detached reconstructions, one Adam update each. Two ways of
getting the adaptive weight's last-layer gradients:

  reference  taming's LPIPSWithDiscriminator: torch.autograd.grad(nll, last_layer) and
             torch.autograd.grad(g_loss, last_layer), then loss.backward() (LPIPS and the
             discriminator are differentiated twice);
  composed   ldm_jax's way: cotangents on recon from each head once, the last-layer grads
             as two cheap conv weight-grads, one backward of the autoencoder.

Left out on purpose: ldm_jax's non-finite check, its norms in the metrics (cheap), and
the discriminator's BatchNorm running statistics (torch tracks the unbiased variance and
also updates them in the generator's pass; neither changes a train-mode output).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm_jax.models import lpips as lpips_lib

STYLES = ("reference", "composed")


def _oihw(kernel) -> torch.Tensor:  # flax HWIO -> torch OIHW
    return torch.from_numpy(np.array(np.asarray(kernel).transpose(3, 2, 0, 1), np.float32))


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, np.float32))


class LPIPSVGG16(nn.Module):
    """distance(x, y) [B] for x, y [B, 3, H, W] in [-1, 1]; x and y pass the VGG separately
    (as the lpips package does), so no backward runs through the x branch."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(lpips_lib._SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(lpips_lib._SCALE).view(1, 3, 1, 1))
        stages, lins, cin = [], [], 3
        for widths in lpips_lib.VGG16_STAGES:
            convs = []
            for c in widths:
                convs.append(nn.Conv2d(cin, c, 3, padding=1))
                cin = c
            stages.append(nn.ModuleList(convs))
            lins.append(nn.Conv2d(cin, 1, 1, bias=False))
        self.stages, self.lins = nn.ModuleList(stages), nn.ModuleList(lins)
        self.requires_grad_(False)

    def features(self, x):
        h, out = (x - self.shift) / self.scale, []
        for s, convs in enumerate(self.stages):
            if s:
                h = F.max_pool2d(h, 2)
            for conv in convs:
                h = F.relu(conv(h))
            out.append(h / (torch.sqrt(torch.sum(h * h, dim=1, keepdim=True)) + 1e-10))
        return out

    def forward(self, x, y):
        total = 0.0
        for lin, fx, fy in zip(self.lins, self.features(x), self.features(y)):
            total = total + lin((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return total

    @torch.no_grad()
    def load_flax(self, params: dict) -> None:
        for s, convs in enumerate(self.stages):
            for k, conv in enumerate(convs):
                p = params[f"conv{s + 1}_{k + 1}"]
                conv.weight.copy_(_oihw(p["kernel"]))
                conv.bias.copy_(_t(p["bias"]))
            self.lins[s].weight.copy_(_oihw(params[f"lin{s}"]["kernel"]))


class NLayerDiscriminator(nn.Module):
    """taming's PatchGAN; `main.{i}` indices equal ldm_jax's `main_{i}` param names."""

    def __init__(self, input_nc=3, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        return self.main(x)

    @torch.no_grad()
    def load_flax(self, params: dict, stats: dict) -> None:
        for i, mod in enumerate(self.main):
            name = f"main_{i}"
            if isinstance(mod, nn.Conv2d):
                mod.weight.copy_(_oihw(params[name]["kernel"]))
                if mod.bias is not None:
                    mod.bias.copy_(_t(params[name]["bias"]))
            elif isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(_t(params[name]["scale"]))
                mod.bias.copy_(_t(params[name]["bias"]))
                mod.running_mean.copy_(_t(stats[name]["mean"]))
                mod.running_var.copy_(_t(stats[name]["var"]))


def diffusers_vae(task, gen_model_params) -> nn.Module:
    """diffusers' AutoencoderKL holding ldm_jax's autoencoder params."""
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    from ldm_jax.interop.diffusers_config import vae_config_to_diffusers
    from ldm_jax.interop.vae_weights import vae_to_diffusers

    cfg = vae_config_to_diffusers(task.config.model, scaling_factor=1.0)
    cfg.pop("_class_name")
    diffusers_logging.set_verbosity_error()  # its note on casting with .to(float64)
    vae = AutoencoderKL(**cfg)
    state = vae_to_diffusers({"params": gen_model_params}, task.model)
    vae.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return vae.train()


class TorchStep:
    """One train step of ldm_jax's autoencoder task in torch; `__call__` returns metrics."""

    def __init__(self, task, state, lpips_params, style="reference", dtype=torch.float32):
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        cfg = task.config
        self.style, self.loss = style, cfg.loss
        self.vae = diffusers_vae(task, state.gen_params["model"])
        self.lpips = LPIPSVGG16()
        self.lpips.load_flax(lpips_params)
        self.disc = NLayerDiscriminator(
            cfg.loss.disc_in_channels, cfg.loss.disc_ndf, cfg.loss.disc_num_layers
        ).train()
        self.disc.load_flax(state.disc_params, state.disc_stats)
        self.logvar = torch.tensor(float(np.asarray(state.gen_params["logvar"])), dtype=dtype)
        self.dtype = dtype
        for mod in (self.vae, self.lpips, self.disc):
            mod.to(dtype)
        opt = cfg.optim
        adam = dict(betas=(opt.b1, opt.b2), eps=opt.eps)
        self.opt_g = torch.optim.Adam(
            self.vae.parameters(), lr=task.learning_rate * opt.lr_g_factor, **adam
        )
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=task.learning_rate, **adam)

    def _nll(self, x, recon):
        p = self.lpips(x, recon) if self.loss.perceptual_weight else torch.zeros(x.shape[0])
        rec = (x - recon).abs() + self.loss.perceptual_weight * p[:, None, None, None]
        nll = torch.sum(rec / torch.exp(self.logvar) + self.logvar) / x.shape[0]
        return nll, p

    def _d_weight(self, g_nll, g_adv):
        w = torch.clamp(g_nll.norm() / (g_adv.norm() + 1e-4), 0.0, 1e4)
        return w.detach() * self.loss.disc_weight

    def __call__(self, x, noise, factor: float) -> dict:
        """x [B, 3, H, W] in [-1, 1]; noise [B, z, h, w] the posterior sample's N(0, 1)."""
        loss_cfg, b = self.loss, x.shape[0]
        x, noise = x.to(self.dtype), noise.to(self.dtype)
        post = self.vae.encode(x).latent_dist
        recon = self.vae.decode(post.mean + post.std * noise).sample
        kl = 0.5 * torch.sum(post.mean**2 + post.var - 1.0 - post.logvar) / b
        last = self.vae.decoder.conv_out.weight
        self.disc.requires_grad_(False)  # as Lightning's toggle_optimizer in the reference
        if self.style == "reference":
            nll, p = self._nll(x, recon)
            g_loss = -torch.mean(self.disc(recon))
            (g_nll,) = torch.autograd.grad(nll, last, retain_graph=True)
            (g_adv,) = torch.autograd.grad(g_loss, last, retain_graph=True)
            d_weight = self._d_weight(g_nll, g_adv)
            loss = nll + loss_cfg.kl_weight * kl + d_weight * factor * g_loss
            self.opt_g.zero_grad(set_to_none=True)
            loss.backward()
        else:
            leaf = recon.detach().requires_grad_(True)
            nll, p = self._nll(x, leaf)
            (d_nll,) = torch.autograd.grad(nll, leaf)
            g_loss = -torch.mean(self.disc(leaf))
            (d_adv,) = torch.autograd.grad(g_loss, leaf)
            (g_nll,) = torch.autograd.grad(recon, last, d_nll, retain_graph=True)
            (g_adv,) = torch.autograd.grad(recon, last, d_adv, retain_graph=True)
            d_weight = self._d_weight(g_nll, g_adv)
            loss = nll + loss_cfg.kl_weight * kl + d_weight * factor * g_loss
            self.opt_g.zero_grad(set_to_none=True)
            cotangent = d_nll + (d_weight * factor) * d_adv
            kl_ct = torch.tensor(loss_cfg.kl_weight, dtype=self.dtype)
            torch.autograd.backward([recon, kl], [cotangent, kl_ct])
        self.opt_g.step()

        self.disc.requires_grad_(True)
        logits_real = self.disc(x)
        logits_fake = self.disc(recon.detach())
        hinge = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
        disc_loss = factor * hinge
        self.opt_d.zero_grad(set_to_none=True)
        disc_loss.backward()
        self.opt_d.step()
        out = dict(
            loss=loss, nll=nll, reg_loss=kl, g_loss=g_loss, d_weight=d_weight, lpips=p.mean(),
            disc_loss=disc_loss, logits_real=logits_real.mean(), logits_fake=logits_fake.mean(),
        )  # fmt: skip
        return {k: float(v.detach()) for k, v in out.items()}

    def named_tensors(self) -> dict:
        """{diffusers name: param}, {'disc.main.i.weight': param}: what the check compares."""
        out = {k: v for k, v in self.vae.named_parameters()}
        out.update({f"disc.{k}": v for k, v in self.disc.named_parameters()})
        return out

    def adam_mu(self, param) -> torch.Tensor | None:
        """Adam's first moment of `param` ((1 - b1) x grad after the first step)."""
        for opt in (self.opt_g, self.opt_d):
            if param in opt.state:
                return opt.state[param]["exp_avg"]
        return None
