"""The GPU benchmark suite: one command, three figures, for BENCHMARKS.md.

    python bench/gpu_suite.py [--tiny] [--only unet|txt2img|vae] [--out results.json]

On one NVIDIA H200 the whole suite is sized to run in under 10 minutes, compilation
included (most of it is compiling: two probes and the chosen batch of the UNet step, a
program per txt2img batch, the VAE step); `--batch N` skips the UNet's batch search on a
rerun. `--tiny` runs the same code paths at toy sizes (about 3 minutes on a 2-core CPU),
to check them, not to measure anything. It prints markdown lines to paste into
BENCHMARKS.md and, with `--out`, writes the same figures as JSON (rewritten after each
section, so a run cut short keeps what it finished). Every figure excludes compilation;
weights are random.

1. unet: the SD2-base UNet train step "from cached latents": 64x64x4 latents (512^2
   images) and 77x1024 text context, random, given to the step as a latent cache would
   (no VAE or text encoder in it); bf16 compute, fp32 master params, AdamW, an EMA copy of
   the UNet, v-prediction loss, the non-finite-update guard of the training loop
   (ldm_jax.training.diffusion's step, less its first stage and conditioner). The batch
   is the largest that fits: two compile-only probes (8 and 16) give XLA's memory need per
   image, the batch predicted to fill the device is run, stepping back after an
   out-of-memory error (RESOURCE_EXHAUSTED); without a memory limit to predict from (the
   CPU), the batch doubles from the first one until it fails or reaches --max_batch.
   Reports images/s (median step), TFLOP per step from XLA's cost analysis of the
   compiled step (ldm_jax.training.telemetry.step_flops), MFU against the device's bf16
   peak (telemetry.peak_flops; --peak_flops overrides; 'n/a' on a CPU without it) and
   device memory (peak_bytes_in_use, where the backend reports it). XLA:GPU's cost
   analysis leaves cuDNN's flash attention (a custom call) out of its FLOPs, so when the
   compiled step holds such calls, "MFU + attn" adds the attention FLOPs counted from the
   traced shapes (4 B H Lq Lk D per forward, 3x that per train step).
   Goal: at least 165 images/s per H200.
2. txt2img: SD-1.5 text-to-image at 512^2: CLIP ViT-L/14 text encoder (prompt and empty
   prompt), 50 DDIM steps of the SD-1 UNet with classifier-free guidance 7.5 (one doubled
   batch per step), VAE decode; bf16 weights and compute, one jitted program per batch.
   Seconds per image at batch 1 and batch 8. Goal: at most 1.0 s per 50-step image.
3. vae: the SD VAE (kl-f8) first-stage train step at 256^2, the project's real
   autoencoder step (ldm_jax.training.autoencoder.AutoencoderTask.train_step: KL
   autoencoder + LPIPS-VGG16 + PatchGAN with the GAN terms on, two Adam updates) on
   configs/autoencoder/kl_f8.py at batch --vae_batch (32; halved after an out-of-memory
   error), bf16 compute with fp32 master weights (--vae_dtype float32: the config's own);
   images/s.

Published reference figures (per chip, not measured here):
- MLPerf Training v5.0, Stable Diffusion: best 8x H200 system 149.6 images/s per chip;
  best ever per chip 288.6 images/s (GB200).
- SD-1.5, 50 steps at 512^2 on an H100: 1.11 s per image with torch.compile, 0.75 s
  with TensorRT.

XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.92 here (JAX's default 0.75 would leave a
quarter of the GPU to nothing), unless it is set already. runtime.setup()'s persistent
compilation cache is on: a rerun on the same machine loads the compiled programs, so its
"compile s" figures are cache loads, not compile times.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/gpu_suite.py` from a checkout
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

from ldm_jax import runtime  # noqa: E402
from ldm_jax.config_loader import load_config  # noqa: E402
from ldm_jax.diffusion import guidance, objectives, samplers, schedules  # noqa: E402
from ldm_jax.interop import stable_diffusion as sd  # noqa: E402
from ldm_jax.models import attention as attn_lib  # noqa: E402
from ldm_jax.models import autoencoder, clip, unet_configs  # noqa: E402
from ldm_jax.models import lpips as lpips_lib  # noqa: E402
from ldm_jax.training import state as state_lib  # noqa: E402
from ldm_jax.training import telemetry  # noqa: E402
from ldm_jax.training.autoencoder import AutoencoderTask  # noqa: E402
from ldm_jax.training.diffusion import DiffusionState, ema_decay  # noqa: E402

SECTIONS = ("unet", "txt2img", "vae")
GOALS = {"unet_images_per_sec_min": 165.0, "txt2img_s_per_image_max": 1.0}
REFERENCES = {
    "mlperf_training_v5.0_sd_best_8xh200_images_per_sec_per_chip": 149.6,
    "mlperf_training_sd_best_ever_images_per_sec_per_chip_gb200": 288.6,
    "h100_sd15_50_steps_s_per_image_torch_compile": 1.11,
    "h100_sd15_50_steps_s_per_image_tensorrt": 0.75,
}
MEMORY_MARGIN = 0.9  # of the device's limit that the predicted batch may fill
STEP_BACK = 0.85  # batch factor after an out-of-memory error
EMA_DECAY = 0.9999


def _paper_unet(name: str, **overrides) -> dict:
    kw = {k: v for k, v in unet_configs.PAPER_UNETS[name].items() if k != "image_size"}
    return kw | overrides


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each section builds and runs: the full sizes or --tiny's."""

    unet_sd2: dict  # UNet config (unet_configs keys) of the train step
    latent: int  # latent side (image side / 8)
    ctx_len: int
    batch_start: int  # first batch of the search (its probes: this and twice this)
    max_batch: int
    train_steps: int  # timed steps
    unet_sd1: dict  # txt2img UNet
    text: dict  # CLIPTextEncoder fields
    vae: dict  # autoencoder config.model keys of the txt2img decoder
    txt2img_batches: tuple[int, ...]
    ddim_steps: int
    guidance_scale: float
    txt2img_repeats: int
    vae_config: str  # load_config spec of the first-stage step
    vae_batch: int
    vae_steps: int


