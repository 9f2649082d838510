"""The sample command's conditioned sampling: super-resolution and inpainting from image
files (equal to `DiffusionTask.sample_from_condition` through the API), at sizes other
than the trained one, mask-guided inpainting of a run without a dense condition, tiled
decoding, and the bad inputs of the new flags.

The SR and inpainting runs are written here as step-0 checkpoints of toy configs on the
session's tiny autoencoder, their EMA UNet perturbed so that its output (zero-initialised
last layer) depends on the condition: the command and the API must agree on any weights,
and writing a checkpoint costs seconds where training one costs a train-step compile.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_all_refused, write_diffusion_run
from PIL import Image
from toy import tiny_diffusion_config

from ldm_jax.data import images as images_lib
from ldm_jax.training import tiling

STEPS = 4  # sampler steps of every command here (the toy config's grid takes 4)
_tiled = jax.jit(tiling.decode_tiled, static_argnums=(0, 2, 3))  # (decode, z, tile, overlap)


def _smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """uint8 [h, w, 3]: a few random sinusoids, image-like rather than noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = []
    for _ in range(3):
        fy, fx, phase = rng.uniform(0.05, 0.4), rng.uniform(0.05, 0.4), rng.uniform(0, 6)
        chans.append(np.sin(fy * yy + fx * xx + phase))
    return np.round((np.stack(chans, -1) * 0.8 + 1.0) * 127.5).astype(np.uint8)


def _box_mask(h: int, w: int, box) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = 255
    return mask


def _png(path, array) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def _write_run(workdir, ae_workdir, kind: str) -> None:
    config = tiny_diffusion_config(
        ae_workdir,
        data__condition__kind=kind,
        conditioning_key="concat",
        cond__kind="none",
        model__use_spatial_transformer=False,  # no context without cross-attention
        latent_cache__enabled=False,  # nothing is trained here
    )
    write_diffusion_run(workdir, config)


@pytest.fixture(scope="module")
def dense_runs(tmp_path_factory, tiny_autoencoder_run):
    """{"low_res": SR run (x4, 32x32 from 8x8), "inpaint": inpainting run (32x32)}."""
    root = tmp_path_factory.mktemp("dense_runs")
    runs = {}
    for kind in ("low_res", "inpaint"):
        runs[kind] = root / kind
        _write_run(runs[kind], tiny_autoencoder_run[0], kind)
    return runs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Condition images and masks (PNG paths) and their arrays."""
    root = tmp_path_factory.mktemp("cond_files")
    low = _smooth_image(8, 8, 0)  # the SR run's trained size
    low_wide = _smooth_image(8, 16, 1)
    image = _smooth_image(32, 32, 2)
    big = _smooth_image(48, 40, 3)
    mask = _box_mask(32, 32, (8, 20, 10, 26))
    big_mask = _box_mask(48, 40, (4, 30, 12, 36))
    arrays = dict(low=low, low_wide=low_wide, image=image, big=big, mask=mask,
                  big_mask=big_mask, odd=_smooth_image(30, 30, 4),
                  odd_mask=_box_mask(30, 30, (2, 9, 2, 9)), odd_low=_smooth_image(7, 7, 5),
                  low_mask=_box_mask(8, 8, (2, 5, 2, 5)))  # fmt: skip
    paths = {k: _png(root / f"{k}.png", v) for k, v in arrays.items()}
    return paths, arrays


def _command(workdir, out, *flags, n=2):
    from ldm_jax import sample

    return sample.main([f"--workdir={workdir}", f"--num_per_condition={n}", f"--steps={STEPS}",
                        f"--out={out}", *flags])  # fmt: skip


def _api_samples(workdir, image, mask, n, seed=0, labels=None):
    """uint8 samples of `DiffusionTask.sample_from_condition` called as a library user
    would: the run restored, the condition made by `dense.user_inputs`, one jitted call per
    condition with the command's key derivation fold_in(PRNGKey(seed), i)."""
    from ldm_jax.training.restore import open_run

    restored = open_run(workdir, -1, "diffusion")
    task, mesh_run = restored.task, restored.mesh_run
    sampling = restored.config.sampling.copy_and_resolve_references()
    sampling.steps = STEPS
    condition = {k: np.repeat(v, n, axis=0) for k, v in task.dense.user_inputs(image, mask).items()}
    conds = [None] if labels is None else labels
    rows = []
    with jax.set_mesh(mesh_run.mesh):
        fn = jax.jit(
            lambda state, frozen, inputs, condition, rng: task.sample_from_condition(
                state, frozen, inputs, rng, condition, sampling=sampling
            )
        )
        for i, cond in enumerate(conds):
            rng = jax.random.fold_in(jax.random.PRNGKey(seed), i)
            x = fn(restored.state, mesh_run.frozen, task.cond.inputs([cond] * n), condition, rng)
            rows.append(images_lib.to_uint8(mesh_run.all_rows(x)))
    return np.concatenate(rows)


