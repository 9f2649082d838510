"""Sample a trained latent diffusion run: PNG grid + samples.npz.

    python -m ldm_jax.sample --workdir runs/quickstart/ldm_digits --labels 0,1,2,3 \
        --num_per_condition 4 --sampler ddim --steps 50 --guidance 3.0 --seed 0
    python -m ldm_jax.sample --workdir runs/quickstart/ldm_text --prompts "a handwritten digit seven"
    # text-to-image with imported Stable Diffusion weights (see ldm_jax.import_sd)
    python -m ldm_jax.sample --workdir runs/sd15 --prompts "a photo of a cat" --guidance 7.5

The run's config is read from its checkpoint, so only the workdir is needed; the state is
restored onto the run's mesh (`config.mesh`, FSDP-sharded weights). Writes
`<out>/samples.png` (one row per condition) and `<out>/samples.npz` holding `images`
(uint8 [N, H, W, 3]) and, for class models, `labels` (int [N]).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a diffusion run's workdir")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1: latest)")
    p.add_argument("--labels", default=None, help="comma-separated class ids")
    p.add_argument("--prompts", nargs="*", default=None, help="text prompts")
    p.add_argument(
        "--negative_prompt",
        default=None,
        help="text runs: guide away from this text instead of the empty prompt",
    )
    p.add_argument(
        "--init_image",
        default=None,
        help="image-to-image: start from this image (resized and centre-cropped), noised",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=0.75,
        help="with --init_image: how far up the sampler's grid to noise it, in (0, 1]",
    )
    p.add_argument("--num_per_condition", type=int, default=4)
    p.add_argument("--sampler", default=None, help="ddpm, ddim, plms, dpm_solver_pp_2m")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--latent_size", type=int, default=None, help="sample larger latents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: <workdir>/samples)")
    return p


def _init_distributed() -> None:
    from ldm_jax.parallel import distributed

    distributed.initialize()


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from ldm_jax import runtime

    return runtime.run_command(run, args)


def run(args) -> dict:
    import jax
    from jax.experimental import multihost_utils

    from ldm_jax.diffusion.samplers import get_sampler
    from ldm_jax.errors import UserError
    from ldm_jax.parallel import mesh as mesh_lib
    from ldm_jax.training import outputs
    from ldm_jax.training.restore import load_run

    _init_distributed()
    workdir = pathlib.Path(args.workdir).absolute()

    def overrides(config):
        sc = config.sampling
        for key, value in (("sampler", args.sampler), ("steps", args.steps), ("eta", args.eta)):
            if value is not None:
                sc[key] = value
        if args.guidance is not None:
            sc.guidance_scale = args.guidance
        get_sampler(sc.sampler)  # unknown name -> error listing the valid ones

    config, task, state, step = load_run(workdir, args.step, "diffusion", overrides, sharded=True)
    sc = config.sampling
    mesh = mesh_lib.make_mesh(config.mesh)  # the state's mesh (FSDP-sharded weights)

    n = args.num_per_condition
    labels = None
    if task.cond.kind == "class":
        if args.labels is None:
            raise UserError(
                f"this is a class-conditional run: pass --labels (ids in [0, {task.cond.n_classes - 1}])."
            )
        conds = [int(v) for v in args.labels.split(",")]
        inputs_per = [task.cond.labels_inputs([c] * n) for c in conds]
        labels = np.repeat(np.asarray(conds), n)
    elif task.cond.is_text:
        if not args.prompts:
            raise UserError('this is a text-conditional run: pass --prompts "...".')
        conds = list(args.prompts)
        inputs_per = [task.cond.encode_prompts([p] * n) for p in conds]
    else:
        conds, inputs_per = [None], [{}]
    uncond = None
    if args.negative_prompt is not None:
        if not task.cond.is_text:
            raise UserError(
                f"--negative_prompt needs a text-conditional run; this one is {task.cond.kind!r}."
            )
        if sc.guidance_scale == 1.0:
            raise UserError("--negative_prompt acts through guidance: pass --guidance above 1.")
        uncond = task.cond.encode_prompts([args.negative_prompt] * n)
    s = args.latent_size or task.latent_size
    shape = (n, s, s, task.first_stage.latent_channels)
    init, strength = None, None
    if args.init_image is not None:
        if task.concat:
            raise UserError("--init_image is for runs without a dense (concat) condition.")
        try:
            task.img2img_start(args.strength, sc)  # a bad strength fails before any work
        except ValueError as e:
            raise UserError(f"--strength: {e}") from None
        image = outputs.load_image(args.init_image, s * task.first_stage.factor)
        init, strength = np.repeat(image[None], n, axis=0), args.strength
    split = n % mesh_lib.batch_size_per_shard(mesh) == 0  # else each device draws them all
    out_sharding = mesh_lib.batch_sharding(mesh) if split else mesh_lib.replicated(mesh)
    rows = []
    with jax.set_mesh(mesh):
        frozen = jax.device_put(jax.device_get(task.frozen_params()), mesh_lib.replicated(mesh))

        def draw(st, fr, inp, un, init, r):
            init_latents = None
            if init is not None:  # encode with its own key: the sampler's stays as without
                init_latents = task.encode_images(st, fr, init, jax.random.fold_in(r, 1 << 20))
            return task.sample(st, fr, inp, r, shape=shape, uncond=un,
                               init_latents=init_latents, strength=strength)  # fmt: skip

        fn = jax.jit(draw, out_shardings=out_sharding)
        for i, inputs in enumerate(inputs_per):
            rng = jax.random.fold_in(jax.random.PRNGKey(args.seed), i)
            images = fn(state, frozen, inputs, uncond, init, rng)
            images = multihost_utils.process_allgather(images, tiled=True)
            rows.append(outputs.to_uint8(images))
    if jax.process_index() != 0:
        return {"images": np.concatenate(rows), "labels": labels, "out": None}
    out = pathlib.Path(args.out) if args.out else workdir / "samples"
    out.mkdir(parents=True, exist_ok=True)
    images = np.concatenate(rows)
    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = labels.astype(np.int64)
    np.savez(out / "samples.npz", **arrays)
    outputs.save_png(
        out / "samples.png", outputs.image_grid(rows), upscale=max(1, 128 // images.shape[1])
    )
    settings = {
        "workdir": str(workdir),
        "step": step,
        "sampler": sc.sampler,
        "steps": sc.steps,
        "guidance_scale": sc.guidance_scale,
        "seed": args.seed,
        "conditions": conds,
        "negative_prompt": args.negative_prompt,
        "init_image": args.init_image,
        "strength": strength,
        "num_per_condition": n,
    }
    (out / "samples.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(f"wrote {out / 'samples.png'} and {out / 'samples.npz'} ({len(images)} images)")
    return {"images": images, "labels": labels, "out": str(out)}


if __name__ == "__main__":
    main()
