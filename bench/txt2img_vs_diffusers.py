"""Text-to-image end to end, ldm_jax against diffusers' StableDiffusionPipeline (issue 17 c).

    python bench/txt2img_vs_diffusers.py                    # 512x512, 25 steps, 3 rounds
    python bench/txt2img_vs_diffusers.py --only steady --rounds 5
    python bench/txt2img_vs_diffusers.py --size 128 --steps 2 --rounds 1   # a smoke run

What is timed: prompt -> CLIP -> DDIM (the folder's 'leading' spacing, eta 0) with
classifier-free guidance 7.5 (the empty prompt as the unconditional branch, both branches in
one doubled batch in both libraries) -> VAE decode -> uint8 image, batch 1, fp32, on the
CPU. Both sides use the same SD-1.5-architecture weights (random, full size whatever
--size is): the diffusers folder that bench/import_memory.py builds with diffusers' own
`save_pretrained` (kept in --cache), and the ldm_jax run `python -m ldm_jax.import_sd`
makes of that folder (imported once, kept beside it as `<folder>_ldm_jax_run`).

Steady state (--only steady): each library runs in a worker process of its own (this
script with --worker), so that neither's thread pools, allocator or 4+ GB of weights
share a process with the other's, as in a user's process. A worker loads, runs the call
once (ldm_jax: one `jax.jit` of `DiffusionTask.sample`, from the tokens to the decoded
images, as `ldm_jax.sample` draws; diffusers: the pipeline under `torch.inference_mode`,
torch threads = CPU cores), writes that image, then times one call per "go" from the
driver. The driver sends the go's interleaved, A B, B A, ... (--rounds of each), so
that load from other processes hits both alike, and prints one JSON line per library:
median / min / max seconds, setup seconds (load + first call, compile included), peak
resident memory, the CPU share other processes took during its calls ("foreign"), and
`torch_over_ldm_jax`, the median torch time over the median ldm_jax time (the issue's
goal: >= 1.5). Memory: both workers are alive together; at 512 px the ldm_jax worker
peaked at 6.9 GB and diffusers' at 5.3 GB (before runs were opened for inference, with
their AdamW moments and a separate EMA copy, ldm_jax's peaked at 15.4 GB at 128 px).

"Checked equal": both start from the same initial latents (standard normal, seed
--seed, [1, size/8, size/8, 4]; NCHW for diffusers), so the two [0, 1] float images of the
first call (diffusers' output_type="np"; ldm_jax's (x + 1) / 2 clipped) must agree to
--atol (max abs difference; default 1e-3; the test suite's tiny pipeline agrees to 1e-5).
The bench prints the difference and the share of unsaturated pixels (random weights can
drive a decoder to 0/1, where clipping would hide differences) and exits with an error,
before any timing, when they differ by more.

Time to the first image (--only first): a fresh process from its start to its exit, the
image written: ldm_jax's own command (`python -m ldm_jax.sample --workdir RUN --prompts P
--steps S --guidance 7.5 --num_per_condition 1`) with a cold persistent compilation cache
(an empty JAX_COMPILATION_CACHE_DIR, which `ldm_jax.runtime.setup` reads), then warm (the
same directory again); and a script that loads the pipeline folder and writes one PNG with
diffusers (no compilation cache; run twice, the second as a check of the file cache's
effect). Imports, loading the weights and compiling are all inside these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import import_memory  # noqa: E402  (the SD folders, built by diffusers)
import unet_vs_diffusers as side_by_side  # noqa: E402  (CPU accounting from /proc)

PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
IMPLS = ("ldm_jax", "torch")

# A fresh process's text-to-image with diffusers: argv folder, size, steps, guidance, prompt,
# png.
_DIFFUSERS_FIRST = """
import os, sys
import torch, diffusers
torch.set_num_threads(os.cpu_count())
folder, size, steps, guidance, prompt, out = sys.argv[1:]
pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
pipe.set_progress_bar_config(disable=True)
with torch.inference_mode():
    image = pipe(prompt, num_inference_steps=int(steps), guidance_scale=float(guidance),
                 height=int(size),
                 width=int(size), generator=torch.Generator().manual_seed(0)).images[0]