def _assert_close_uint8(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


# ----- (a) the command equals the API ----------------------------------------------------
def test_super_resolution_command_equals_the_api(dense_runs, files, tmp_path):
    paths, arrays = files
    out = tmp_path / "sr"
    result = _command(dense_runs["low_res"], out, f"--cond_image={paths['low']}", "--seed=3")
    saved = np.load(out / "samples.npz")
    np.testing.assert_array_equal(saved["images"], result["images"])
    assert saved["images"].shape == (2, 32, 32, 3)
    want = _api_samples(dense_runs["low_res"], arrays["low"], None, 2, seed=3)
    _assert_close_uint8(saved["images"], want)
    assert np.any(saved["images"][0] != saved["images"][1])  # two draws, not one repeated
    # the condition shown first: the low-res image nearest-upscaled x4
    np.testing.assert_array_equal(saved["condition"][0], arrays["low"].repeat(4, 0).repeat(4, 1))
    settings = json.loads((out / "samples.json").read_text())
    assert settings["cond_image"] == paths["low"] and settings["mask"] is None
    assert settings["decode_tiles"] is None


def test_inpainting_command_equals_the_api(dense_runs, files, tmp_path):
    paths, arrays = files
    out = tmp_path / "inpaint"
    flags = [f"--cond_image={paths['image']}", f"--mask={paths['mask']}"]
    result = _command(dense_runs["inpaint"], out, *flags)
    saved = np.load(out / "samples.npz")
    np.testing.assert_array_equal(saved["images"], result["images"])
    want = _api_samples(dense_runs["inpaint"], arrays["image"], arrays["mask"] >= 128, 2)
    _assert_close_uint8(saved["images"], want)
    fill = arrays["mask"] >= 128
    np.testing.assert_array_equal(saved["images"][:, ~fill], np.broadcast_to(
        arrays["image"][~fill], saved["images"][:, ~fill].shape))  # fmt: skip
    assert np.any(saved["images"][:, fill] != arrays["image"][fill])
    shown = saved["condition"][0]  # the masked image: black where it is to be filled
    assert np.all(shown[fill] == 0) and np.array_equal(shown[~fill], arrays["image"][~fill])
    assert json.loads((out / "samples.json").read_text())["mask"] == paths["mask"]


# ----- (b) convolutional: other sizes than the trained one -------------------------------
def test_condition_images_larger_than_trained_give_the_implied_size(dense_runs, files, tmp_path):
    paths, arrays = files
    sr = _command(dense_runs["low_res"], tmp_path / "sr", f"--cond_image={paths['low_wide']}", n=1)
    assert sr["images"].shape == (1, 32, 64, 3)  # 8x16 x4
    flags = [f"--cond_image={paths['big']}", f"--mask={paths['big_mask']}"]
    inpainted = _command(dense_runs["inpaint"], tmp_path / "inp", *flags, n=1)["images"]
    assert inpainted.shape == (1, 48, 40, 3)
    keep = arrays["big_mask"] < 128
    np.testing.assert_array_equal(inpainted[0][keep], arrays["big"][keep])
    want = _api_samples(dense_runs["inpaint"], arrays["big"], ~keep, 1)
    _assert_close_uint8(inpainted, want)


# ----- (c) mask guidance for a run without a dense condition -----------------------------
def test_mask_guided_inpainting_of_a_class_run(diffusion_run, files, tmp_path):
    paths, arrays = files
    out = tmp_path / "guided"
    flags = ["--labels=3,7", f"--cond_image={paths['image']}", f"--mask={paths['mask']}"]
    result = _command(diffusion_run[0], out, *flags)
    images, fill = result["images"], arrays["mask"] >= 128
    assert images.shape == (4, 32, 32, 3) and result["labels"].tolist() == [3, 3, 7, 7]
    for sample in images:  # outside the mask: the input, exactly
        np.testing.assert_array_equal(sample[~fill], arrays["image"][~fill])
    assert np.any(images[:, fill] != arrays["image"][fill])
    want = _api_samples(diffusion_run[0], arrays["image"], fill, 2, labels=[3, 7])
    _assert_close_uint8(images, want)
    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.shape[1] == 128 // 32 * (3 * 34 + 2)  # the masked image, then 2 samples


# ----- tiled decoding --------------------------------------------------------------------
def _pointwise_decoder(f: int):
    m = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3)), jnp.float32)
    return lambda z: jnp.repeat(jnp.repeat(jnp.tanh(z @ m), f, 1), f, 2)


