"""ldm_jax's first-stage train step against the same step in PyTorch (issue 17 d).

    python bench/autoencoder_step_vs_torch.py                      # check, time, breakdown, compile
    python bench/autoencoder_step_vs_torch.py --only check         # step-1 equality only
    python bench/autoencoder_step_vs_torch.py --only time --rounds 7
    python bench/autoencoder_step_vs_torch.py --size 64 --rounds 3 # a quick run at 64^2
    python bench/autoencoder_step_vs_torch.py --only compile       # cold / warm compile

The SD VAE (configs/autoencoder/kl_f8.py) at --size^2, batch --batch, with the GAN term on
(step >= disc_start): encoder, decoder, LPIPS-VGG16, PatchGAN, both Adam updates. The
PyTorch side (bench/autoencoder_torch_ref.py) is diffusers' AutoencoderKL with the very
same VAE weights, and torch modules written for the bench holding ldm_jax's LPIPS and
PatchGAN weights. Both run in this process; torch uses os.cpu_count() threads.

  check      one step each from the same state and batch (the posterior's noise drawn by
             JAX and handed to torch): ldm_jax, torch fp32 in each style, and torch fp64
             as the judge. Losses, every tensor's gradient (Adam's first moment after step
             1 is (1 - b1) x grad) and update compared; exits 1 when ldm_jax is further
             than --rtol (losses) / --grad_rtol (gradients) from fp64, or a torch fp32
             style further than 10 x --rtol. Seen at 64^2: ldm_jax's d_weight 2.4e-5 from
             fp64, torch fp32's 1.6e-3 (a ratio of norms of long, cancelling sums); the
             updates (about lr x sign(grad) at step 1) are reported, not judged.
  time       steady-state steps, interleaved (ldm_jax, torch reference, torch composed,
             ...), medians; ratio = torch s / ldm_jax s (> 1: ldm_jax is faster).
  breakdown  ldm_jax's step in jitted pieces (medians, XLA's FLOPs, GFLOP/s), the same
             pieces in torch, torch's step FLOPs (FlopCounterMode), then the ops below.
             "nll_lpips_fwd_bwd" is the loss form of LPIPS (`lpips_loss`: the target's
             VGG features take no backward pass).
             "optimizers_and_checks" runs undonated, so it copies what the step updates
             in place; read it as an upper bound.
  ops        3x3 convs and GroupNorm+swish at the VAE's big levels, forward and
             forward+backward, in both (GFLOP/s from XLA's count for both).
  compile    compile latency of the step in fresh subprocesses: cold (empty
             JAX_COMPILATION_CACHE_DIR) and warm (the same directory again).

Every figure is one JSON line on stdout. Time on a quiet machine: other processes move
torch's OpenMP threads far more than XLA's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.join(ROOT, "bench")) if p not in sys.path]

from ldm_jax import runtime  # noqa: E402
from ldm_jax.config_loader import load_config  # noqa: E402
from ldm_jax.interop.vae_weights import vae_to_diffusers  # noqa: E402
from ldm_jax.models import autoencoder as ae_models  # noqa: E402
from ldm_jax.models import layers  # noqa: E402
from ldm_jax.models import lpips as lpips_lib  # noqa: E402
from ldm_jax.training.autoencoder import AutoencoderTask  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "autoencoder", "kl_f8.py")
# losses compared at step 1 (ldm_jax metric name == TorchStep metric name)
LOSSES = ("loss", "nll", "reg_loss", "g_loss", "d_weight", "lpips", "disc_loss")
TINY_MODEL = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4)


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def make_task(size: int, batch: int, tiny: bool = False) -> AutoencoderTask:
    config = load_config(CONFIG, lock=False)
    config.batch_size = batch  # scale_lr: lr = batch x base_learning_rate, as in training
    config.data.image_size = size
    if tiny:  # a toy autoencoder and discriminator for the test
        config.model.update(TINY_MODEL)
        config.loss.update(disc_ndf=8, disc_num_layers=2)
    return AutoencoderTask(config)


def setup(size: int, batch: int, tiny: bool = False, seed: int = 0):
    """(task, state at disc_start, batch, rng, frozen): the GAN term is on."""
    task = make_task(size, batch, tiny)
    state = jax.jit(lambda r: nn.unbox(task.init_state(r)))(jax.random.PRNGKey(seed))
    state = state.replace(step=jnp.asarray(task.config.loss.disc_start, jnp.int32))
    rng = np.random.default_rng(seed)
    # smooth images in [-1, 1] (noise upsampled) rather than white noise
    low = rng.uniform(-1, 1, (batch, max(size // 8, 1), max(size // 8, 1), 3)).astype(np.float32)
    x = jax.image.resize(jnp.asarray(low), (batch, size, size, 3), "bilinear")
    x = jnp.clip(x + 0.05 * jnp.asarray(rng.standard_normal(x.shape, np.float32)), -1, 1)
    return task, state, {"image": x}, jax.random.PRNGKey(seed + 2), task.frozen_params()


def posterior_noise(task, state, x, rng):
    """The N(0, 1) draw the step's posterior sample uses (rng as train_step receives it)."""
    r_sample, _ = jax.random.split(jax.random.fold_in(rng, state.step))

    def draw(module, x):
        post = module.encode(x, train=True)
        return jax.random.normal(module.make_rng("sample"), post.mean.shape, post.mean.dtype)

    params = {"params": state.gen_params["model"]}
    return task.model.apply(params, x, method=draw, rngs={"sample": r_sample})