image.save(out)
"""


# ----- the two libraries' prompt -> image calls ---------------------------------------------
def initial_latents(size: int, seed: int = 0) -> np.ndarray:
    """The starting latents x_T both libraries get: float32 [1, size/8, size/8, 4] (NHWC)."""
    if size % 64:
        raise SystemExit(f"--size {size}: give a multiple of 64 (8 x the UNet's 8).")
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, size // 8, size // 8, 4), dtype=np.float32)


def ldm_jax_txt2img(run, steps: int, guidance: float, latents: np.ndarray):
    """prompt -> (uint8 [1, H, W, 3], float [0, 1] image) with the ldm_jax run in `run`,
    restored as `ldm_jax.sample` restores it (its mesh, the EMA weights), one jitted call
    from tokens to pixels."""
    import jax

    from ldm_jax.data import images as images_lib
    from ldm_jax.training.restore import open_run

    def overrides(config):
        config.sampling.update(dict(sampler="ddim", steps=steps, eta=0.0))
        config.sampling.guidance_scale = guidance

    restored = open_run(run, -1, "diffusion", overrides, inference=True)
    task, mesh_run, state = restored.task, restored.mesh_run, restored.state

    def draw(state, frozen, inputs, noise, rng):
        return task.sample(state, frozen, inputs, rng, noise=noise)

    jitted = jax.jit(draw, out_shardings=mesh_run.replicated)
    rng = jax.random.PRNGKey(0)  # unused by DDIM with eta 0

    def call(prompt: str):
        with jax.set_mesh(mesh_run.mesh):
            inputs = task.cond.inputs([prompt])
            images = np.asarray(jitted(state, mesh_run.frozen, inputs, latents, rng))
        return images_lib.to_uint8(images), np.clip((images + 1.0) / 2.0, 0.0, 1.0)

    return call


def diffusers_txt2img(folder, steps: int, guidance: float, latents: np.ndarray):
    """prompt -> (uint8 [1, H, W, 3], float [0, 1] image) with diffusers'
    StableDiffusionPipeline on `folder`, fp32, under torch.inference_mode."""
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    start = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())  # NCHW
    size = latents.shape[1] * pipe.vae_scale_factor

    @torch.inference_mode()
    def call(prompt: str):
        images = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                      latents=start.clone(), height=size, width=size, output_type="np").images  # fmt: skip
        return (images * 255).round().astype(np.uint8), images  # as diffusers' numpy_to_pil

    return call


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Max abs difference of two [0, 1] images, and the share of pixels neither clipped."""
    inside = (theirs > 1e-3) & (theirs < 1 - 1e-3) & (ours > 1e-3) & (ours < 1 - 1e-3)
    return {"max_abs_diff": float(np.abs(ours - theirs).max()), "unsaturated": float(inside.mean())}


# ----- worker processes ---------------------------------------------------------------------
def worker_main(args) -> None:
    """One library's side: build, run once (writing DIR/<impl>.npy), print "ready", then
    answer each "go" on stdin with the seconds of one call, until "quit"."""
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # the libraries' prints go to stderr
    d = pathlib.Path(args.dir)
    latents = np.load(d / "latents.npy")
    start = time.perf_counter()
    if args.worker == "ldm_jax":
        from ldm_jax import runtime

        runtime.setup()  # the persistent compilation cache, as every ldm_jax command
        call = ldm_jax_txt2img(args.run, args.steps, GUIDANCE, latents)
    else:
        import torch

        torch.set_num_threads(os.cpu_count())
        call = diffusers_txt2img(args.folder, args.steps, GUIDANCE, latents)
    pixels, image = call(args.prompt)
    assert pixels.dtype == np.uint8 and pixels.shape == (1, args.size, args.size, 3)
    np.save(d / f"{args.worker}.npy", image)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ready = {"setup_s": time.perf_counter() - start, "peak_rss_gb": rss / 2**30}
    print(json.dumps(ready), file=proto)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        t = time.perf_counter()
        call(args.prompt)
        print(json.dumps({"t": time.perf_counter() - t}), file=proto)


