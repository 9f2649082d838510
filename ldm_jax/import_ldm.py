"""Import a CompVis model-zoo release (model.ckpt + config.yaml) as an ldm_jax run.

    # a first stage: models/first_stage_models/{kl-f4,kl-f8,kl-f16,kl-f32,vq-f4,vq-f8,
    # vq-f16,vq-f4-noattn}
    python -m ldm_jax.import_ldm --checkpoint vq-f4/model.ckpt --config vq-f4/config.yaml \
        --workdir runs/vq_f4
    # an LDM: models/ldm/{celeba256,ffhq256,lsun_churches256,lsun_beds256,cin256-v2,cin256,
    # text2img-large,bsr_sr,inpainting_big,layout2img-openimages256,semantic_synthesis256}
    python -m ldm_jax.import_ldm --checkpoint cin256-v2/model.ckpt \
        --config configs/latent-diffusion/cin256-v2.yaml --workdir runs/cin256_v2

then `python -m ldm_jax.sample --workdir runs/cin256_v2 --labels 88,979` (or `evaluate`,
`train` to fine-tune). A first stage becomes an autoencoder run (usable as a diffusion
run's config.first_stage.workdir); an LDM a diffusion run holding its own first stage,
its UNet (the EMA weights where the file has them) and its conditioning encoder. The
release is read by ldm_jax.training.compvis_configs and written by
ldm_jax.training.compvis_runs; nothing existing is overwritten. Reading a .ckpt needs
torch (`pip install torch`).
"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    from ldm_jax.runtime import CommandParser

    p = CommandParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="the release's model.ckpt")
    p.add_argument("--config", required=True, help="its config.yaml")
    p.add_argument("--workdir", required=True, help="new run directory")
    return p


def run(args) -> str:
    from ldm_jax.training import compvis_runs

    workdir, what = compvis_runs.import_release(args.checkpoint, args.config, args.workdir)
    print(f"imported {args.checkpoint} ({what}) into {workdir}")
    return str(workdir)


def main(argv=None) -> str:
    from ldm_jax import runtime

    return runtime.run_command(run, build_parser(), argv)


if __name__ == "__main__":
    main()
