"""Tiled decoding: a large latent decoded in overlapping tiles, blended in the overlaps.

Decoding a 256x256 latent (1024x1024 pixels at f=4) through the first stage at once holds
the decoder's full-resolution activations for the whole image. `decode_tiled` decodes
tiles of `tile` x `tile` latent pixels one after another (a `lax.scan`, so one compile of
the decoder for the tile shape and one tile's activations alive at a time) and blends
them: each tile is weighted by a window that ramps linearly over `overlap` latent pixels
(times the decoder's upsampling) at every edge it shares with a neighbour and is flat
elsewhere, and the weighted sum is divided by the summed weights.

The result is an approximation wherever a decoded pixel depends on more than its tile:
near tile edges (the convolutions' receptive fields see the tile's zero padding instead
of the neighbour) and, for first stages with GroupNorm and mid-block attention (the LDM
autoencoders), everywhere a little, since their statistics and attention are the tile's
rather than the image's. The ramps hide the seams; with one tile covering the latent the
decode is the untiled one exactly.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import UserError


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` (<= size) covering [0, size), evenly spread, each
    overlapping the next by at least `overlap`."""
    if tile >= size:
        return [0]
    count = -(-(size - overlap) // (tile - overlap))  # ceil
    return [int(s) for s in np.round(np.linspace(0, size - tile, count))]


def _windows(starts: list[int], tile: int, size: int, ramp: int, scale: int) -> np.ndarray:
    """[tiles, tile * scale] 1-D blending weights along one axis: linear ramps of `ramp`
    output pixels at edges shared with a neighbour (strictly positive), 1 elsewhere."""
    n = tile * scale
    i = np.arange(n, dtype=np.float32)
    up = np.minimum((i + 0.5) / max(ramp, 1), 1.0)
    down = up[::-1]
    out = []
    for s in starts:
        w = np.ones(n, np.float32)
        if s > 0:
            w = np.minimum(w, up)
        if s + tile < size:
            w = np.minimum(w, down)
        out.append(w)
    return np.stack(out)


def check_tiling(tile: int, overlap: int) -> None:
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise UserError(
            f"decode tiles of {tile} latent pixels overlapping by {overlap}: give a tile of "
            "at least 1 and an overlap in [0, tile)."
        )


def decode_tiled(decode_fn, latents, tile: int, overlap: int):
    """`decode_fn` (latents [B, h, w, c] -> images [B, h*f, w*f, C]) applied in tiles of
    `tile` x `tile` latent pixels overlapping by `overlap`, blended (module docstring).
    One tile covering the latent is `decode_fn(latents)` itself. Works under jit."""
    check_tiling(tile, overlap)
    b, h, w, c = latents.shape
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    if len(ys) == 1 and len(xs) == 1:
        return decode_fn(latents)
    out = jax.eval_shape(decode_fn, jax.ShapeDtypeStruct((b, th, tw, c), latents.dtype))
    fy, fx = out.shape[1] // th, out.shape[2] // tw
    channels = out.shape[3]
    wy = jnp.asarray(_windows(ys, th, h, overlap * fy, fy))
    wx = jnp.asarray(_windows(xs, tw, w, overlap * fx, fx))
    grid = np.array([(i, j) for i in range(len(ys)) for j in range(len(xs))], np.int32)
    ys_arr, xs_arr = jnp.asarray(ys, jnp.int32), jnp.asarray(xs, jnp.int32)

    def body(carry, index):
        acc, total = carry
        i, j = index[0], index[1]
        y0, x0 = ys_arr[i], xs_arr[j]
        z = jax.lax.dynamic_slice(latents, (0, y0, x0, 0), (b, th, tw, c))
        image = decode_fn(z).astype(jnp.float32)
        window = wy[i][:, None] * wx[j][None, :]
        at = (0, y0 * fy, x0 * fx, 0)
        size = (b, th * fy, tw * fx, channels)
        region = jax.lax.dynamic_slice(acc, at, size)
        acc = jax.lax.dynamic_update_slice(acc, region + image * window[None, :, :, None], at)
        covered = jax.lax.dynamic_slice(total, at[1:3], size[1:3])
        total = jax.lax.dynamic_update_slice(total, covered + window, at[1:3])
        return (acc, total), None

    acc = jnp.zeros((b, h * fy, w * fx, channels), jnp.float32)
    total = jnp.zeros((h * fy, w * fx), jnp.float32)
    (acc, total), _ = jax.lax.scan(body, (acc, total), jnp.asarray(grid))
    return (acc / total[None, :, :, None]).astype(out.dtype)


def needs_tiles(latent_hw, tile: int) -> bool:
    """Whether a latent of this size is decoded in tiles (`tile` 0: never)."""
    return tile > 0 and max(latent_hw) > tile


def with_tiled_decode(task, tile: int, overlap: int):
    """A shallow copy of a diffusion task whose `decode` goes through `decode_tiled`:
    `task.sample` and `task.sample_from_condition` then decode in tiles, everything else
    (sampling, mask guidance, the inpainting composite) unchanged."""
    check_tiling(tile, overlap)
    view = copy.copy(task)

    def decode(state, frozen, latents):
        return decode_tiled(lambda z: task.decode(state, frozen, z), latents, tile, overlap)

    view.decode = decode
    return view