class Worker(side_by_side.PipeWorker):
    def __init__(self, impl: str, args, workdir: pathlib.Path, run: pathlib.Path):
        cmd = [sys.executable, __file__, "--worker", impl, "--dir", str(workdir),
               "--run", str(run), "--folder", str(args.folder), "--size", str(args.size),
               "--steps", str(args.steps), "--prompt", args.prompt]  # fmt: skip
        self.impl = impl
        super().__init__(cmd, _env(), impl)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.setdefault("JAX_PLATFORMS", "cpu")  # torch runs on the CPU: so does JAX
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env | extra


# ----- the two measurements -----------------------------------------------------------------
def steady(args, run: pathlib.Path) -> None:
    print(f"== steady state: {args.size}x{args.size}, {args.steps} DDIM steps, guidance "
          f"{GUIDANCE}, batch 1, fp32, {args.rounds} interleaved rounds", flush=True)  # fmt: skip
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="txt2img_bench_"))
    workers, ready = [], {}
    try:
        np.save(workdir / "latents.npy", initial_latents(args.size, args.seed))
        for impl in IMPLS:  # one after the other: setup times stay each one's own
            print(f"  starting {impl} (load, first call) ...", flush=True)
            workers.append(Worker(impl, args, workdir, run))
            ready[impl] = workers[-1].read()
            print(f"  {impl} ready: {json.dumps(_rounded(ready[impl]))}", flush=True)
        check = compare(*(np.load(workdir / f"{impl}.npy") for impl in IMPLS))
        print(f"  ldm_jax vs diffusers, [0, 1] images: max abs diff "
              f"{check['max_abs_diff']:.2e}, unsaturated pixels {100 * check['unsaturated']:.0f}%")  # fmt: skip
        if not check["max_abs_diff"] <= args.atol:
            raise SystemExit(
                f"error: the images differ by {check['max_abs_diff']:.2e} > --atol {args.atol}"
            )
        load_before = side_by_side._load()
        times = {impl: [] for impl in IMPLS}
        for r in range(args.rounds):
            order = workers[r % 2 :] + workers[: r % 2]  # who goes first alternates
            for w in order:
                times[w.impl].append(w.go())
                print(f"  round {r}: {w.impl} {times[w.impl][-1][0]:.3f} s", flush=True)
    finally:
        for w in workers:
            w.close()
        shutil.rmtree(workdir, ignore_errors=True)
    med = {k: statistics.median(t for t, _ in v) for k, v in times.items()}
    ratio = med["torch"] / med["ldm_jax"]
    for impl, v in times.items():
        secs = [t for t, _ in v]
        line = {"bench": "txt2img_steady", "impl": impl, "size": args.size, "steps": args.steps,
                "median_s": med[impl], "min_s": min(secs), "max_s": max(secs), "runs": len(secs),
                **ready[impl], "foreign_cpu": statistics.median(f for _, f in v),
                "max_abs_diff": check["max_abs_diff"], "torch_over_ldm_jax": ratio,
                "load_before": load_before, "load_after": side_by_side._load()}  # fmt: skip
        print(json.dumps(_rounded(line)), flush=True)
    print(f"  speed ldm_jax vs torch: {ratio:.2f}x (median torch / median ldm_jax; goal >= 1.5)")


