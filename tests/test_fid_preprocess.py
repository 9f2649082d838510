"""FID preprocessing: the resize modes against their definitions and PyTorch, and the
value mapping."""

import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.evaluation import fid


def _tf1_reference(img, size):
    """TF1 resize_bilinear(align_corners=False), written out per output pixel."""
    h, w = img.shape[:2]
    out = np.zeros((size, size, img.shape[2]))
    for i in range(size):
        y = i * h / size
        y0, fy = int(np.floor(y)), y - np.floor(y)
        y1 = min(y0 + 1, h - 1)
        for j in range(size):
            x = j * w / size
            x0, fx = int(np.floor(x)), x - np.floor(x)
            x1 = min(x0 + 1, w - 1)
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def test_tf1_bilinear_matches_its_definition_up_and_down():
    rng = np.random.default_rng(0)
    for h, size in ((7, 19), (32, 13)):
        img = rng.uniform(0, 255, (h, h, 3)).astype(np.float32)
        got = np.asarray(fid.resize_bilinear(img[None], size))[0]
        np.testing.assert_allclose(got, _tf1_reference(img, size), rtol=1e-5, atol=1e-3)


def test_torch_bilinear_matches_pytorch_interpolate():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    got = np.asarray(fid.resize_bilinear(x, 299, "torch_bilinear"))
    t = torch.nn.functional.interpolate(
        torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(299, 299), mode="bilinear",
        align_corners=False,
    )  # fmt: skip
    np.testing.assert_allclose(got, t.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-3)


def test_value_mapping_and_identity_at_299():
    u8 = np.random.default_rng(2).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
    x = np.asarray(fid.to_inception_input(u8))
    np.testing.assert_allclose(x, (u8.astype(np.float32) - 128) / 128, rtol=0, atol=1e-7)
    as_float = u8.astype(np.float32) / 127.5 - 1.0  # the project's [-1, 1] images
    np.testing.assert_allclose(np.asarray(fid.to_inception_input(as_float)), x, atol=1e-5)
    grey = np.asarray(fid.to_inception_input(u8[..., :1]))
    assert grey.shape == (1, 299, 299, 3) and np.all(grey[..., 0] == grey[..., 2])
    with pytest.raises(ValueError, match="unknown resize mode"):
        fid.resize_bilinear(jnp.zeros((1, 8, 8, 3)), 299, "lanczos")
