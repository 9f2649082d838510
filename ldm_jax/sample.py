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

from ldm_jax.data import images as images_lib
from ldm_jax.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from ldm_jax.runtime import CommandParser

    p = CommandParser(description=__doc__.splitlines()[0], config_overrides=True)
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


def main(argv=None) -> dict:
    from ldm_jax import runtime

    return runtime.run_command(run, build_parser(), argv)


def _overrides(args):
    """`--config.KEY=VALUE` overrides, then the command's sampling flags, written into the
    run's config before the task is built."""

    def apply(config):
        from ldm_jax.diffusion.samplers import get_sampler, sampling_grid
        from ldm_jax.runtime import apply_config_overrides

        apply_config_overrides(config, args.config_overrides)
        sampling = config.sampling
        for key, value in (("sampler", args.sampler), ("steps", args.steps), ("eta", args.eta)):
            if value is not None:
                sampling[key] = value
        if args.guidance is not None:
            sampling.guidance_scale = args.guidance
        try:
            get_sampler(sampling.sampler)
        except ValueError as e:
            raise UserError(f"--sampler: {e}") from None
        try:  # a step count the sampler's grid cannot take (0 included) fails before any work
            sampling_grid(sampling, int(config.diffusion.timesteps))
        except ValueError as e:
            raise UserError(f"--steps {sampling.steps}: {e}") from None

    return apply


def _conditions(args, task) -> list:
    """The conditions to sample, one row each: --labels or --prompts as the run needs."""
    if task.cond.kind == "class":
        if args.labels is None:
            raise UserError(
                "this is a class-conditional run: pass --labels (ids in "
                f"[0, {task.cond.n_classes - 1}])."
            )
        return [task.cond.parse(v.strip()) for v in args.labels.split(",")]
    if task.cond.is_text:
        if not args.prompts:
            raise UserError('this is a text-conditional run: pass --prompts "...".')
        return list(args.prompts)
    return [None]


def _negative_inputs(args, task, sampling, n: int):
    if args.negative_prompt is None:
        return None
    if not task.cond.is_text:
        raise UserError(
            f"--negative_prompt needs a text-conditional run; this one is {task.cond.kind!r}."
        )
    if sampling.guidance_scale == 1.0:
        raise UserError("--negative_prompt acts through guidance: pass --guidance above 1.")
    return task.cond.inputs([args.negative_prompt] * n)


def _init_images(args, task, sampling, size: int, n: int):
    """Image-to-image: the --init_image repeated n times, or None."""
    if args.init_image is None:
        return None
    if task.concat:
        raise UserError("--init_image is for runs without a dense (concat) condition.")
    try:
        task.img2img_start(args.strength, sampling)  # a bad strength fails before any work
    except ValueError as e:
        raise UserError(f"--strength: {e}") from None
    image = images_lib.load_image(args.init_image, size * task.first_stage.factor)
    return np.repeat(image[None], n, axis=0)


def _draw_fn(task, mesh_run, shape, strength):
    """A jitted (state, frozen, inputs, uncond, init images, rng) -> images on the mesh."""
    import jax

    # Each device draws all of them when n does not split over the batch shards.
    split = shape[0] % mesh_run.batch_shards == 0
    out_sharding = mesh_run.batch_sharding if split else mesh_run.replicated

    def draw(state, frozen, inputs, uncond, init, rng):
        init_latents = None
        if init is not None:  # encode with its own key: the sampler's stays as without
            init_latents = task.encode_images(state, frozen, init, jax.random.fold_in(rng, 1 << 20))
        return task.sample(state, frozen, inputs, rng, shape=shape, uncond=uncond,
                           init_latents=init_latents, strength=strength)  # fmt: skip

    return jax.jit(draw, out_shardings=out_sharding)


def run(args) -> dict:
    import jax

    from ldm_jax.parallel import distributed
    from ldm_jax.training.restore import open_run

    if args.num_per_condition < 1:
        raise UserError(f"--num_per_condition {args.num_per_condition}: draw at least 1.")
    distributed.initialize()
    workdir = pathlib.Path(args.workdir).absolute()
    restored = open_run(workdir, args.step, "diffusion", _overrides(args))
    task, sampling, n = restored.task, restored.config.sampling, args.num_per_condition
    conds = _conditions(args, task)
    uncond = _negative_inputs(args, task, sampling, n)
    size = args.latent_size or task.latent_size
    init = _init_images(args, task, sampling, size, n)
    shape = (n, size, size, task.first_stage.latent_channels)
    strength = args.strength if init is not None else None
    rows, mesh_run = [], restored.mesh_run
    with jax.set_mesh(mesh_run.mesh):
        draw = _draw_fn(task, mesh_run, shape, strength)
        for i, cond in enumerate(conds):
            rng = jax.random.fold_in(jax.random.PRNGKey(args.seed), i)
            inputs = task.cond.inputs([cond] * n)
            images = draw(restored.state, mesh_run.frozen, inputs, uncond, init, rng)
            rows.append(images_lib.to_uint8(mesh_run.all_rows(images)))
    labels = np.repeat(np.asarray(conds), n) if task.cond.kind == "class" else None
    if jax.process_index() != 0:
        return {"images": np.concatenate(rows), "labels": labels, "out": None}
    settings = {
        "workdir": str(workdir), "step": restored.step, "sampler": sampling.sampler,
        "steps": sampling.steps, "guidance_scale": sampling.guidance_scale, "seed": args.seed,
        "conditions": conds, "negative_prompt": args.negative_prompt,
        "init_image": args.init_image, "strength": strength, "num_per_condition": n,
    }  # fmt: skip
    out = pathlib.Path(args.out) if args.out else workdir / "samples"
    return _write(out, rows, labels, settings)


def _write(out: pathlib.Path, rows: list, labels, settings: dict) -> dict:
    """samples.npz, samples.png (a row per condition) and samples.json in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    images = np.concatenate(rows)
    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = labels.astype(np.int64)
    np.savez(out / "samples.npz", **arrays)
    upscale = max(1, 128 // images.shape[1])
    images_lib.save_png(out / "samples.png", images_lib.image_grid(rows), upscale=upscale)
    (out / "samples.json").write_text(json.dumps(settings, indent=2, default=int) + "\n")
    print(f"wrote {out / 'samples.png'} and {out / 'samples.npz'} ({len(images)} images)")
    return {"images": images, "labels": labels, "out": str(out)}


if __name__ == "__main__":
    main()