def nchw(a):  # [B, H, W, C] jax/numpy -> [B, C, H, W] torch
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def flops_of(compiled) -> float:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float((ca or {}).get("flops", float("nan")))


def compile_fn(fn, args, donate=()):
    """(compiled, FLOPs, compile seconds) of jit(fn) for args."""
    t = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    return compiled, flops_of(compiled), time.perf_counter() - t


def _tree_np(tree):
    return jax.tree.map(lambda a: np.array(a), tree)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ----- check ------------------------------------------------------------------------------
def jax_named(task, model_tree, disc_tree) -> dict:
    """ldm_jax trees under the TorchStep.named_tensors names, torch layouts."""
    out = dict(vae_to_diffusers({"params": model_tree}, task.model))
    for name, p in disc_tree.items():
        i = name.removeprefix("main_")
        for leaf, value in p.items():
            value = np.asarray(value)
            if leaf == "kernel":
                value = value.transpose(3, 2, 0, 1)
            out[f"disc.main.{i}.{'weight' if leaf in ('kernel', 'scale') else leaf}"] = value
    return out


def _torch_run(task, state, frozen, x, noise, style, dtype):
    """(metrics, {name: grad}, {name: update}) of one TorchStep in `dtype`."""
    import torch
    from autoencoder_torch_ref import TorchStep

    ref = TorchStep(task, state, frozen["lpips"], style, dtype=dtype)
    named = ref.named_tensors()
    old = {k: v.detach().double().numpy().copy() for k, v in named.items()}
    metrics = ref(nchw(x), nchw(noise), 1.0)
    b1 = task.config.optim.b1
    with torch.no_grad():
        grads = {k: ref.adam_mu(p).double().numpy() / (1 - b1) for k, p in named.items()}
        updates = {k: p.double().numpy() - old[k] for k, p in named.items()}
    return metrics, grads, updates


def _zero_grad_by_design(name: str) -> bool:
    # softmax over keys ignores a key bias (q . b is the same for every key): its true
    # gradient is 0 and every side holds rounding noise
    return name.endswith("attentions.0.to_k.bias")


