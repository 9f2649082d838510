"""Peak memory of importing a full-size Stable Diffusion pipeline folder (issue 16's goal:
at most twice the weights' size).

    python bench/import_memory.py                       # SD-1.5 and SD-2 architectures
    python bench/import_memory.py --arch sd2 --cache /tmp/sd_folders --rounds 2

Each architecture's folder is what diffusers' own `StableDiffusionPipeline.save_pretrained`
writes (random fp32 weights, a CLIP tokenizer padded as that release pads), made once in a
process of its own and kept in `--cache`. Each import then runs as
`python -m ldm_jax.import_sd --diffusers FOLDER --workdir NEW` in a fresh process that
reports its own peak resident memory (`ru_maxrss`); the bench prints it beside the size
of the weights read and of the run written. `--python` and `--pythonpath` run the import
with another checkout (e.g. the previous commit, for a side-by-side figure).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHS = ("sd15", "sd2")

# The child that times and measures one import: its own peak RSS, from the kernel.
_IMPORT = """
import resource, sys, time
from ldm_jax import import_sd
t = time.perf_counter()
import_sd.main(["--diffusers", sys.argv[1], "--workdir", sys.argv[2]])
print("RESULT", time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

# The child that builds one architecture's folder with diffusers and transformers.
_BUILD = """
import json, sys, torch
import diffusers, transformers
from ldm_jax.interop import diffusers_config
from ldm_jax.models import clip_tokenizer, unet_configs

arch, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
sd2 = arch == "sd2"
unet_cfg = dict(unet_configs.PAPER_UNETS["sd-v2" if sd2 else "sd-v1"])
unet_cfg.update(in_channels=4, out_channels=4, image_size=96 if sd2 else 64)
unet = diffusers.UNet2DConditionModel(**{
    k: v for k, v in diffusers_config.unet_config_to_diffusers(unet_cfg).items()
    if not k.startswith("_")})
vae = diffusers.AutoencoderKL(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), sample_size=768 if sd2 else 512,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
    vocab_size=49408, hidden_size=1024 if sd2 else 768, intermediate_size=4096 if sd2 else 3072,
    num_hidden_layers=23 if sd2 else 12, num_attention_heads=16 if sd2 else 12,
    max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu"))
tokenizer = clip_tokenizer.clip_tokenizer("sd2" if sd2 else "sd1")
scheduler = diffusers.DDIMScheduler(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1,
    prediction_type="v_prediction" if sd2 else "epsilon")
pipe = diffusers.StableDiffusionPipeline(
    vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
pipe.save_pretrained(out)
"""


def _env(pythonpath: str | None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = pythonpath or str(ROOT)
    return env


def folder(arch: str, cache: pathlib.Path) -> pathlib.Path:
    """The architecture's pipeline folder, built on first use."""
    out = cache / arch
    if (out / "model_index.json").is_file():
        return out
    tmp = cache / f"{arch}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"building the {arch} folder in {out} (once)", flush=True)
    subprocess.run([sys.executable, "-c", _BUILD, arch, str(tmp)], check=True, env=_env(None))
    tmp.rename(out)
    return out


def size_of(path: pathlib.Path, suffixes=(".safetensors", ".bin")) -> int:
    """Bytes of the files under `path` (with `suffixes`: the weight files only)."""
    files = (f for f in path.rglob("*") if f.is_file())
    return sum(f.stat().st_size for f in files if not suffixes or f.suffix in suffixes)


def import_once(source: pathlib.Path, python: str, pythonpath: str | None) -> dict:
    with tempfile.TemporaryDirectory(dir=source.parent) as scratch:
        run = pathlib.Path(scratch) / "run"
        proc = subprocess.run(
            [python, "-c", _IMPORT, str(source), str(run)], capture_output=True, text=True,
            env=_env(pythonpath), cwd=pythonpath or ROOT,  # -c puts the cwd first
        )  # fmt: skip
        if proc.returncode != 0:
            return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
        seconds, peak = map(float, line.split()[1:])
        return {"seconds": seconds, "peak_bytes": int(peak), "run_bytes": size_of(run, ())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=ARCHS, action="append")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "ldm_jax_sd_folders"))
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--python", default=sys.executable, help="the interpreter of the import")
    p.add_argument("--pythonpath", default=None, help="the checkout the import runs from")
    args = p.parse_args()
    cache = pathlib.Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for arch in args.arch or ARCHS:
        source = folder(arch, cache)
        weights = size_of(source)
        for r in range(args.rounds):
            t = time.perf_counter()
            result = {"arch": arch, "round": r, "weights_bytes": weights,
                      **import_once(source, args.python, args.pythonpath)}  # fmt: skip
            if "peak_bytes" in result:
                result["peak_over_weights"] = round(result["peak_bytes"] / weights, 2)
            result["wall_s"] = round(time.perf_counter() - t, 1)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