def first_image(args, run: pathlib.Path) -> None:
    print(f"== time to the first image of a fresh process: {args.size}x{args.size}, "
          f"{args.steps} DDIM steps", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="txt2img_first_") as scratch:
        scratch = pathlib.Path(scratch)
        cache = scratch / "xla_cache"
        cache.mkdir()
        ours = [sys.executable, "-m", "ldm_jax.sample", "--workdir", str(run), "--prompts",
                args.prompt, "--num_per_condition", "1", "--sampler", "ddim", "--steps",
                str(args.steps), "--guidance", str(GUIDANCE), "--latent_size",
                str(args.size // 8), "--decode_tile", "0"]  # fmt: skip
        theirs = [sys.executable, "-c", _DIFFUSERS_FIRST, str(args.folder), str(args.size),
                  str(args.steps), str(GUIDANCE), args.prompt]  # fmt: skip
        cases = [
            ("ldm_jax", "cold cache", ours + ["--out", str(scratch / "cold")], "cold"),
            ("ldm_jax", "warm cache", ours + ["--out", str(scratch / "warm")], "warm"),
            ("torch", "run 1", theirs + [str(scratch / "torch1.png")], "torch1.png"),
            ("torch", "run 2", theirs + [str(scratch / "torch2.png")], "torch2.png"),
        ]
        for impl, label, cmd, out in cases:
            t = time.perf_counter()
            env = _env(JAX_COMPILATION_CACHE_DIR=str(cache))
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - t
            if proc.returncode != 0 or not (scratch / out).exists():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                raise SystemExit(f"error: {impl} {label} failed:\n" + "\n".join(tail))
            line = {"bench": "txt2img_first_image", "impl": impl, "case": label,
                    "size": args.size, "steps": args.steps, "seconds": seconds}  # fmt: skip
            if impl == "ldm_jax":
                line["cache_files"] = sum(1 for f in cache.rglob("*") if f.is_file())
            print(json.dumps(_rounded(line)), flush=True)


def _rounded(d: dict) -> dict:
    """Floats to 4 significant digits (a 5e-6 difference stays visible)."""
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in d.items()}


def imported_run(folder: pathlib.Path) -> pathlib.Path:
    """The ldm_jax run of a diffusers folder, `<folder>_ldm_jax_run`, imported on first use
    (about a minute, 6 GB; the run's config names its files by absolute path, so it is
    imported in place, and `<folder>_ldm_jax_run.ok` marks a finished import)."""
    run = folder.with_name(folder.name + "_ldm_jax_run")
    done = folder.with_name(folder.name + "_ldm_jax_run.ok")
    if done.is_file() and run.is_dir():
        return run
    shutil.rmtree(run, ignore_errors=True)  # an interrupted import
    print(f"importing {folder} as an ldm_jax run in {run} (once)", flush=True)
    cmd = [sys.executable, "-m", "ldm_jax.import_sd", "--diffusers", str(folder),
           "--workdir", str(run)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, env=_env())
    done.write_text(f"{folder}\n")
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--rounds", type=int, default=3, help="timed calls of each library")
    p.add_argument("--only", choices=("steady", "first"), default=None)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--seed", type=int, default=0, help="of the initial latents")
    p.add_argument("--atol", type=float, default=1e-3, help="max abs diff of the [0, 1] images")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "ldm_jax_sd_folders"))
    p.add_argument("--folder", default=None, help="an SD-1.5 diffusers folder (default: built)")
    p.add_argument("--run", default=None, help="its ldm_jax run (default: imported beside it)")
    p.add_argument("--worker", choices=IMPLS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker_main(args)
    initial_latents(args.size)  # a bad size fails first
    cache = pathlib.Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    args.folder = pathlib.Path(args.folder or import_memory.folder("sd15", cache)).resolve()
    run = pathlib.Path(args.run).resolve() if args.run else imported_run(args.folder)
    print(f"folder {args.folder}, run {run}; load average {side_by_side._load()}, "
          f"{os.cpu_count()} CPUs", flush=True)  # fmt: skip
    start = time.perf_counter()
    if args.only in (None, "steady"):
        steady(args, run)
    if args.only in (None, "first"):
        first_image(args, run)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