FULL = Sizes(
    unet_sd2=_paper_unet("sd-v2"),
    latent=64,
    ctx_len=77,
    batch_start=8,
    max_batch=1024,
    train_steps=10,
    unet_sd1=_paper_unet("sd-v1"),
    text=dict(clip.SD1_TEXT),
    vae=sd.kl_f8_vae(),
    txt2img_batches=(1, 8),
    ddim_steps=50,
    guidance_scale=7.5,
    txt2img_repeats=3,
    vae_config="configs/autoencoder/kl_f8.py",
    vae_batch=32,
    vae_steps=10,
)
# Same structure (SD2's head width / linear projections, SD1's head count, CLIP and the
# 4-level f8 VAE), toy widths; context 32 wide, 8x8 latents (64 px images).
_TINY_UNET = dict(
    model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_res_blocks=1,
    context_dim=32,
)  # fmt: skip
TINY = Sizes(
    unet_sd2=_paper_unet("sd-v2", **_TINY_UNET, num_head_channels=16),
    latent=8,
    ctx_len=77,
    batch_start=1,
    max_batch=2,
    train_steps=2,
    unet_sd1=_paper_unet("sd-v1", **_TINY_UNET, num_heads=2),
    text=dict(clip.SD1_TEXT, width=32, num_layers=1, num_heads=2),
    vae=sd.kl_f8_vae() | dict(ch=16, num_res_blocks=1, norm_groups=8),
    txt2img_batches=(1, 2),
    ddim_steps=4,  # a uniform grid of 3 would end past t = 999
    guidance_scale=7.5,
    txt2img_repeats=1,
    vae_config="configs/autoencoder/kl_f8.py:runlocal",
    vae_batch=2,
    vae_steps=2,
)


# ----- helpers ---------------------------------------------------------------------------
def is_oom(e: BaseException) -> bool:
    """Whether an exception is the device running out of memory (XLA's RESOURCE_EXHAUSTED,
    raised as jax.errors.JaxRuntimeError / XlaRuntimeError, at compile or run time)."""
    if isinstance(e, MemoryError):
        return True
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _free() -> None:
    gc.collect()


def _median_time(fn, repeats: int) -> float:
    """Median seconds of `fn()` (which blocks on its result) over `repeats` calls."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _footprint(compiled) -> int | None:
    """Bytes a compiled program needs on the device: arguments, outputs not aliased to
    (donated) arguments, and XLA's temp buffer (one allocation on GPU)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # a backend without memory analysis
        return None
    if m is None:
        return None
    need = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return int(max(need, getattr(m, "peak_memory_in_bytes", 0) or 0))


