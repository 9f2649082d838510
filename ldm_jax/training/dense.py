"""Dense conditions: what a diffusion run concatenates with z_t at the UNet's input.

A run names its condition in `config.data.condition` (the data pipeline draws it per
example, ldm_jax.data.conditions) and uses conditioning_key 'concat' (or 'hybrid', beside
cross-attention). Each kind is one class here: the batch keys it reads, the channels it
adds to the UNet's input, its features at the latent size, and how a user's image (and
mask) become its inputs for the sample command. A new kind is one new class.

    kind      batch keys                      features at latent size h x w        channels
    low_res   low_res [B, S/f, S/f, 3]        the low-res image (resized if S/f != h)   3
    inpaint   masked_image [B, S, S, 3],      E(masked image) x scale_factor, then      c + 1
              inpaint_mask [B, S, S, 1]       the mask at latent size, in {-1, 1}

The inpaint layout is the reference inpainting model's: [z_t, E(masked image), mask], with
the masked region of the image at -1 (black) and the mask taken by nearest-neighbour
down-sampling; E is the first stage's deterministic encoding (the VQ pre-quantisation
output, or the KL posterior's mean).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data import conditions as data_conditions
from ldm_jax.data import transforms
from ldm_jax.errors import UserError

CONCAT_KEYS = ("concat", "hybrid")


class DenseCondition:
    """No dense condition: nothing is concatenated."""

    kind = "none"
    keys: tuple[str, ...] = ()

    def __init__(self, settings, first_stage):
        self.settings, self.first_stage = settings, first_stage

    @property
    def channels(self) -> int:
        return 0

    def host_inputs(self, batch: dict) -> dict:
        """The condition's arrays of a host or device batch."""
        return {k: batch[k] for k in self.keys}

    def features(self, frozen, inputs: dict, latent_hw, scale_factor):
        """[B, h, w, channels] to concatenate with z_t (None: nothing)."""
        return None

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The size of the image sampled from a user's condition image of this size."""
        return height, width

    def user_inputs(self, image: np.ndarray, mask: np.ndarray | None) -> dict:
        """The condition arrays (batch of 1, as the data pipeline makes them) of a user's
        uint8 [H, W, 3] image and bool [H, W] mask (True: to fill). Without a dense
        condition, a mask asks for inpainting by mask guidance."""
        if mask is None:
            raise UserError(
                "this run has no dense condition: --cond_image alone has nothing to condition "
                "on (give --mask too for mask-guided inpainting, or --init_image for img2img)."
            )
        return inpaint_inputs(image, mask)


def inpaint_inputs(image: np.ndarray, mask: np.ndarray) -> dict:
    """`image`, `inpaint_mask` and `masked_image` (batch of 1) as the pipeline makes them."""
    batch = {"image": transforms.to_float(image[None])}
    data_conditions.collate([{"inpaint_mask": mask[..., None].astype(np.uint8)}], batch)
    return batch


class LowRes(DenseCondition):
    kind = "low_res"
    keys = ("low_res",)

    @property
    def channels(self) -> int:
        return 3

    def features(self, frozen, inputs, latent_hw, scale_factor):
        low = inputs["low_res"]
        h, w = latent_hw
        if low.shape[1:3] == (h, w):
            return low
        return jax.image.resize(low, (low.shape[0], h, w, 3), "bicubic", antialias=True)

    def output_size(self, height, width):
        f = int(self.settings.factor)
        return height * f, width * f

    def user_inputs(self, image, mask):
        if mask is not None:
            raise UserError("--mask is for inpainting; this run super-resolves its --cond_image.")
        return {"low_res": transforms.to_float(image[None])}


class Inpaint(DenseCondition):
    kind = "inpaint"
    keys = ("masked_image", "inpaint_mask")

    @property
    def channels(self) -> int:
        return self.first_stage.latent_channels + 1

    def features(self, frozen, inputs, latent_hw, scale_factor):
        codes = self.first_stage.codes(frozen["first_stage"], inputs["masked_image"])
        encoded = codes[..., : self.first_stage.latent_channels] * scale_factor  # KL: mean
        mask = inputs["inpaint_mask"]
        h, w = latent_hw
        sh, sw = mask.shape[1] // h, mask.shape[2] // w
        small = mask[:, ::sh, ::sw][:, :h, :w]  # nearest: source pixel f * i
        return jnp.concatenate([encoded, 2.0 * small - 1.0], axis=-1)

    def user_inputs(self, image, mask):
        if mask is None:
            raise UserError("this run inpaints: give --mask MASK.png (white: the region to fill).")
        return inpaint_inputs(image, mask)


KINDS = {cls.kind: cls for cls in (DenseCondition, LowRes, Inpaint)}


def make(config, first_stage) -> DenseCondition:
    """The run's dense condition; refuses a concat key without one and the reverse."""
    settings = data_conditions.settings(config.data.get("condition"))
    concat = config.conditioning_key in CONCAT_KEYS
    if concat and settings.kind == "none":
        raise UserError(
            f"conditioning_key={config.conditioning_key!r} concatenates a dense condition, "
            "but config.data.condition.kind is 'none'; set it to one of "
            f"{[k for k in KINDS if k != 'none']}."
        )
    if not concat and settings.kind != "none":
        raise UserError(
            f"config.data.condition.kind={settings.kind!r} needs conditioning_key 'concat' "
            f"(or 'hybrid' with cross-attention), not {config.conditioning_key!r}."
        )
    return KINDS[settings.kind](settings, first_stage)
