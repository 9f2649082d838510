"""Import Stable Diffusion weights as an ldm_jax diffusion run.

    # a CompVis / Stability single file (.safetensors reads without torch; .ckpt needs it)
    python -m ldm_jax.import_sd --checkpoint v1-5-pruned-emaonly.safetensors --workdir runs/sd15
    python -m ldm_jax.import_sd --checkpoint v2-1_768-ema-pruned.safetensors \
        --parameterization v --workdir runs/sd21
    # a diffusers folder (unet/, vae/, text_encoder/, scheduler/, tokenizer/)
    python -m ldm_jax.import_sd --diffusers path/to/stable-diffusion-v1-5 --workdir runs/sd15
    # or its id on the Hugging Face hub (downloaded into the hub's cache; the only command
    # that uses the network, and HF_HUB_OFFLINE=1 reads the cache only)
    python -m ldm_jax.import_sd --diffusers ORG/NAME[@REVISION] --workdir runs/sd15

then `python -m ldm_jax.sample --workdir runs/sd15 --prompts "..."`. The run holds the
UNet at step 0 (EMA = weights), the VAE as its first stage and the CLIP text encoder: the
release is read by ldm_jax.interop.stable_diffusion and written as a run by
ldm_jax.training.sd_runs. Nothing existing is overwritten. Every path may be a bucket
(gs://bucket/sd/v1-5.safetensors, --workdir gs://bucket/runs/sd15; any etils.epath URL).
"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    from ldm_jax.runtime import CommandParser

    p = CommandParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="single-file checkpoint (.safetensors / .ckpt)")
    src.add_argument(
        "--diffusers", help="diffusers pipeline folder, or its hub id ORG/NAME[@REVISION]"
    )
    p.add_argument("--workdir", required=True, help="new run directory")
    p.add_argument("--parameterization", choices=("eps", "v"), default=None,
                   help="model output (required for SD 2.x single files without YAML)")  # fmt: skip
    p.add_argument("--original_config", default=None, help="the CompVis inference YAML")
    p.add_argument("--image_size", type=int, default=None, help="pixels (default by model)")
    return p


def run(args) -> str:
    from ldm_jax.interop import hub
    from ldm_jax.interop import stable_diffusion as sd
    from ldm_jax.training import sd_runs

    if args.checkpoint:
        model = sd.from_single_file(
            args.checkpoint, parameterization=args.parameterization,
            original_config=args.original_config, image_size=args.image_size,
        )  # fmt: skip
    else:
        folder = hub.fetch(args.diffusers) if hub.is_hub_id(args.diffusers) else args.diffusers
        model = sd.from_diffusers(folder, image_size=args.image_size)
    workdir = sd_runs.write_run(model, args.workdir)
    print(
        f"imported {model.source} ({model.tokenizer.upper()}-style, {model.parameterization}, "
        f"{model.image_size} px) into {workdir}"
    )
    return str(workdir)


def main(argv=None) -> str:
    from ldm_jax import runtime

    return runtime.run_command(run, build_parser(), argv)


if __name__ == "__main__":
    main()
