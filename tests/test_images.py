"""Sample grids as pictures: upscaled grids and the captions under their columns."""

import numpy as np

from ldm_jax.data import images


def test_an_upscaled_grid_is_the_grid_of_the_upscaled_images():
    rows = [np.random.default_rng(r).integers(0, 255, (3, 4, 4, 3), np.uint8) for r in range(2)]
    grid = images.image_grid(rows, upscale=2)
    assert grid.shape == (2 * (8 + 2) + 2, 3 * (8 + 2) + 2, 3)
    np.testing.assert_array_equal(grid[2:10:2, 2:10:2], rows[0][0])  # first image, every 2nd


def test_captions_are_written_under_each_column_and_wrapped():
    rows = [np.zeros((3, 32, 32, 3), np.uint8)]
    grid = images.image_grid(rows, upscale=2)
    long = "a photograph of an astronaut riding a horse on the moon, highly detailed"
    out = images.caption_columns(grid, ["7", long, ""], column_width=64)
    assert out.shape[1] == grid.shape[1] and out.shape[0] > grid.shape[0]
    np.testing.assert_array_equal(out[: grid.shape[0]], grid)  # the grid itself unchanged
    band = out[grid.shape[0] :].min(axis=-1) < 128  # dark pixels: text
    columns = [band[:, 2 + i * 66 : 2 + i * 66 + 64] for i in range(3)]
    assert columns[0].any() and not columns[2].any()  # "7" written, "" not
    lines = np.nonzero(columns[1].any(axis=1))[0]
    assert lines.max() - lines.min() > 20  # the long prompt wraps onto more lines
    assert not band[:, 2 * 66 :].any()  # and stays within its own column