def test_tiles_cover_the_latent_and_blend_to_the_untiled_decode():
    """Tile placement and the normalised ramps, on a decoder whose pixels depend on one
    latent each: the blend of the tiles is the untiled decode (float rounding only), for
    uneven tile counts, non-square latents, ramps longer than some overlaps, under jit."""
    for size, tile, overlap in ((37, 8, 2), (20, 8, 3), (9, 8, 4), (64, 16, 0), (33, 16, 15)):
        starts = tiling.tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] == size - tile
        assert all(a + tile - b >= overlap for a, b in zip(starts, starts[1:]))
    decode = _pointwise_decoder(4)
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 37, 20, 3))
    for tile, overlap in ((8, 2), (8, 3), (16, 0), (20, 7)):
        np.testing.assert_allclose(_tiled(decode, z, tile, overlap), decode(z), atol=1e-6)
    np.testing.assert_array_equal(tiling.decode_tiled(decode, z, 40, 8), decode(z))  # one tile
    assert not tiling.needs_tiles((37, 20), 40) and tiling.needs_tiles((37, 20), 36)
    assert not tiling.needs_tiles((999, 999), 0)


def _conv_decoder(f: int, n_latent: int, seed: int = 0):
    """A purely local decoder: n_latent 3x3 convs at latent resolution, nearest x f, one
    3x3 conv; zero padding, as the first stage's. Receptive radius: n_latent * f + 1 px."""
    rng = np.random.default_rng(seed)
    ks = [jnp.asarray(rng.normal(0, 0.3, (3, 3, 3, 3)), jnp.float32) for _ in range(n_latent + 1)]

    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip

    def decode(z):
        for k in ks[:-1]:
            z = jnp.tanh(conv(z, k)) + z
        x = jnp.repeat(jnp.repeat(z, f, 1), f, 2)
        return jnp.tanh(conv(x, ks[-1]))

    return decode, n_latent * f + 1


def _seam_band(size: int, tile: int, overlap: int, f: int, radius: int) -> np.ndarray:
    """Output pixels within `radius` of an edge a tile shares with a neighbour."""
    band = np.zeros(size * f, bool)
    for s in tiling.tile_starts(size, tile, overlap):
        for edge, inner in ((s, s > 0), (s + tile, s + tile < size)):
            if inner:
                band[max(0, edge * f - radius) : edge * f + radius] = True
    return band


def test_tiled_decode_of_a_local_decoder_is_exact_away_from_seams():
    """Only pixels whose receptive field crosses a shared tile edge (where a tile sees its
    zero padding instead of the neighbour) may differ; elsewhere the decode is exact, and
    near the seams the ramps keep the error a fraction of the decoder's output range
    (measured: max 0.31 in the bands, bound 0.59)."""
    f, (h, w) = 4, (64, 40)
    decode, radius = _conv_decoder(f, 2)
    z = jax.random.normal(jax.random.PRNGKey(1), (1, h, w, 3))
    full = np.asarray(decode(z))
    tile, overlap = 24, 8
    tiled = np.asarray(_tiled(decode, z, tile, overlap))
    band = (
        _seam_band(h, tile, overlap, f, radius)[:, None]
        | _seam_band(w, tile, overlap, f, radius)[None, :]
    )
    diff = np.abs(tiled - full)[0].max(-1)
    assert band.mean() < 0.6 and diff[~band].max() < 1e-5
    # In a band, the tile whose padding shows weighs at most (radius + 0.5) / ramp of the
    # blend (the ramps' value there), and its error is at most 2 (outputs in [-1, 1]).
    ramp = overlap * f
    assert 0 < diff[band].max() < 2 * (radius + 0.5) / ramp


