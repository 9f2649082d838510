"""ldm_jax's UNet against diffusers' PyTorch UNet and diffusers' Flax UNet, interleaved.

    bash bench/setup_diffusers_flax_env.sh          # once: diffusers 0.32 Flax venv
    python bench/unet_vs_diffusers.py --case both --repeats 5
    python bench/unet_vs_diffusers.py --case b --impls torch,ldm_jax \
        --ldm_variant patched,/tmp/wt --ldm_variant flags,-,--xla_cpu_enable_fast_math=true

Cases (fp32, same architecture and weights in all three):
  a  SD-1.5 UNet forward: 64x64x4 latents, batch 1, context 77 x 768.
  b  AdamW step (MSE to a random target) of a small UNet: channels 64/128/256, two
     resnets per level, cross-attention at the first two levels (and the mid block),
     context 16 x 256, 32x32x4 latents, batch 8.

Each implementation runs in its own worker process (bench/unet_vs_diffusers_worker.py),
the Flax one in the bench-only venv: a worker builds, loads the torch worker's weights,
compiles and warms up once, then times one call per "go". The driver sends the go's round
robin (A B C, B C A, ...) so that load from other processes hits all of them alike, and
reports medians and speed ratios (> 1: ldm_jax is faster), with the load average and the
share of the CPUs other processes took during each implementation's calls ("foreign").
A call during which that share exceeded --max_foreign is redone (--retries times at
most): torch's OpenMP threads run 5-10x slower when another process holds one core.
--ldm_variant adds ldm_jax workers importing another checkout or with other XLA_FLAGS;
with --impls '' only those run (torch then only writes the weights, untimed).
Memory: case a holds SD's 3.4 GB of fp32 weights per worker (four workers: ~14 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "bench", "unet_vs_diffusers_worker.py")
_CD, _D = "CrossAttnDownBlock2D", "DownBlock2D"
_CU, _U = "CrossAttnUpBlock2D", "UpBlock2D"
# diffusers UNet2DConditionModel configs; every worker builds its model from these.
CONFIGS = {
    # runwayml/stable-diffusion-v1-5's unet/config.json (non-default keys)
    "a": dict(
        sample_size=64, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
        cross_attention_dim=768, attention_head_dim=8,
        down_block_types=[_CD, _CD, _CD, _D], up_block_types=[_U, _CU, _CU, _CU],
    ),
    "b": dict(
        sample_size=32, block_out_channels=[64, 128, 256], layers_per_block=2,
        cross_attention_dim=256, attention_head_dim=8,
        down_block_types=[_CD, _CD, _D], up_block_types=[_U, _CU, _CU],
    ),
}  # fmt: skip
# case: (title, batch, latent side, context tokens)
CASES = {
    "a": ("SD-1.5 UNet forward, 64x64 latents, batch 1, 77 tokens", 1, 64, 77),
    "b": ("small UNet AdamW step, 32x32 latents, batch 8, 16 tokens", 8, 32, 16),
}


class Spec(NamedTuple):
    label: str
    impl: str  # torch | flax | ldm_jax | weights (an untimed torch worker)
    python: str
    env: dict


def _specs(args) -> list[Spec]:
    main_py = os.path.join(ROOT, ".venv", "bin", "python")
    main_py = main_py if os.path.exists(main_py) else sys.executable
    specs = []
    for impl in filter(None, args.impls.split(",")):
        if impl == "torch":
            specs.append(Spec("torch", "torch", main_py, {}))
        elif impl == "flax":
            if not os.path.exists(args.flax_python):
                sys.exit(f"{args.flax_python} missing: run bash bench/setup_diffusers_flax_env.sh")
            specs.append(
                Spec("diffusers-flax", "flax", args.flax_python, _xla(args.flax_xla_flags))
            )
        elif impl == "ldm_jax":
            specs.append(Spec("ldm_jax", "ldm_jax", main_py, _xla(args.xla_flags)))
        else:
            sys.exit(f"unknown impl {impl!r}: torch, flax, ldm_jax")
    for variant in args.ldm_variant:
        label, src, flags = (variant.split(",", 2) + ["", ""])[:3]
        env = _xla(flags)
        if src != "-":  # another checkout's ldm_jax (PYTHONPATH wins over the editable install)
            env["PYTHONPATH"] = os.path.abspath(src)
        specs.append(Spec(label, "ldm_jax", main_py, env))
    # The torch worker starts first: it writes the weights that the others load. Without
    # torch among the timed implementations, a "weights" worker does only that.
    torch_first = [s for s in specs if s.impl == "torch"] or [Spec("torch", "weights", main_py, {})]
    return torch_first + [s for s in specs if s.impl != "torch"]


def _xla(flags: str) -> dict:
    return {"XLA_FLAGS": flags} if flags else {}


class PipeWorker:
    """A worker process driven line by line: "go" runs one timed call, which the worker
    answers with a JSON line {"t": seconds}; "quit" ends it."""

    def __init__(self, cmd: list[str], env: dict, label: str):
        self.label = label
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
        )

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.label} exited (code {self.proc.wait()})")
        return json.loads(line)

    def go(self) -> tuple[float, float]:
        """(seconds of one call, share of the machine's CPU other processes took meanwhile)."""
        busy, own = _busy_ticks(), _ticks(self.proc.pid)
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        t = self.read()["t"]
        foreign = (_busy_ticks() - busy) - (_ticks(self.proc.pid) - own)
        return t, max(0.0, foreign / (_HZ * t * os.cpu_count()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # the process this bench started


class Worker(PipeWorker):
    def __init__(self, spec: Spec, case: str, workdir: str, cache: str | None):
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
        env.update(spec.env)
        if cache:
            env["BENCH_JAX_CACHE"] = cache
        impl = "torch" if spec.impl == "weights" else spec.impl
        cmd = [spec.python, WORKER, impl, "--case", case, "--dir", workdir]
        cmd += ["--label", spec.label]
        self.spec = spec
        super().__init__(cmd, env, spec.label)


def _inputs(case: str, workdir: str) -> None:
    _, batch, side, tokens = CASES[case]
    rng = np.random.default_rng(0)
    arrays = dict(
        x=rng.standard_normal((batch, 4, side, side), np.float32),  # NCHW
        t=rng.integers(0, 1000, batch).astype(np.float32),
        ctx=rng.standard_normal((batch, tokens, CONFIGS[case]["cross_attention_dim"]), np.float32),
    )
    if case == "b":
        arrays["target"] = rng.standard_normal(arrays["x"].shape, np.float32)
    np.savez(os.path.join(workdir, "inputs.npz"), **arrays)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(CONFIGS[case], f)


_HZ = os.sysconf("SC_CLK_TCK")


def _busy_ticks() -> int:
    """Clock ticks all CPUs spent busy since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4]  # less idle and iowait


def _ticks(pid: int) -> int:
    """Clock ticks (user + system, all threads) process `pid` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def run_case(case: str, args) -> None:
    title = CASES[case][0]
    print(f"\n== case {case}: {title}, fp32")
    workdir = tempfile.mkdtemp(prefix=f"unet_bench_{case}_")
    workers = []
    try:
        _inputs(case, workdir)
        ready = {}
        # Started one after another: building and compiling takes both cores (setup times
        # stay each worker's own) and loading SD-size weights briefly needs more memory.
        for spec in _specs(args):
            print(f"  starting {spec.label} ...", flush=True)
            workers.append(Worker(spec, case, workdir, args.cache_dir))
            ready[spec.label] = workers[-1].read()
            if spec.impl == "weights":  # it only had to write the weights and reference output
                workers.pop().close()
        os.remove(os.path.join(workdir, "weights.safetensors"))
        for w in workers:
            if w.spec.impl == "ldm_jax":
                flags = w.spec.env.get("XLA_FLAGS", "")
                print(f"  {w.spec.label}: {ready[w.spec.label]['module']}, XLA_FLAGS={flags!r}")
        _check(case, workdir, ready)
        load_before = _load()
        times = {w.spec.label: [] for w in workers}
        for r in range(args.repeats):
            k = r % len(workers)  # rotate who goes first
            for w in workers[k:] + workers[:k]:
                times[w.spec.label].append(_quiet_call(w, args))
        _table(workers, ready, times, load_before, _load())
    finally:
        for w in workers:
            try:
                w.close()
            except Exception:  # a dead worker: kill the process we started
                w.proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def _quiet_call(w: Worker, args) -> tuple[float, float, int]:
    """One timed call, redone (up to --retries times) while other processes took more than
    --max_foreign of the CPUs: torch's OpenMP threads slow down 5-10x when one core is
    taken. Returns (seconds, foreign CPU share, calls made)."""
    calls = 0
    while True:
        t, foreign = w.go()
        calls += 1
        if foreign <= args.max_foreign or calls > args.retries:
            return t, foreign, calls


def _check(case: str, workdir: str, ready: dict) -> None:
    """Same weights and inputs, so the outputs (a) or first losses (b) must agree."""
    if case == "b":
        losses = ", ".join(f"{k} {v['loss']:.6f}" for k, v in ready.items())
        print(f"  first-step loss: {losses}")
        return
    ref = np.load(os.path.join(workdir, "torch_out.npy"))
    for label in ready:
        if label != "torch":
            out = np.load(os.path.join(workdir, f"{label}_out.npy"))
            print(
                f"  output vs torch: {label} max abs diff {np.abs(out - ref).max():.2e} "
                f"(output max abs {np.abs(ref).max():.2f})"
            )


def _table(workers, ready, times, load_before, load_after) -> None:
    print(f"  load average (1/5/15 min) before {load_before}, after {load_after}")
    print("  | impl | setup+compile s | median s | min s | max s | runs (calls) | foreign CPU |")
    print("  | --- | --- | --- | --- | --- | --- | --- |")
    med = {k: statistics.median(t for t, _, _ in v) for k, v in times.items()}
    for k, v in times.items():
        secs = [t for t, _, _ in v]
        row = (ready[k]["setup_s"], med[k], min(secs), max(secs))
        calls = sum(n for _, _, n in v)
        foreign = statistics.median(f for _, f, _ in v)
        print(
            f"  | {k} | " + " | ".join(f"{x:.3f}" for x in row) + f" | {len(v)} ({calls}) "
            f"| {100 * foreign:.0f}% |"
        )
    ours = [w.spec.label for w in workers if w.spec.impl == "ldm_jax"]
    for other in ("torch", "diffusers-flax"):
        if other in med:
            for label in ours:
                print(
                    f"  speed {label} vs {other}: {med[other] / med[label]:.2f}x "
                    f"(median {other} / median {label})"
                )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--case", choices=("a", "b", "both"), default="both")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impls", default="torch,flax,ldm_jax", help="comma list of torch,flax,ldm_jax")
    # a value that starts with -- needs the = form: --xla_flags=--xla_cpu_...
    p.add_argument("--xla_flags", default="", help="XLA_FLAGS of the ldm_jax worker")
    p.add_argument("--flax_xla_flags", default="", help="XLA_FLAGS of the diffusers-Flax worker")
    p.add_argument(
        "--ldm_variant",
        action="append",
        default=[],
        metavar="LABEL,SRC[,XLA_FLAGS]",
        help="one more ldm_jax worker: ldm_jax imported from SRC ('-': this checkout), "
        "with these XLA_FLAGS; repeatable",
    )
    p.add_argument("--flax_python", default=os.path.join(ROOT, ".venv-bench-flax", "bin", "python"))
    p.add_argument(
        "--max_foreign",
        type=float,
        default=0.15,
        help="redo a call if other processes took more than this share of the CPUs",
    )
    p.add_argument("--retries", type=int, default=3, help="redos per call at most")
    p.add_argument(
        "--cache_dir",
        default=os.path.join(ROOT, ".cache", "jax_bench"),
        help="persistent JAX compilation cache ('' to compile afresh)",
    )
    args = p.parse_args()
    print(f"load average (1/5/15 min) at start: {_load()}; {os.cpu_count()} CPUs")
    start = time.perf_counter()
    for case in ("a", "b") if args.case == "both" else (args.case,):
        run_case(case, args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