def _memory_limit(device, override_gb: float) -> int | None:
    if override_gb:
        return int(override_gb * 2**30)
    try:
        stats = device.memory_stats() or {}
    except Exception:
        return None
    return stats.get("bytes_limit")


def _cast_floats(tree, dtype):
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def attention_forward_flops(apply_fn, *args) -> float | None:
    """FLOPs of softmax(QK^T)V in one forward pass of `apply_fn(*args)`: 4 B H Lq Lk D per
    call of ldm_jax.models.attention.attention, from the shapes a trace sees (nothing
    runs). None if the trace fails."""
    seen = []
    inner = attn_lib.attention

    def spy(q, k, v, **kw):
        b, lq, h, d = q.shape
        seen.append(4.0 * b * h * lq * k.shape[1] * d)
        return inner(q, k, v, **kw)

    attn_lib.attention = spy
    try:
        jax.eval_shape(apply_fn, *args)
    except Exception:
        return None
    finally:
        attn_lib.attention = inner
    return float(sum(seen))


def _has_attention_custom_calls(compiled) -> bool:
    """Whether the compiled program calls cuDNN's fused attention, whose FLOPs XLA:GPU's
    cost analysis does not count (it counts cuBLAS GEMMs and cuDNN convolutions only)."""
    try:
        return "__cudnn$fmha" in compiled.as_text()
    except Exception:
        return False


