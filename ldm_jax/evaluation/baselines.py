"""Classical baselines of the restoration evaluations, run on the host on the same inputs
as the model: one class per condition kind, looked up by `for_kind`.

    kind      baseline     how
    low_res   bicubic      PIL `Image.resize(..., Resampling.BICUBIC)` of the uint8 low-res
                           image (the pipeline's, exactly: its floats are k / 127.5 - 1) to
                           the original's size, back to [-1, 1]
    inpaint   biharmonic   `skimage.restoration.inpaint_biharmonic(masked image, mask,
                           channel_axis=-1)` on [-1, 1] floats, clipped to [-1, 1] and
                           composited with the original outside the mask (as the model's)
    semantic, real         the held-out image itself: what real data scores
    layout

Each takes a host batch of the evaluation pipeline (`image`, its condition's arrays and
`mask`, the padding rows) and gives float32 images [b, S, S, 3] in [-1, 1]; padding rows
are returned as their (blank) originals, unrestored.
"""

from __future__ import annotations

import numpy as np

from ldm_jax.data import images as images_lib


class Baseline:
    name = ""
    method = ""  # what the report says it is

    def restore(self, batch: dict, row: int) -> np.ndarray:
        """One real row's restoration, float [S, S, 3] in [-1, 1]."""
        raise NotImplementedError

    def __call__(self, batch: dict) -> np.ndarray:
        out = np.array(batch["image"], np.float32, copy=True)
        for i in np.flatnonzero(np.asarray(batch["mask"], bool)):
            out[i] = self.restore(batch, int(i))
        return out


class Bicubic(Baseline):
    name = "bicubic"
    method = "PIL Image.resize BICUBIC of the uint8 low-res image to the original size"

    def restore(self, batch, row):
        from PIL import Image

        size = batch["image"].shape[1:3]
        low = Image.fromarray(images_lib.to_uint8(batch["low_res"][row]))
        up = low.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        return np.asarray(up, np.float32) / 127.5 - 1.0


class Biharmonic(Baseline):
    name = "biharmonic"
    method = (
        "skimage.restoration.inpaint_biharmonic(masked image, mask, channel_axis=-1), "
        "composited with the original outside the mask"
    )

    def restore(self, batch, row):
        from skimage.restoration import inpaint_biharmonic

        mask = np.asarray(batch["inpaint_mask"][row], np.float32)  # [S, S, 1]
        filled = inpaint_biharmonic(
            np.asarray(batch["masked_image"][row], np.float64), mask[..., 0] > 0, channel_axis=-1
        )
        filled = np.clip(filled, -1.0, 1.0).astype(np.float32)
        return mask * filled + (1.0 - mask) * np.asarray(batch["image"][row], np.float32)


class Real(Baseline):
    """Semantic and layout runs: the held-out image itself, real data's own figure."""

    name = "real"
    method = "the held-out image itself (real data's own figure)"

    def restore(self, batch, row):
        return np.asarray(batch["image"][row], np.float32)


BASELINES = {"low_res": Bicubic, "inpaint": Biharmonic, "semantic": Real, "layout": Real}


def for_kind(kind: str) -> Baseline:
    return BASELINES[kind]()