def test_tiled_first_stage_decode(tiny_autoencoder_run):
    """The session's first stage: one tile covering the latent is the untiled decode
    exactly; in tiles, the decode stays close. It cannot be exact anywhere: the decoder's
    GroupNorm statistics and mid-block attention are a tile's, not the image's (measured:
    decoding one 32x32 tile alone differs from the same pixels of the whole decode by a
    mean of ~0.03 on [-1, 1] at the tile's centre, far from any seam). The bound below is
    on stationary latents (iid N(0, 1)), where every tile's statistics estimate the
    image's, and the decode at 32-latent tiles overlapping by 8, as the defaults' ratio."""
    import ml_collections

    from ldm_jax.training.first_stage import FirstStage

    fs = FirstStage(ml_collections.ConfigDict(dict(workdir=str(tiny_autoencoder_run[0]), step=-1)))
    params = fs.load_params()
    decode = jax.jit(lambda z: fs.decode(params, z))
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, fs.latent_channels))
    full = np.asarray(decode(z))
    one = np.asarray(_tiled(decode, z, 64, 16))
    np.testing.assert_array_equal(one, full)
    tiled = np.asarray(_tiled(decode, z, 32, 8))
    diff = np.abs(tiled - full)
    relative = np.sqrt(np.mean((tiled - full) ** 2) / np.var(full))
    print(f"tiled decode: mean {diff.mean():.4f} max {diff.max():.4f} relative rms {relative:.3f}")
    assert diff.mean() < 0.05 and relative < 0.3


def test_the_command_decodes_large_latents_in_tiles(dense_runs, files, tmp_path):
    """An inpainting run decoding 6x6-latent tiles of its 8x8 latents (the flag forcing tiles on the toy
    sizes): the samples differ from the untiled ones only a little, the composite still
    keeps every pixel outside the mask, and samples.json records the tiles."""
    paths, arrays = files
    flags = [f"--cond_image={paths['image']}", f"--mask={paths['mask']}"]
    untiled = _command(dense_runs["inpaint"], tmp_path / "a", *flags)["images"]
    out = tmp_path / "b"
    tiled = _command(dense_runs["inpaint"], out, *flags, "--decode_tile=6", "--decode_overlap=2")
    tiled = tiled["images"]
    keep = arrays["mask"] < 128
    np.testing.assert_array_equal(tiled[:, keep], untiled[:, keep])
    inside = np.abs(tiled[:, ~keep].astype(int) - untiled[:, ~keep])
    assert inside.max() > 0 and inside.mean() < 40
    assert json.loads((out / "samples.json").read_text())["decode_tiles"] == [6, 2]


# ----- (d) bad inputs --------------------------------------------------------------------
def test_bad_condition_inputs_fail_in_one_line_and_write_nothing(dense_runs, files, tmp_path,
                                                                 capsys):  # fmt: skip
    from ldm_jax import sample

    paths, _ = files
    sr, inp = dense_runs["low_res"], dense_runs["inpaint"]
    out = tmp_path / "out"

    def argv(run, *flags):
        return [f"--workdir={run}", f"--steps={STEPS}", f"--out={out}", *flags]

    cases = [
        ("mask on an SR run", argv(sr, f"--cond_image={paths['low']}", f"--mask={paths['low_mask']}"),
         "super-resolves"),
        ("no mask for an inpaint run", argv(inp, f"--cond_image={paths['image']}"), "--mask"),
        ("no condition image for an SR run", argv(sr), "--cond_image"),
        ("no condition image for an inpaint run", argv(inp), "--mask"),
        ("mask of another size", argv(inp, f"--cond_image={paths['image']}",
                                      f"--mask={paths['big_mask']}"), "40x48"),
        ("output not a multiple", argv(inp, f"--cond_image={paths['odd']}",
                                       f"--mask={paths['odd_mask']}"), "multiples of 8"),
        ("SR output not a multiple", argv(sr, f"--cond_image={paths['odd_low']}"), "28x28"),
        ("init image with a condition image", argv(
            inp, f"--cond_image={paths['image']}", f"--mask={paths['mask']}",
            f"--init_image={paths['image']}"), "--init_image"),
        ("latent size with a condition image", argv(sr, f"--cond_image={paths['low']}",
                                                    "--latent_size=16"), "--latent_size"),
        ("condition image missing", argv(sr, f"--cond_image={tmp_path / 'no.png'}"), "no.png"),
        ("mask missing", argv(inp, f"--cond_image={paths['image']}",
                              f"--mask={tmp_path / 'm.png'}"), "m.png"),
        ("mask without a condition image", argv(inp, f"--mask={paths['mask']}"), "--cond_image"),
        ("negative decode tile", argv(sr, f"--cond_image={paths['low']}", "--decode_tile=-1"),
         "--decode_tile"),
        ("overlap not under the tile", argv(sr, f"--cond_image={paths['low']}",
                                            "--decode_tile=8", "--decode_overlap=8"),
         "--decode_overlap"),
    ]  # fmt: skip
    assert_all_refused(sample.main, cases, capsys, out, dense_runs)