# ----- 1. SD2-base UNet train step -------------------------------------------------------
class UNetStep:
    """The diffusion train step on cached latents (+ text context), its state and batch."""

    def __init__(self, sizes: Sizes):
        self.sizes = sizes
        self.model = unet_configs.from_config(sizes.unet_sd2 | dict(dtype="bfloat16"))
        self.sched = schedules.make_schedule(sd.SD_SCHEDULE)
        self.tx = optax.adamw(1e-4, weight_decay=0.01)
        self.ctx_dim = sizes.unet_sd2["context_dim"]
        self.init_state = jax.jit(self._init_state)
        self.make_batch = jax.jit(self._make_batch, static_argnums=0)
        self.step = jax.jit(self._train_step, donate_argnums=0)

    def _example(self, b: int):
        s = self.sizes
        x = jnp.zeros((b, s.latent, s.latent, self.model.in_channels), jnp.float32)
        ctx = jnp.zeros((b, s.ctx_len, self.ctx_dim), jnp.float32)
        return x, jnp.zeros((b,), jnp.int32), ctx

    def _init_state(self, rng) -> DiffusionState:
        x, t, ctx = self._example(1)
        unet = nn.unbox(self.model.init(rng, x, t, context=ctx))["params"]
        params = {"unet": unet, "cond": {}}
        return DiffusionState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            ema_params=unet,
            scale_factor=jnp.asarray(1.0, jnp.float32),  # cached latents come scaled
            bad_step=-jnp.ones((), jnp.int32),
            skipped=jnp.zeros((), jnp.int32),
        )

    def _make_batch(self, b: int, rng) -> dict:
        s = self.sizes
        r1, r2 = jax.random.split(rng)
        shape = (b, s.latent, s.latent, self.model.in_channels)
        return {
            "latent": jax.random.normal(r1, shape, jnp.float32),
            "context": jax.random.normal(r2, (b, s.ctx_len, self.ctx_dim), jnp.float32),
        }

    def _train_step(self, state: DiffusionState, batch: dict, rng):
        rng = jax.random.fold_in(rng, state.step)
        r_t, r_noise = jax.random.split(rng)
        z0 = batch["latent"] * state.scale_factor
        t = objectives.sample_timesteps(r_t, z0.shape[0], self.sched.num_timesteps)
        noise = jax.random.normal(r_noise, z0.shape, z0.dtype)
        z_t = objectives.q_sample(self.sched, z0, t, noise)

        def loss_fn(params):
            out = self.model.apply(
                {"params": params["unet"]}, z_t, t, context=batch["context"], train=True
            )
            return objectives.diffusion_loss(self.sched, out, z0, noise, t, parameterization="v")[0]

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(state.step, EMA_DECAY)
        ema = jax.tree.map(
            lambda e, p: e - (1.0 - decay) * (e - p), state.ema_params, params["unet"]
        )
        finite = state_lib.all_finite(loss, grads)
        candidate = state.replace(params=params, opt_state=opt_state, ema_params=ema)
        return state_lib.advance(state, candidate, finite), {"loss": loss}

    @functools.cached_property
    def abstract_state(self):
        return jax.eval_shape(self._init_state, jax.random.PRNGKey(0))

    def abstract_args(self, b: int):
        rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        batch = jax.eval_shape(lambda r: self._make_batch(b, r), rng)
        return self.abstract_state, batch, rng

    @functools.cached_property
    def attention_flops_per_image(self) -> float | None:
        """Forward attention FLOPs of the UNet on one example (traced, not run)."""
        x, t, ctx = self._example(1)
        params = self.abstract_state.ema_params
        return attention_forward_flops(
            lambda p: self.model.apply({"params": p}, x, t, context=ctx), params
        )

    def footprints(self, batches, parallel: bool) -> list[int | None]:
        """Device bytes of the step at each batch, from compile-only probes (nothing is
        allocated); compiled concurrently where `parallel` (XLA releases the GIL)."""
        lowered = [self.step.lower(*self.abstract_args(b)) for b in batches]
        if parallel:
            with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
                compiled = list(pool.map(lambda lo: lo.compile(), lowered))
        else:
            compiled = [lo.compile() for lo in lowered]
        return [_footprint(c) for c in compiled]

    def measure(self, b: int, steps: int, peak: float | None) -> dict:
        """Compile and time the step at batch b (raises on out-of-memory)."""
        state = batch = None
        try:
            state = self.init_state(jax.random.PRNGKey(0))
            batch = self.make_batch(b, jax.random.PRNGKey(1))
            rng = jax.random.PRNGKey(2)
            t = time.perf_counter()
            compiled = self.step.lower(state, batch, rng).compile()
            compile_s = time.perf_counter() - t
            flops = telemetry.step_flops(self.step, state, batch, rng)  # jit's cache: no recompile
            footprint = _footprint(compiled)
            custom_attention = _has_attention_custom_calls(compiled)
            del compiled
            state, metrics = self.step(state, batch, rng)  # warm-up
            jax.block_until_ready(metrics)

            def one():
                nonlocal state, metrics
                state, metrics = self.step(state, batch, rng)
                jax.block_until_ready(metrics)

            step_s = _median_time(one, steps)
            loss = float(metrics["loss"])
        finally:
            state = batch = None
            _free()
        attn = self.attention_flops_per_image
        attn_step = None if attn is None else 3.0 * b * attn  # forward + backward (2x)
        out = dict(
            batch=b,
            compile_s=compile_s,
            step_s=step_s,
            images_per_sec=b / step_s,
            loss=loss,
            flops_per_step=flops,
            attention_flops_per_step=attn_step,
            attention_in_custom_calls=custom_attention,
            footprint_gib=None if footprint is None else footprint / 2**30,
        )
        out["tflops_per_sec"] = None if flops is None else flops / step_s / 1e12
        out["mfu"] = None if not (flops and peak) else flops / step_s / peak
        model_flops = flops
        if flops and custom_attention and attn_step:
            model_flops = flops + attn_step
        out["mfu_with_attention"] = (
            None if not (model_flops and peak) else model_flops / step_s / peak
        )
        out |= telemetry.device_memory(jax.local_devices()[0])
        return out


