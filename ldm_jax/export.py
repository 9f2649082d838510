"""Export a diffusion run's weights (EMA UNet, first stage, text encoder) for other tools.

    python -m ldm_jax.export --workdir runs/sd15 --layout diffusers --out export/sd15
    python -m ldm_jax.export --workdir runs/sd15 --layout compvis --out export/sd15.safetensors
    python -m ldm_jax.export --workdir runs/quickstart/ldm_digits --layout ldm_jax \
        --out export/digits.safetensors

Layouts: ldm_jax (.safetensors, names are param paths: unet/..., vae/..., text_encoder/...,
with the run's config beside it as .json), msgpack (the same tree), compvis (one
.safetensors in the Stable Diffusion single-file naming, plus its inference .yaml), and
diffusers (a pipeline folder). Each imports back to identical arrays (ldm_jax.import_sd,
ldm_jax.interop.tensor_files.load_params). Nothing existing is overwritten. --workdir and
--out may be buckets (gs://...; any etils.epath URL): the files are written locally in the
mirror's folder ($LDM_JAX_MIRROR_DIR), then uploaded.
"""

from __future__ import annotations

import argparse

from ldm_jax.training.sd_runs import EXPORT_LAYOUTS


def build_parser() -> argparse.ArgumentParser:
    from ldm_jax.runtime import CommandParser

    p = CommandParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a diffusion run")
    p.add_argument("--step", type=int, default=-1)
    p.add_argument("--layout", required=True, choices=EXPORT_LAYOUTS)
    p.add_argument("--out", required=True, help="new file (or folder for diffusers)")
    return p


def run(args) -> str:
    from ldm_jax.training import sd_runs

    out = sd_runs.export_run(args.workdir, args.layout, args.out, step=args.step)
    print(f"exported {args.workdir} ({args.layout}) to {out}")
    return str(out)


def main(argv=None) -> str:
    from ldm_jax import runtime

    return runtime.run_command(run, build_parser(), argv)


if __name__ == "__main__":
    main()
