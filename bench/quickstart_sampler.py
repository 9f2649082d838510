"""Where the quickstart's colour-noise blobs come from (issue 17): one trained class LDM
sampled with several sampler settings, and its first stage on real digits.

    python bench/quickstart_sampler.py --root runs/quickstart
    python bench/quickstart_sampler.py --root runs/quickstart \
        --variants '[{}, {"eta": 1.0}, {"steps": 200}, {"guidance_scale": 1.0}]'

For `<root>/ldm_digits` (a class run) it prints, as JSON lines:
  first_stage  the first stage on 128 held-out digits: PSNR of the reconstructions, their
               colour shift (each image's largest per-channel mean error, in 0..255
               levels), off-manifold share (the quickstart's digits classifier), and the scaled
               latents' std and largest |z|, i.e. the range the LDM was trained on;
  variant      per sampler setting (keys of config.sampling over the run's own), 10
               samples of each class from the same starting noise: the off-manifold share,
               the conditional accuracy, and the sampled latents' std and largest |z|.
Each variant's samples are saved as a 10x10 PNG grid in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm_jax import runtime  # noqa: E402
from ldm_jax.data import images as images_lib  # noqa: E402
from ldm_jax.evaluation import digits_classifier  # noqa: E402
from ldm_jax.training.restore import open_run  # noqa: E402


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def first_stage_row(run, clf) -> None:
    task, state, frozen = run.task, run.state, run.mesh_run.frozen
    images, _ = digits_classifier._load("test", run.config.data.data_dir)
    x = jnp.asarray(images[:128])
    z = task.encode_images(state, frozen, x, jax.random.PRNGKey(0))
    recon = task.decode(state, frozen, z)
    recon = jnp.clip(recon, -1, 1)
    mse = float(jnp.mean((recon - x) ** 2))
    # colour shift: each image's largest per-channel mean error, in 0..255 levels
    shift = jnp.abs(jnp.mean(recon - x, axis=(1, 2))).max(axis=-1) * 127.5
    emit(section="first_stage", psnr_db=round(10 * np.log10(4.0 / mse), 2),
         colour_shift_levels_mean=float(shift.mean()), colour_shift_levels_max=float(shift.max()),
         recon_off_manifold=clf.off_manifold_share(np.asarray(recon)),
         real_off_manifold=clf.real_off_manifold_share, latent_std=float(z.std()),
         latent_max_abs=float(jnp.abs(z).max()), scale_factor=float(state.scale_factor))  # fmt: skip


def variant_row(run, clf, variant: dict, out: str) -> None:
    task, state, frozen = run.task, run.state, run.mesh_run.frozen
    sampling = run.config.sampling.copy_and_resolve_references()
    for key, value in variant.items():
        sampling[key] = value
    labels = np.repeat(np.arange(10), 10)
    shape = (len(labels), task.latent_size, task.latent_size, task.first_stage.latent_channels)

    def draw(state, frozen, inputs, rng):
        return task.sample_latents(state, frozen, inputs, rng, shape=shape, sampling=sampling)

    with jax.set_mesh(run.mesh_run.mesh):
        z = jax.jit(draw)(state, frozen, task.cond.inputs(list(labels)), jax.random.PRNGKey(0))
        images = np.asarray(task.decode(state, frozen, z))
    name = "_".join(f"{k}{v}" for k, v in variant.items()) or "as_configured"
    grid = images_lib.to_uint8(images).reshape(10, 10, *images.shape[1:])
    grid = grid.transpose(1, 2, 0, 3, 4).reshape(10 * images.shape[1], 10 * images.shape[2], 3)
    Image.fromarray(grid).save(os.path.join(out, f"{name}.png"))
    emit(section="variant", variant=variant, off_manifold=clf.off_manifold_share(images),
         accuracy=clf.accuracy(images, labels), latent_std=float(z.std()),
         latent_max_abs=float(jnp.abs(z).max()), png=os.path.join(out, f"{name}.png"))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="a quickstart workdir (holds ldm_digits/)")
    p.add_argument("--variants", default='[{}, {"eta": 1.0}]', help="JSON list of dicts")
    p.add_argument("--out", default=None, help="PNG folder (default: <root>/sampler_bench)")
    args = p.parse_args()
    runtime.setup()
    out = args.out or os.path.join(args.root, "sampler_bench")
    os.makedirs(out, exist_ok=True)
    run = open_run(os.path.join(args.root, "ldm_digits"), -1, "diffusion", inference=True)
    clf = digits_classifier.DigitsClassifier(run.config.data.data_dir)
    first_stage_row(run, clf)
    for variant in json.loads(args.variants):
        variant_row(run, clf, variant, out)


if __name__ == "__main__":
    main()