def search_batch(
    measure, *, start: int, max_batch: int, limit: int | None, footprints, log=print
) -> tuple[dict | None, list]:
    """The largest batch that fits and its measurement: (result or None, tried).

    `measure(b)` compiles and times batch b, raising on out-of-memory; `footprints(list)`
    gives the device bytes of each batch from compile-only probes. With a memory `limit`,
    probes at `start` and 2 x `start` fit bytes = a + b x batch, and the batch predicted
    to fill MEMORY_MARGIN of the limit (a multiple of 8 from 16 up, at most `max_batch`)
    is measured, then STEP_BACK times it after each out-of-memory error, down to the probes.
    Without a limit, or if the probes give no sizes: doubling from `start` until an
    out-of-memory error (then the midpoint once) or `max_batch`.
    """
    tried = []

    def attempt(b):
        try:
            r = measure(b)
        except Exception as e:
            if not is_oom(e):
                raise
            tried.append({"batch": b, "status": "oom"})
            log(f"  batch {b}: out of memory")
            return None
        tried.append({"batch": b, "status": "ok", "images_per_sec": r["images_per_sec"]})
        log(f"  batch {b}: {r['images_per_sec']:.2f} images/s, step {r['step_s']:.3f} s")
        return r

    probes = [start, 2 * start]
    t = time.perf_counter()
    sizes = footprints(probes) if limit else [None, None]
    probe_s = time.perf_counter() - t
    if limit and all(sizes):
        slope = max((sizes[1] - sizes[0]) / (probes[1] - probes[0]), 1.0)
        base = sizes[0] - slope * probes[0]
        target = int((MEMORY_MARGIN * limit - base) // slope)
        probe_gib = {b: s / 2**30 for b, s in zip(probes, sizes)}
        tried.append(
            {
                "probe_gib": probe_gib,
                "gib_per_image": slope / 2**30,
                "limit_gib": limit / 2**30,
                "predicted_batch": target,
                "probe_compile_s": probe_s,
            }
        )
        log(
            f"  probes {probes}: {sizes[0] / 2**30:.2f} / {sizes[1] / 2**30:.2f} GiB "
            f"(compiled in {probe_s:.0f} s), {slope / 2**30:.3f} GiB per image; "
            f"limit {limit / 2**30:.1f} GiB -> batch {target}"
        )
        candidates, b = [], _round_batch(min(target, max_batch))
        while b > probes[1]:
            candidates.append(b)
            b = _round_batch(b * STEP_BACK)
        for b in candidates + probes[::-1]:
            if tried and any(t.get("batch") == b for t in tried):
                continue
            r = attempt(b)
            if r is not None:
                return r, tried
        return None, tried
    best, b = None, start
    while b <= max_batch:
        r = attempt(b)
        if r is None:
            mid = _round_batch((best["batch"] + b) // 2) if best else b // 2
            if mid >= 1 and mid != b and (best is None or mid > best["batch"]):
                best = attempt(mid) or best
            break
        best, b = r, 2 * b
    return best, tried


def _round_batch(b: float) -> int:
    """Down to a multiple of 8 from 16 up (tensor-core friendly), else to an int >= 1."""
    b = int(b)
    return b // 8 * 8 if b >= 16 else max(1, b)


def bench_unet(sizes: Sizes, args, log=print) -> dict:
    device = jax.local_devices()[0]
    peak = telemetry.peak_flops(device, args.peak_flops)
    bench = UNetStep(sizes)
    steps = args.steps or sizes.train_steps
    measure = lambda b: bench.measure(b, steps, peak)
    if args.batch:
        result, tried = measure(args.batch), [{"batch": args.batch, "status": "given"}]
    else:
        limit = _memory_limit(device, args.memory_limit_gb)
        result, tried = search_batch(
            measure,
            start=sizes.batch_start,
            max_batch=args.max_batch or sizes.max_batch,
            limit=limit,
            footprints=lambda bs: bench.footprints(bs, parallel=device.platform == "gpu"),
            log=log,
        )
        if result is None:
            raise RuntimeError(f"the UNet step fits at no batch tried: {tried}")
    return dict(result, peak_flops=peak, search=tried, timed_steps=steps)


# ----- 2. SD-1.5 text-to-image -----------------------------------------------------------
class Txt2Img:
    """CLIP text encoder -> DDIM with classifier-free guidance -> VAE decode, one program."""

    def __init__(self, sizes: Sizes):
        self.sizes = sizes
        bf16 = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
        self.unet = unet_configs.from_config(
            sizes.unet_sd1 | dict(dtype="bfloat16", param_dtype="bfloat16")
        )
        self.text = clip.CLIPTextEncoder(**sizes.text, **bf16)
        self.vae = autoencoder.from_config(sizes.vae | dict(dtype="bfloat16"))
        self.sched = schedules.make_schedule(sd.SD_SCHEDULE)
        self.params = jax.jit(self._init)(jax.random.PRNGKey(0))

    def _init(self, rng):
        s, r = self.sizes, jax.random.split(rng, 3)
        x = jnp.zeros((1, s.latent, s.latent, 4), jnp.float32)
        ctx = jnp.zeros((1, s.ctx_len, self.text.width), jnp.float32)
        tokens = jnp.zeros((1, s.ctx_len), jnp.int32)
        image = jnp.zeros((1, 8 * s.latent, 8 * s.latent, 3), jnp.float32)
        params = {
            "unet": self.unet.init(r[0], x, jnp.zeros((1,), jnp.int32), context=ctx)["params"],
            "clip": self.text.init(r[1], tokens)["params"],
            "vae": self.vae.init({"params": r[2], "sample": r[2]}, image)["params"],
        }
        return _cast_floats(nn.unbox(params), jnp.bfloat16)

    def generate(self, params, tokens, uncond_tokens, rng):
        """tokens, uncond_tokens int32 [B, 77] -> images [B, H, W, 3] in [-1, 1]."""
        b, s = tokens.shape[0], self.sizes
        context = self.text.apply(
            {"params": params["clip"]}, jnp.concatenate([tokens, uncond_tokens])
        )
        cond, uncond = context[:b], context[b:]

        def model_fn(x, t, c):
            return self.unet.apply({"params": params["unet"]}, x, t, context=c)

        fn = guidance.guided_model_fn(model_fn, cond, uncond, s.guidance_scale)
        z = samplers.ddim(fn, self.sched, (b, s.latent, s.latent, 4), rng, num_steps=s.ddim_steps)
        images = self.vae.apply({"params": params["vae"]}, z / sd.SCALE_FACTOR, method="decode")
        return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

    def measure(self, b: int, repeats: int) -> dict:
        s = self.sizes
        vocab = self.text.vocab_size
        tokens = jax.random.randint(jax.random.PRNGKey(3), (b, s.ctx_len), 0, vocab, jnp.int32)
        uncond = jax.random.randint(jax.random.PRNGKey(4), (b, s.ctx_len), 0, vocab, jnp.int32)
        rng = jax.random.PRNGKey(5)
        fn = jax.jit(self.generate)
        t = time.perf_counter()
        compiled = fn.lower(self.params, tokens, uncond, rng).compile()
        compile_s = time.perf_counter() - t
        footprint = _footprint(compiled)
        images = jax.block_until_ready(compiled(self.params, tokens, uncond, rng))  # warm-up
        finite = bool(jnp.all(jnp.isfinite(images)))
        del images
        run_s = _median_time(
            lambda: jax.block_until_ready(compiled(self.params, tokens, uncond, rng)), repeats
        )
        return dict(
            batch=b,
            compile_s=compile_s,
            run_s=run_s,
            s_per_image=run_s / b,
            images_per_sec=b / run_s,
            finite=finite,
            footprint_gib=None if footprint is None else footprint / 2**30,
        )


def bench_txt2img(sizes: Sizes, args, log=print) -> dict:
    pipe = Txt2Img(sizes)
    repeats = args.repeats or sizes.txt2img_repeats
    rows = []
    for b in sizes.txt2img_batches:
        r = pipe.measure(b, repeats)
        log(f"  batch {b}: {r['s_per_image']:.3f} s per image (compile {r['compile_s']:.1f} s)")
        rows.append(r)
    _free()
    return dict(
        steps=sizes.ddim_steps,
        guidance_scale=sizes.guidance_scale,
        repeats=repeats,
        by_batch=rows,
    )


# ----- 3. SD VAE first-stage train step --------------------------------------------------
def bench_vae(sizes: Sizes, args, log=print) -> dict:
    steps = args.steps or sizes.vae_steps
    b = args.vae_batch or sizes.vae_batch
    while True:
        try:
            r = _vae_measure(sizes, b, args.vae_dtype, steps)
        except Exception as e:
            if not is_oom(e) or b == 1:
                raise
            log(f"  batch {b}: out of memory")
            _free()
            b //= 2
            continue
        log(f"  batch {b}: {r['images_per_sec']:.2f} images/s, step {r['step_s']:.3f} s")
        return r


def _vae_measure(sizes: Sizes, b: int, dtype: str, steps: int) -> dict:
    config = load_config(str(ROOT / sizes.vae_config), lock=False)
    config.batch_size = b
    config.model.dtype = dtype
    task = AutoencoderTask(config)
    state = jax.jit(lambda r: nn.unbox(task.init_state(r)))(jax.random.PRNGKey(0))
    state = state.replace(step=jnp.asarray(config.loss.disc_start, jnp.int32))  # GAN terms on
    size = config.data.image_size
    images = jax.random.uniform(jax.random.PRNGKey(1), (b, size, size, 3), minval=-1.0)
    batch, frozen, rng = (
        {"image": images},
        {"lpips": lpips_lib.load_lpips_params()},
        jax.random.PRNGKey(2),
    )
    step = jax.jit(task.train_step, donate_argnums=0)
    try:
        t = time.perf_counter()
        compiled = step.lower(state, batch, rng, frozen).compile()
        compile_s = time.perf_counter() - t
        footprint = _footprint(compiled)
        del compiled
        state, metrics = step(state, batch, rng, frozen)
        jax.block_until_ready(metrics)

        def one():
            nonlocal state, metrics
            state, metrics = step(state, batch, rng, frozen)
            jax.block_until_ready(metrics)

        step_s = _median_time(one, steps)
        loss = float(metrics["loss"])
    finally:
        state = None
        _free()
    return dict(
        batch=b,
        image_size=size,
        dtype=dtype,
        compile_s=compile_s,
        step_s=step_s,
        images_per_sec=b / step_s,
        loss=loss,
        timed_steps=steps,
        footprint_gib=None if footprint is None else footprint / 2**30,
    )


# ----- report ----------------------------------------------------------------------------
def _f(x, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x * scale:{spec}}{suffix}"


def goal_met(section: str, r: dict, tiny: bool) -> bool | None:
    """Whether a section reached its goal; None at tiny sizes or without a goal."""
    if tiny:
        return None
    if section == "unet":
        return r["images_per_sec"] >= GOALS["unet_images_per_sec_min"]
    if section == "txt2img":
        one = next((x for x in r["by_batch"] if x["batch"] == 1), None)
        return None if one is None else one["s_per_image"] <= GOALS["txt2img_s_per_image_max"]
    return None


def _verdict(met: bool | None) -> str:
    return "n/a (tiny sizes)" if met is None else ("met" if met else "not met")


def report_lines(section: str, r: dict, tiny: bool) -> list[str]:
    """Markdown for BENCHMARKS.md: a heading, a table, the goal and the references."""
    note = " (tiny sizes: checks the code path, not comparable)" if tiny else ""
    if section == "unet":
        met = _verdict(r.get("goal_met"))
        probes = [t for t in r["search"] if "predicted_batch" in t]
        search = ", ".join(f"{t['batch']} {t['status']}" for t in r["search"] if "batch" in t)
        if probes:
            search = f"probes predicted {probes[0]['predicted_batch']}; " + search
        return [
            "### SD2-base UNet train step: bf16 compute, fp32 master + AdamW + EMA, v-loss, "
            f"{r['latent']}x{r['latent']}x4 cached latents, 77x{r['ctx_dim']} context{note}",
            "",
            "| batch | compile s | step s | images/s | TFLOP/step (XLA) | TFLOP/s | MFU | "
            "MFU + attn | program GiB | peak GiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {r['batch']} | {r['compile_s']:.1f} | {r['step_s']:.3f} | "
            f"{r['images_per_sec']:.2f} | {_f(r['flops_per_step'], '.3g', 1e-12)} | "
            f"{_f(r['tflops_per_sec'], '.3g')} | {_f(r['mfu'], '.1f', 100, '%')} | "
            f"{_f(r['mfu_with_attention'], '.1f', 100, '%')} | "
            f"{_f(r['footprint_gib'], '.3g')} | {_f(r.get('peak_memory_gb'), '.1f')} |",
            "",
            f"Batch search: {search}. Goal: >= {GOALS['unet_images_per_sec_min']:g} images/s "
            f"per H200: {met} ({r['images_per_sec']:.1f}). "
            "Reference: MLPerf Training v5.0 best 8x H200 system 149.6 images/s per chip; "
            "best ever 288.6 per chip (GB200).",
        ]
    if section == "txt2img":
        rows = r["by_batch"]
        one = next((x for x in rows if x["batch"] == 1), rows[0])
        met = _verdict(r.get("goal_met"))
        lines = [
            f"### SD-1.5 text-to-image, {r['image_size']}^2: CLIP + {r['steps']} DDIM steps "
            f"(CFG {r['guidance_scale']:g}) + VAE decode, bf16{note}",
            "",
            "| batch | compile s | s per batch | s per image | images/s | program GiB |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {x['batch']} | {x['compile_s']:.1f} | {x['run_s']:.3f} | {x['s_per_image']:.3f} "
            f"| {x['images_per_sec']:.2f} | {_f(x['footprint_gib'], '.3g')} |"
            for x in rows
        ]
        return lines + [
            "",
            f"Goal: <= {GOALS['txt2img_s_per_image_max']:g} s per {r['steps']}-step image at "
            f"batch 1: {met} ({one['s_per_image']:.3f} s). Reference: "
            "H100 SD-1.5 50 steps 1.11 s (torch.compile), 0.75 s (TensorRT).",
        ]
    return [
        f"### SD VAE (kl-f8) + LPIPS + PatchGAN first-stage train step, {r['image_size']}^2, "
        f"autoencoder in {r['dtype']}{note}",
        "",
        "| batch | compile s | step s | images/s | program GiB |",
        "| --- | --- | --- | --- | --- |",
        f"| {r['batch']} | {r['compile_s']:.1f} | {r['step_s']:.3f} | {r['images_per_sec']:.2f} "
        f"| {_f(r['footprint_gib'], '.3g')} |",
        "",
        "Program GiB: XLA's buffers for the compiled step (arguments, outputs, temp); peak "
        "GiB: the device's peak_bytes_in_use so far (the UNet section's, when it ran first).",
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy sizes: check the code paths")
    p.add_argument("--only", choices=SECTIONS, action="append", help="a section (repeatable)")
    p.add_argument("--out", help="also write the figures as JSON here")
    p.add_argument(
        "--peak_flops", type=float, default=0.0, help="peak FLOP/s for MFU (default: by device)"
    )
    p.add_argument("--batch", type=int, default=0, help="UNet batch: no search")
    p.add_argument("--max_batch", type=int, default=0, help="cap of the UNet batch search")
    p.add_argument(
        "--memory_limit_gb", type=float, default=0.0, help="memory the batch search plans for"
    )
    p.add_argument("--steps", type=int, default=0, help="timed train steps (unet, vae)")
    p.add_argument("--repeats", type=int, default=0, help="timed txt2img runs per batch")
    p.add_argument("--vae_batch", type=int, default=0)
    p.add_argument("--vae_dtype", choices=("float32", "bfloat16"), default="bfloat16")
    return p


def run(args, log=print, sizes: Sizes | None = None) -> dict:
    """Runs the chosen sections; returns (and with args.out writes) the results. `sizes`
    defaults to TINY or FULL by args.tiny."""
    sizes = sizes or (TINY if args.tiny else FULL)
    device = jax.local_devices()[0]
    results = {
        "device": f"{jax.device_count()} x {device.device_kind}",
        "platform": device.platform,
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "tiny": bool(args.tiny),
        "goals": GOALS,
        "references": REFERENCES,
    }
    tiny = " --tiny" if args.tiny else ""
    log(f"## GPU suite: {results['device']}, jax {results['jax']}, {results['date']}{tiny}")
    log("")
    log(f"`python bench/gpu_suite.py{tiny}`")
    t_all = time.perf_counter()
    for section in args.only or SECTIONS:
        log("")
        log(f"<!-- {section} -->")
        t = time.perf_counter()
        if section == "unet":
            r = bench_unet(sizes, args, log)
            r |= dict(latent=sizes.latent, ctx_dim=sizes.unet_sd2["context_dim"])
        elif section == "txt2img":
            r = bench_txt2img(sizes, args, log) | dict(image_size=8 * sizes.latent)
        else:
            r = bench_vae(sizes, args, log)
        r["section_s"] = time.perf_counter() - t
        r["goal_met"] = goal_met(section, r, args.tiny)
        results[section] = r
        log("")
        for line in report_lines(section, r, args.tiny):
            log(line)
        log(f"<!-- {section}: {r['section_s']:.0f} s -->")
        results["total_s"] = time.perf_counter() - t_all
        if args.out:
            write_json(args.out, results)
    log("")
    log(f"<!-- total {results['total_s']:.0f} s -->")
    return results


def write_json(path, results: dict) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=float) + "\n")
    tmp.replace(path)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    flags = os.environ.get("XLA_FLAGS", "")
    if args.tiny and "xla_backend_optimization_level" not in flags:
        # Toy sizes check code paths: halve XLA:CPU's compile time, run time is no figure.
        # (Takes effect where no backend is up yet, as in a fresh process.)
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    runtime.setup()
    return run(args, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