def check(size, batch, styles=("reference",), tiny=False, seed=0) -> dict:
    """One step each from the same state and batch: ldm_jax, torch fp32 per style, and
    torch fp64 (the judge: which fp32 side is nearer the exact step). Relative differences
    of the losses, of each tensor's gradient (Adam's first moment / (1 - b1)) and update."""
    import torch

    task, state, batch_, rng, frozen = setup(size, batch, tiny, seed)
    x = batch_["image"]
    noise = posterior_noise(task, state, x, rng)
    old_j = jax_named(task, state.gen_params["model"], state.disc_params)
    new_state, metrics = jax.jit(task.train_step)(state, batch_, rng, frozen)
    jm = {k: float(metrics[k]) for k in LOSSES}
    b1 = task.config.optim.b1
    mu_j = jax_named(task, new_state.gen_opt[0].mu["model"], new_state.disc_opt[0].mu)
    grads_j = {k: v / (1 - b1) for k, v in mu_j.items()}
    upd_j = {k: v - old_j[k] for k, v in jax_named(
        task, new_state.gen_params["model"], new_state.disc_params).items()}  # fmt: skip
    m64, g64, u64 = _torch_run(task, state, frozen, x, noise, styles[0], torch.float64)
    names = [k for k in g64 if not _zero_grad_by_design(k)]
    worst = lambda d: dict(sorted(d.items(), key=lambda kv: -kv[1])[:3])
    loss_rel = lambda a, b: {k: abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in LOSSES}
    grad_rel = {k: rel(grads_j[k], g64[k]) for k in names}
    out = dict(
        losses={"ldm_jax": jm, "torch_fp64": m64},
        ldm_jax_vs_fp64=loss_rel(jm, m64),
        ldm_jax_grad_vs_fp64=worst(grad_rel),
        max_grad_rel=max(grad_rel.values()),
        max_update_rel=max(rel(upd_j[k], u64[k]) for k in names),
        tensors=len(names),
        zero_by_design_grad_norms={
            k: [float(np.linalg.norm(grads_j[k])), float(np.linalg.norm(g64[k]))]
            for k in g64 if k not in names
        },
    )  # fmt: skip
    for style in styles:
        m32, g32, _ = _torch_run(task, state, frozen, x, noise, style, torch.float32)
        out["losses"][f"torch_{style}"] = m32
        out[f"torch_{style}_vs_fp64"] = loss_rel(m32, m64)
        out[f"ldm_jax_vs_torch_{style}"] = loss_rel(jm, m32)
        out[f"torch_{style}_max_grad_rel_vs_fp64"] = max(rel(g32[k], g64[k]) for k in names)
    out["max_loss_rel"] = max(out["ldm_jax_vs_fp64"].values())
    out["max_torch_loss_rel"] = max(max(out[f"torch_{s}_vs_fp64"].values()) for s in styles)
    return out


def run_check(args) -> bool:
    t = time.perf_counter()
    r = check(args.size, args.batch, tuple(args.torch_styles), seed=args.seed)
    # ldm_jax against the exact (fp64) step; each torch fp32 style against it too (its own
    # rounding reaches ~2e-3 in d_weight, a ratio of norms of long sums)
    good = (
        r["max_loss_rel"] <= args.rtol
        and r["max_grad_rel"] <= args.grad_rtol
        and r["max_torch_loss_rel"] <= 10 * args.rtol
    )
    emit(section="check", size=args.size, batch=args.batch, ok=good,
         seconds=round(time.perf_counter() - t, 1), **r)  # fmt: skip
    if not good:
        print(
            f"MISMATCH: ldm_jax vs fp64 losses {r['ldm_jax_vs_fp64']}, worst grads "
            f"{r['ldm_jax_grad_vs_fp64']}, torch fp32 vs fp64 max {r['max_torch_loss_rel']} "
            f"(rtol {args.rtol}, grad_rtol {args.grad_rtol}, torch 10 x rtol)",
            file=sys.stderr,
        )
    return good


