"""Sample a trained latent diffusion run: PNG grid + samples.npz.

    python -m ldm_jax.sample --workdir runs/quickstart/ldm_digits --labels 0,1,2,3 \
        --num_per_condition 4 --sampler ddim --steps 50 --guidance 3.0 --seed 0
    python -m ldm_jax.sample --workdir runs/quickstart/ldm_text --prompts "a handwritten digit seven"
    # text-to-image with imported Stable Diffusion weights (see ldm_jax.import_sd)
    python -m ldm_jax.sample --workdir runs/sd15 --prompts "a photo of a cat" --guidance 7.5

    # super-resolution (a low_res run) / inpainting (an inpaint run) of an image file, at
    # its own size: a run trained on 256x256 crops takes a larger image convolutionally
    python -m ldm_jax.sample --workdir runs/sr --cond_image photo.png
    python -m ldm_jax.sample --workdir runs/inpaint --cond_image photo.png --mask mask.png
    # mask-guided inpainting with any run (unconditional, class, text, imported SD)
    python -m ldm_jax.sample --workdir runs/sd15 --prompts "a cat" --cond_image photo.png \
        --mask mask.png
    # latents over 64 latent pixels on a side are decoded in overlapping tiles
    python -m ldm_jax.sample --workdir runs/sr --cond_image big.png --decode_tile 32
    # semantic synthesis from a PNG of class ids (any multiple of the run's size unit)
    python -m ldm_jax.sample --workdir runs/digit_scenes/semantic --cond_image map.png
    # layout-to-image: one row per layout, LABEL:x0,y0,x1,y1 objects (or a JSON file)
    python -m ldm_jax.sample --workdir runs/digit_scenes/layout \
        --layout "3:0.1,0.1,0.4,0.5;7:0.55,0.4,0.9,0.9" --layout layouts.json

The run's config is read from its checkpoint, so only the workdir is needed; the state is
restored onto the run's mesh (`config.mesh`, FSDP-sharded weights). Writes
`<out>/samples.png` (one row per condition) and `<out>/samples.npz` holding `images`
(uint8 [N, H, W, 3]) and, for class models, `labels` (int [N]).

`--cond_image` is read as RGB at its own size (no resize); the output is the size the
run's condition implies (the image's times the SR factor; the image's for inpainting),
which must be a multiple of the first stage's factor times the UNet's downsampling.
`--mask` is read as grayscale: white (>= 128) is the region to fill, the rest is kept
(exactly: inpainted samples are composited with the image outside the mask); it must have
the image's size. A run trained with an inpaint condition takes it at the UNet's input;
any other run inpaints by mask guidance. The class labels or prompts still apply, one row
each. With a condition image, each row of samples.png starts with the condition as a
picture (the low-res image nearest-upscaled, or the masked image, black where it is to be
filled), and samples.npz also holds it as `condition` (uint8 [1, H, W, 3]); `images` hold
the samples only. `--init_image`, `--latent_size` and `--negative_prompt` do not combine
with `--cond_image`.

A semantic run reads `--cond_image` as a class map: one id per pixel (a PNG of mode L, P
or I, or RGB with equal channels), at any size the run's size unit divides (convolutional
sampling, the paper's 512 -> 1024 landscapes); each row starts with the map coloured.
A layout run takes `--layout`, once per row: objects `LABEL:x0,y0,x1,y1` separated by
`;` (LABEL a class id or one of the run's class names; coordinates in [0, 1] of the
image, x right, y down), or a .json file holding a list of layouts, each a list of
{"label": ..., "box": [x0, y0, x1, y1]}; each row starts with its layout drawn.

Decoding: a latent larger than `--decode_tile` latent pixels on a side is decoded in tiles
of that size overlapping by `--decode_overlap` (default a quarter of a tile), blended with
linear ramps (ldm_jax.training.tiling; approximate, since the first stage's GroupNorm and
attention see a tile, not the image); `--decode_tile 0` never tiles.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from ldm_jax import storage
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
    p.add_argument(
        "--cond_image",
        default=None,
        help="super-resolve or inpaint this image, at its own size (the run's condition; "
        "with --mask, mask-guided inpainting for any run)",
    )
    p.add_argument(
        "--mask",
        default=None,
        help="with --cond_image: grayscale, of the image's size; white (>= 128) is filled",
    )
    p.add_argument(
        "--decode_tile",
        type=int,
        default=64,
        help="decode latents over this many latent pixels on a side in tiles of it (0: never)",
    )
    p.add_argument(
        "--decode_overlap",
        type=int,
        default=None,
        help="the decode tiles' overlap in latent pixels (default: a quarter of a tile)",
    )
    p.add_argument(
        "--layout",
        nargs="+",
        action="extend",
        default=None,
        help="layout runs: 'LABEL:x0,y0,x1,y1;...' or a .json file of layouts (one row each)",
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
    """The conditions to sample, one row each: --labels, --prompts or --layout as the run
    needs."""
    if args.layout is not None and task.cond.kind != "layout":
        raise UserError(f"--layout needs a layout run; this one is {task.cond.kind!r}.")
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
    if task.cond.kind == "layout":
        return _layouts(args, task)
    return [None]


def _layouts(args, task) -> list:
    from ldm_jax.data import layouts

    if not args.layout:
        raise UserError(
            'this is a layout run: pass --layout "LABEL:x0,y0,x1,y1;..." or a .json file.'
        )
    cond = task.cond
    return [lay for v in args.layout for lay in layouts.parse(v, cond.n_classes, cond.class_names)]


def read_class_map(path) -> np.ndarray:
    """A PNG of class ids -> int [H, W] (mode L, P or I; RGB only with equal channels)."""
    from PIL import Image

    path = storage.path(path)
    with path.open("rb") as f, Image.open(f) as image:
        ids = np.asarray(image)
    if ids.ndim == 3:
        if not (ids[..., :3] == ids[..., :1]).all():
            raise UserError(
                f"--cond_image {path} is a colour image; a semantic run's class map holds one "
                "id per pixel (save it as a greyscale or palette PNG of the ids)."
            )
        ids = ids[..., 0]
    return ids.astype(np.int64)


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
    if task.from_condition:
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


def _read_image(path, mode: str, flag: str) -> np.ndarray:
    """An image file as it is (no resize): uint8 [H, W, 3] (mode RGB) or [H, W] (L)."""
    from PIL import Image

    path = storage.path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path} not found.")
    try:
        with path.open("rb") as f, Image.open(f) as image:
            return np.asarray(image.convert(mode))
    except OSError as e:
        raise UserError(f"{flag} {path} is not an image PIL can read: {e}") from None


def _user_condition(args):
    """(--cond_image uint8 [H, W, 3], --mask bool [H, W] or None), or None without a
    condition image; refuses the flags that do not combine with it."""
    if args.cond_image is None:
        if args.mask is not None:
            raise UserError("--mask needs --cond_image: the image whose masked region to fill.")
        return None
    for flag, value, why in (
        ("--init_image", args.init_image, "image-to-image starts from another image"),
        ("--latent_size", args.latent_size, "the condition image sets the output size"),
        ("--negative_prompt", args.negative_prompt, "conditioned sampling takes no negative prompt"),
    ):  # fmt: skip
        if value is not None:
            raise UserError(f"{flag} does not combine with --cond_image ({why}); drop one.")
    image = _read_image(args.cond_image, "RGB", "--cond_image")
    if args.mask is None:
        return image, None
    mask = _read_image(args.mask, "L", "--mask") >= 128
    if mask.shape != image.shape[:2]:
        (mh, mw), (h, w) = mask.shape, image.shape[:2]
        raise UserError(
            f"--mask {args.mask} is {mw}x{mh} but --cond_image {args.cond_image} is {w}x{h}; "
            "give a mask of the image's size."
        )
    return image, mask


def _tiling(args) -> tuple[int, int]:
    """(tile, overlap) in latent pixels; tile 0: never tile."""
    from ldm_jax.training import tiling

    tile = args.decode_tile
    if tile < 0:
        raise UserError(f"--decode_tile {tile}: give a tile size in latent pixels, or 0.")
    overlap = tile // 4 if args.decode_overlap is None else args.decode_overlap
    if tile:
        try:
            tiling.check_tiling(tile, overlap)
        except UserError as e:
            raise UserError(f"--decode_tile {tile} --decode_overlap {overlap}: {e}") from None
    return tile, overlap


def _condition_arrays(task, user, n: int):
    """(the condition's arrays repeated n times, the output size) of a user image/mask."""
    image, mask = user
    condition = task.dense.user_inputs(image, mask)
    h, w = task.dense.output_size(*image.shape[:2])  # SR: times its factor
    task.check_sample_size(h, w)
    return {k: np.repeat(np.asarray(v), n, axis=0) for k, v in condition.items()}, (h, w)


def _condition_draw_fn(task, mesh_run, n: int):
    """A jitted (state, frozen, inputs, condition, rng) -> images on the mesh:
    `task.sample_from_condition`."""
    import jax

    split = n % mesh_run.batch_shards == 0
    out_sharding = mesh_run.batch_sharding if split else mesh_run.replicated

    def draw(state, frozen, inputs, condition, rng):
        return task.sample_from_condition(state, frozen, inputs, rng, condition)

    return jax.jit(draw, out_shardings=out_sharding)


def _dense_hint(task) -> str:
    mask = " --mask MASK.png (white: the region to fill)" if task.dense.kind == "inpaint" else ""
    return (
        f"this run samples from a {task.dense.kind} condition: give --cond_image IMAGE.png{mask}."
    )


def run(args) -> dict:
    import jax

    from ldm_jax.parallel import distributed
    from ldm_jax.training import tiling
    from ldm_jax.training.restore import open_run

    if args.num_per_condition < 1:
        raise UserError(f"--num_per_condition {args.num_per_condition}: draw at least 1.")
    user = _user_condition(args)  # unreadable files and flags that clash fail before any work
    tile, overlap = _tiling(args)
    distributed.initialize()
    workdir = storage.path(args.workdir)
    restored = open_run(workdir, args.step, "diffusion", _overrides(args), inference=True)
    task, sampling, n = restored.task, restored.config.sampling, args.num_per_condition
    if task.from_condition and user is None:
        raise UserError(_dense_hint(task))
    if user is not None and task.dense.kind == "semantic":
        user = (read_class_map(args.cond_image), user[1])
    conds = _conditions(args, task)
    f = task.first_stage.factor
    if user is not None:
        condition, (height, width) = _condition_arrays(task, user, n)
        latent_hw, uncond, init, strength = (height // f, width // f), None, None, None
    else:
        uncond = _negative_inputs(args, task, sampling, n)
        size = args.latent_size or task.latent_size
        init = _init_images(args, task, sampling, size, n)
        latent_hw, strength = (size, size), (args.strength if args.init_image else None)
    tiled = tiling.needs_tiles(latent_hw, tile)
    draw_task = tiling.with_tiled_decode(task, tile, overlap) if tiled else task
    rows, mesh_run = [], restored.mesh_run
    with jax.set_mesh(mesh_run.mesh):
        if user is not None:
            draw = _condition_draw_fn(draw_task, mesh_run, n)
        else:
            shape = (n, *latent_hw, task.first_stage.latent_channels)
            draw = _draw_fn(draw_task, mesh_run, shape, strength)
        for i, cond in enumerate(conds):
            rng = jax.random.fold_in(jax.random.PRNGKey(args.seed), i)
            inputs = task.cond.inputs([cond] * n)
            if user is not None:
                images = draw(restored.state, mesh_run.frozen, inputs, condition, rng)
            else:
                images = draw(restored.state, mesh_run.frozen, inputs, uncond, init, rng)
            rows.append(images_lib.to_uint8(mesh_run.all_rows(images)))
    labels = np.repeat(np.asarray(conds), n) if task.cond.kind == "class" else None
    shown = None
    if user is not None:  # the condition as a picture, the first column of each row
        shown = images_lib.to_uint8(task.condition_images({k: v[:1] for k, v in condition.items()}))
    if task.cond.kind == "layout":  # each row's own layout, drawn
        size = rows[0].shape[1]
        shown = [task.cond.layout_picture(task.cond.inputs([c])["tokens"][0], size)[None]
                 for c in conds]  # fmt: skip
        conds = [_layout_json(task, c) for c in conds]
    if jax.process_index() != 0:
        return {"images": np.concatenate(rows), "labels": labels, "out": None}
    settings = {
        "workdir": str(workdir), "step": restored.step, "sampler": sampling.sampler,
        "steps": sampling.steps, "guidance_scale": sampling.guidance_scale, "seed": args.seed,
        "conditions": conds, "negative_prompt": args.negative_prompt,
        "init_image": args.init_image, "strength": strength, "num_per_condition": n,
        "cond_image": args.cond_image, "mask": args.mask,
        "decode_tiles": [tile, overlap] if tiled else None,
    }  # fmt: skip
    out = storage.path(args.out) if args.out else workdir / "samples"
    return _write(out, rows, labels, settings, shown)


def _layout_json(task, layout) -> list:
    from ldm_jax.data import layouts

    return layouts.to_json(layout, task.cond.class_names)


def _write(out: storage.Path, rows: list, labels, settings: dict, shown=None) -> dict:
    """samples.npz, samples.png (a row per condition, `shown` first in each when given:
    one picture for every row, or a list of one per row) and samples.json in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    images = np.concatenate(rows)
    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = labels.astype(np.int64)
    grid_rows = rows
    if shown is not None:
        per_row = shown if isinstance(shown, list) else [shown] * len(rows)
        arrays["condition"] = np.concatenate(per_row) if isinstance(shown, list) else shown
        grid_rows = [np.concatenate([pic, row]) for pic, row in zip(per_row, rows)]
    storage.save_npz(out / "samples.npz", **arrays)
    upscale = max(1, 128 // images.shape[1])
    images_lib.save_png(out / "samples.png", images_lib.image_grid(grid_rows), upscale=upscale)
    (out / "samples.json").write_text(json.dumps(settings, indent=2, default=int) + "\n")
    print(f"wrote {out / 'samples.png'} and {out / 'samples.npz'} ({len(images)} images)")
    result = {"images": images, "labels": labels, "out": str(out)}
    if shown is not None:
        result["condition"] = shown
    return result


if __name__ == "__main__":
    main()