# ----- time ---------------------------------------------------------------------------------
def run_time(args) -> None:
    import torch
    from autoencoder_torch_ref import TorchStep

    task, state, batch, rng, frozen = setup(args.size, args.batch, seed=args.seed)
    x = batch["image"]
    noise_t = nchw(posterior_noise(task, state, x, rng))  # a fixed draw: the cost is alike
    x_t = nchw(x)
    factor = float(task.config.loss.disc_factor)
    refs = {s: TorchStep(task, state, frozen["lpips"], s) for s in args.torch_styles}
    step, flops, compile_s = compile_fn(task.train_step, (state, batch, rng, frozen), (0,))
    holder = {"state": state}

    def jax_call():
        holder["state"], m = step(holder["state"], batch, rng, frozen)
        jax.block_until_ready(m)

    calls = {"ldm_jax": jax_call}
    for s, ref in refs.items():
        calls[f"torch_{s}"] = lambda ref=ref: ref(x_t, noise_t, factor)
    times = {k: [] for k in calls}
    for fn in calls.values():  # warm-up
        for _ in range(args.warmup):
            fn()
    names = list(calls)
    for r in range(args.rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            t = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    emit(section="time", impl="ldm_jax", size=args.size, batch=args.batch, step_s=med["ldm_jax"],
         compile_s=compile_s, flops=flops, gflops_per_s=flops / med["ldm_jax"] / 1e9,
         times=times["ldm_jax"])  # fmt: skip
    for k in names[1:]:
        emit(section="time", impl=k, size=args.size, batch=args.batch, step_s=med[k],
             ratio_torch_over_ldm_jax=med[k] / med["ldm_jax"], times=times[k],
             torch_threads=torch.get_num_threads())  # fmt: skip


# ----- breakdown ----------------------------------------------------------------------------
def median_s(fn, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def jax_parts(task, state, x, rng, frozen) -> dict:
    """{part: (fn, args)}: the pieces of ldm_jax's step, each a function to jit."""
    import optax

    from ldm_jax.losses import autoencoder as ae_losses
    from ldm_jax.training import state as state_lib

    model, loss_cfg, lp = task.model, task.config.loss, frozen["lpips"]
    params, logvar = state.gen_params["model"], state.gen_params["logvar"]
    r_sample, r_drop = jax.random.split(rng)

    def vae_fwd(p, x):
        out = model.apply(
            {"params": p}, x, train=True, rngs={"sample": r_sample, "dropout": r_drop}
        )
        return out.recon, out.reg_loss, out.hidden

    recon, _, hidden = jax.jit(vae_fwd)(params, x)
    ct = 1e-3 * jax.random.normal(jax.random.PRNGKey(5), recon.shape)

    def vae_fwd_bwd(p, x, ct):
        _, vjp = jax.vjp(lambda p: vae_fwd(p, x)[:2], p)
        return vjp((ct, jnp.float32(loss_cfg.kl_weight)))[0]

    def adaptive(last, hidden, a, b):
        _, conv_vjp = jax.vjp(lambda p: ae_models.apply_output_conv(p, hidden), last)
        k = lambda c: conv_vjp(c)[0]["kernel"]
        return ae_losses.adaptive_weight(k(a), k(b), loss_cfg.disc_weight)

    def disc_update(dp, stats, x, fake):
        def objective(dp):
            v = {"params": dp, "batch_stats": stats}
            lr, upd = task.disc.apply(v, x, train=True, mutable=["batch_stats"])
            v = {"params": dp, "batch_stats": upd["batch_stats"]}
            lf, upd = task.disc.apply(v, fake, train=True, mutable=["batch_stats"])
            return task.disc_loss(lr, lf), upd["batch_stats"]

        return jax.value_and_grad(objective, has_aux=True)(dp)

    def optimizer(s, gen_grads, disc_grads):
        gu, go = task.gen_tx.update(gen_grads, s.gen_opt, s.gen_params)
        du, do = task.disc_tx.update(disc_grads, s.disc_opt, s.disc_params)
        fin = state_lib.all_finite(gen_grads, disc_grads)
        new = s.replace(gen_params=optax.apply_updates(s.gen_params, gu), gen_opt=go,
                        disc_params=optax.apply_updates(s.disc_params, du), disc_opt=do)  # fmt: skip
        norms = [state_lib.tree_norm(t) for t in (gen_grads, disc_grads, s.gen_params, gu)]
        return state_lib.advance(s, new, fin), norms

    last = params["decoder"]["conv_out"]
    a, b = ct, 1e-3 * jax.random.normal(jax.random.PRNGKey(6), recon.shape)
    grads = jax.tree.map(lambda t: 1e-3 * jnp.ones_like(t), (state.gen_params, state.disc_params))
    return {
        "vae_fwd": (lambda p, x: vae_fwd(p, x)[:2], (params, x)),
        "vae_fwd_bwd": (vae_fwd_bwd, (params, x, ct)),
        "lpips_fwd": (lpips_lib.lpips_distance, (lp, x, recon)),
        "nll_lpips_fwd_bwd": (
            lambda lp, x, r, v: task._nll_cotangents(x, r, v, {"lpips": lp})[:3],
            (lp, x, recon, logvar),
        ),  # fmt: skip
        "adv_disc_fwd_bwd": (task._adv_cotangent, (state, recon)),
        "adaptive_weight_vjps": (adaptive, (last, hidden, a, b)),
        "disc_update_fwd_bwd": (disc_update, (state.disc_params, state.disc_stats, x, recon)),
        "generator_grads": (
            lambda s, x, r, lp: task.generator_grads(s, x, r, {"lpips": lp})[0],
            (state, x, rng, lp),
        ),  # fmt: skip
        "optimizers_and_checks": (optimizer, (state, *grads)),
    }


def torch_parts(ref, x, noise) -> dict:
    """{part: fn} of the same pieces in torch (ref: a TorchStep)."""
    import torch

    vae, lpips, disc = ref.vae, ref.lpips, ref.disc
    disc.requires_grad_(False)
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.mean + post.std * noise).sample
    ct = 1e-3 * torch.randn_like(recon)

    def vae_fwd(grad=True):
        with torch.set_grad_enabled(grad):
            post = vae.encode(x).latent_dist
            r = vae.decode(post.mean + post.std * noise).sample
            kl = 0.5 * torch.sum(post.mean**2 + post.var - 1.0 - post.logvar) / x.shape[0]
        return r, kl

    def vae_fwd_bwd():
        r, kl = vae_fwd()
        torch.autograd.backward([r, kl], [ct, torch.tensor(1e-6)])
        vae.zero_grad(set_to_none=True)

    def nll_fwd_bwd():
        leaf = recon.detach().requires_grad_(True)
        torch.autograd.grad(ref._nll(x, leaf)[0], leaf)

    def adv_fwd_bwd():
        leaf = recon.detach().requires_grad_(True)
        torch.autograd.grad(-torch.mean(disc(leaf)), leaf)

    def disc_update():
        disc.requires_grad_(True)
        lr, lf = disc(x), disc(recon)
        (0.5 * (torch.relu(1 - lr).mean() + torch.relu(1 + lf).mean())).backward()
        disc.zero_grad(set_to_none=True)
        disc.requires_grad_(False)

    # the reference style's adaptive weight: two grads through LPIPS / D to conv_out
    r, _ = vae_fwd()
    nll, g_loss = ref._nll(x, r)[0], -torch.mean(disc(r))
    last = vae.decoder.conv_out.weight

    def adaptive_reference():
        torch.autograd.grad(nll, last, retain_graph=True)
        torch.autograd.grad(g_loss, last, retain_graph=True)

    def lpips_fwd():
        with torch.no_grad():
            lpips(x, recon)

    return {
        "vae_fwd": lambda: vae_fwd(grad=False),
        "vae_fwd_bwd": vae_fwd_bwd,
        "lpips_fwd": lpips_fwd,
        "nll_lpips_fwd_bwd": nll_fwd_bwd,
        "adv_disc_fwd_bwd": adv_fwd_bwd,
        "adaptive_weight_grads_reference_style": adaptive_reference,
        "disc_update_fwd_bwd": disc_update,
    }


def op_cases(size: int, batch: int) -> list:
    """(name, kind, [B, H, W, C] input, out channels): the VAE's big-level ops."""
    out = []
    for h, c, note in ((size, 128, "level 0"), (size, 256, "up_1 upsample conv at full size"),
                       (size // 2, 256, "level 1"), (size // 4, 512, "level 2")):  # fmt: skip
        out.append((f"conv3x3 {c}->{c} at {h}^2 ({note})", "conv", (batch, h, h, c), c))
    for h, c in ((size, 128), (size // 2, 256), (size // 4, 512)):
        out.append((f"groupnorm32+swish {c} at {h}^2", "gn", (batch, h, h, c), c))
    return out


def run_ops(args) -> None:
    for name, kind, shape, cout in op_cases(args.size, args.batch):
        x = jax.random.normal(jax.random.PRNGKey(0), shape)
        mod = layers.conv(cout, 3) if kind == "conv" else layers.group_norm(32)
        variables = mod.init(jax.random.PRNGKey(1), x)
        act = (lambda h: h) if kind == "conv" else layers.swish
        ct = jax.random.normal(jax.random.PRNGKey(2), shape[:3] + (cout,))

        def fwd_bwd(v, x, ct, mod=mod, act=act):
            _, vjp = jax.vjp(lambda v, x: act(mod.apply(v, x)), v, x)
            return vjp(ct)

        for part, fn, a in (("fwd", lambda v, x, mod=mod, act=act: act(mod.apply(v, x)), (variables, x)),
                            ("fwd_bwd", fwd_bwd, (variables, x, ct))):  # fmt: skip
            compiled, flops, _ = compile_fn(fn, a)
            s = median_s(lambda c=compiled, a=a: jax.block_until_ready(c(*a)), args.rounds)
            emit(section="op", impl="ldm_jax", op=name, part=part, s=s, flops=flops,
                 gflops_per_s=flops / s / 1e9)  # fmt: skip
            ts = torch_op(kind, shape, cout, part)
            emit(section="op", impl="torch", op=name, part=part, s=ts, flops_xla_count=flops,
                 gflops_per_s=flops / ts / 1e9, ratio_torch_over_ldm_jax=ts / s)  # fmt: skip


def torch_op(kind, shape, cout, part) -> float:
    import torch

    b, h, w, c = shape
    x = torch.randn(b, c, h, w, requires_grad=part == "fwd_bwd")
    if kind == "conv":
        mod, act = torch.nn.Conv2d(c, cout, 3, padding=1), lambda t: t
    else:
        mod, act = torch.nn.GroupNorm(32, c, eps=1e-6), torch.nn.functional.silu
    ct = torch.randn(b, cout, h, w)

    def call():
        if part == "fwd":
            with torch.no_grad():
                act(mod(x))
        else:
            torch.autograd.backward(act(mod(x)), ct)
            mod.zero_grad(set_to_none=True)
            x.grad = None

    return median_s(call, 3)


def run_breakdown(args) -> None:
    from autoencoder_torch_ref import TorchStep

    task, state, batch, rng, frozen = setup(args.size, args.batch, seed=args.seed)
    x = batch["image"]
    rows = {}
    for part, (fn, a) in jax_parts(task, state, x, rng, frozen).items():
        compiled, flops, compile_s = compile_fn(fn, a)
        s = median_s(lambda c=compiled, a=a: jax.block_until_ready(c(*a)), args.rounds)
        rows[part] = s
        emit(section="breakdown", impl="ldm_jax", part=part, s=s, flops=flops,
             gflops_per_s=flops / s / 1e9, compile_s=compile_s)  # fmt: skip
    step, flops, compile_s = compile_fn(task.train_step, (state, batch, rng, frozen), (0,))
    for part, start in (("step_gan_on", state.step), ("step_gan_off (step 0)", 0)):
        holder = {"state": state.replace(step=jnp.asarray(start, jnp.int32))}
        holder["state"] = jax.tree.map(jnp.copy, holder["state"])  # step donates its state

        def call(holder=holder):
            holder["state"], m = step(holder["state"], batch, rng, frozen)
            jax.block_until_ready(m)

        s = median_s(call, args.rounds)
        rows[part] = s
        emit(section="breakdown", impl="ldm_jax", part=part, s=s, flops=flops,
             gflops_per_s=flops / s / 1e9, compile_s=compile_s)  # fmt: skip
    parts = ("generator_grads", "disc_update_fwd_bwd", "optimizers_and_checks")
    emit(section="breakdown", impl="ldm_jax", part="sum(" + " + ".join(parts) + ")",
         s=sum(rows[p] for p in parts), step_s=rows["step_gan_on"])  # fmt: skip

    ref = TorchStep(task, state, frozen["lpips"], "reference")
    noise = nchw(posterior_noise(task, state, x, rng))
    for part, fn in torch_parts(ref, nchw(x), noise).items():
        s = median_s(fn, args.rounds)
        emit(section="breakdown", impl="torch", part=part, s=s,
             ratio_torch_over_ldm_jax=s / rows[part] if part in rows else None)  # fmt: skip
    try:
        from torch.utils.flop_counter import FlopCounterMode

        for style in args.torch_styles:
            counted = TorchStep(task, state, frozen["lpips"], style)
            try:
                with FlopCounterMode(display=False) as counter:
                    counted(nchw(x), noise, 1.0)
            except RuntimeError as e:  # its hooks refuse autograd.grad on a leaf (composed)
                emit(section="breakdown", impl=f"torch_{style}", flop_counter_error=str(e)[:80])
                continue
            emit(section="breakdown", impl=f"torch_{style}", part="step FLOPs (conv/matmul)",
                 flops=counter.get_total_flops(), ldm_jax_xla_flops=flops)  # fmt: skip
    except ImportError:
        pass
    run_ops(args)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", choices=["check", "time", "breakdown", "ops", "compile"], action="append"
    )
    parser.add_argument("--torch_styles", default="reference,composed",
                        help="comma-separated: reference, composed")  # fmt: skip
    parser.add_argument("--rtol", type=float, default=1e-3, help="losses, relative")
    parser.add_argument("--grad_rtol", type=float, default=5e-3,
                        help="each tensor's gradient, relative in norm")  # fmt: skip
    parser.add_argument("--_compile_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.torch_styles = [s for s in args.torch_styles.split(",") if s]
    if args._compile_child:
        return compile_child(args)
    runtime.setup()
    import torch

    torch.set_num_threads(os.cpu_count())
    emit(section="env", devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
         cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), jax=jax.__version__,
         torch=torch.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
         loadavg=os.getloadavg())  # fmt: skip
    only = args.only or ["check", "time", "breakdown", "compile"]
    ok = True
    if "check" in only:
        ok = run_check(args)
    if "time" in only:
        run_time(args)
    if "breakdown" in only:
        run_breakdown(args)
    if "ops" in only and "breakdown" not in only:  # breakdown ends with the ops
        run_ops(args)
    if "compile" in only:
        run_compile(args)
    if not ok:
        sys.exit(1)


# ----- compile ------------------------------------------------------------------------------
def compile_child(args) -> None:
    """Trace, lower and compile the step from abstract shapes; one JSON line."""
    runtime.setup(os.environ["JAX_COMPILATION_CACHE_DIR"])
    t0 = time.perf_counter()
    task = make_task(args.size, args.batch)
    state = jax.eval_shape(lambda r: nn.unbox(task.init_state(r)), jax.random.PRNGKey(0))
    frozen = jax.eval_shape(task.frozen_params)
    batch = {"image": jax.ShapeDtypeStruct((args.batch, args.size, args.size, 3), jnp.float32)}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    t1 = time.perf_counter()
    lowered = jax.jit(task.train_step, donate_argnums=0).lower(state, batch, rng, frozen)
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
    print(json.dumps(dict(build_s=t1 - t0, trace_lower_s=t2 - t1, compile_s=t3 - t2)), flush=True)


def run_compile(args) -> None:
    with tempfile.TemporaryDirectory(prefix="ldm_jax_compile_cache_") as cache:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache)
        cmd = [sys.executable, os.path.abspath(__file__), "--_compile_child",
               "--size", str(args.size), "--batch", str(args.batch)]  # fmt: skip
        for kind in ("cold", "warm"):
            t = time.perf_counter()
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - t
            emit(section="compile", cache=kind, size=args.size, batch=args.batch,
                 process_s=wall, **json.loads(out.stdout.strip().splitlines()[-1]))  # fmt: skip


if __name__ == "__main__":
    main()
