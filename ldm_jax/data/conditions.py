"""Dense conditions derived from each example on the host: `config.data.condition`.

    kind      what each example gains (beside its `image`)
    none      nothing
    low_res   `low_res`: float32 [S/f, S/f, 3] in [-1, 1], the image degraded by
              `degradation` ('bicubic' or 'bsr_light', ldm_jax.data.degradations), f = `factor`
    inpaint   `inpaint_mask`: float32 [S, S, 1], 1 where the image is to be filled (a
              large mask, ldm_jax.data.masks, its share in `coverage`), and
              `masked_image`: float32 [S, S, 3] in [-1, 1], the image with that region
              black, -1 (`mask` stays the evaluation batches' padding mask)
    semantic  `segmentation`: [S, S] class ids in [0, num_classes) (int32 in batches), the
              example's class map (feature `map_key`) cropped with the image
              (ldm_jax.data.annotations)
    coords    nothing: the UNet's position channels come from the latent size
              (training/dense.py)
    boxes     nothing: a layout run's boxes are drawn from its tokens (training/dense.py)

Seeding follows the crops' contract (pipeline.py): the condition of the training example
at global position g is drawn from `default_rng([seed, 2, g])`, so resumption and
multi-process slicing reproduce it exactly; the eval split's are drawn from
`default_rng([condition.eval_seed, 2, i])` for example i, the same in every evaluation.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from ldm_jax.data import degradations, masks, transforms
from ldm_jax.errors import UserError

KINDS = ("none", "low_res", "inpaint", "semantic", "coords", "boxes")
CONDITION_TAG = 2  # beside pipeline's permutation (0) and example (1) tags


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            kind="none",
            factor=4,  # low_res: the image's size over the condition's
            degradation="bsr_light",  # low_res: or "bicubic"
            coverage=(0.1, 0.5),  # inpaint: the masked share's range
            eval_seed=0,  # the eval split's conditions
            num_classes=0,  # semantic: class ids in the map are below it
            map_key="segmentation",  # semantic: the dataset's class-map feature
            # semantic: the trainable SpatialRescaler from the one-hot map to the latents
            rescaler=dict(n_stages=2, out_channels=3, multiplier=0.5),
            frequencies=(),  # coords: Fourier features of the position at these
        )
    )


def settings(cond_cfg) -> ml_collections.ConfigDict:
    """The condition settings with defaults for keys a stored config may lack."""
    out = default_config()
    if cond_cfg:
        out.update(dict(cond_cfg))
    return out


def check(cond_cfg, image_size: int) -> None:
    c = settings(cond_cfg)
    if c.kind not in KINDS:
        raise UserError(f"data.condition.kind={c.kind!r}; valid: {list(KINDS)}")
    if c.kind == "low_res":
        if c.degradation not in degradations.DEGRADATIONS:
            raise UserError(
                f"data.condition.degradation={c.degradation!r}; valid: "
                f"{sorted(degradations.DEGRADATIONS)}"
            )
        if c.factor < 1 or image_size % c.factor:
            raise UserError(
                f"data.condition.factor={c.factor} must divide data.image_size={image_size}."
            )
    if c.kind == "semantic" and int(c.num_classes) < 2:
        raise UserError(
            f"data.condition.num_classes={c.num_classes}: a semantic run needs the number of "
            "classes in its maps (background included), e.g. 11 for digit_scenes."
        )
    if c.kind == "inpaint" and not 0.0 < c.coverage[0] <= c.coverage[1] < 1.0:
        raise UserError(
            f"data.condition.coverage={tuple(c.coverage)}: give (low, high) with "
            "0 < low <= high < 1."
        )


def rng_for_train(seed: int, position: int) -> np.random.Generator:
    return np.random.default_rng([seed, CONDITION_TAG, position])


# The per-example functions below take the settings as `settings` gives them (the
# pipeline normalises them once, not for every example).
def rng_for_eval(c, index: int) -> np.random.Generator:
    return np.random.default_rng([int(c.eval_seed), CONDITION_TAG, index])


def make(c, image: np.ndarray, rng) -> dict:
    """One example's condition from its uint8 [S, S, 3] image (host arrays, uint8)."""
    if c.kind == "low_res":
        low = degradations.DEGRADATIONS[c.degradation](image, int(c.factor), rng)
        return {"low_res": np.ascontiguousarray(low)}
    if c.kind == "inpaint":
        mask = masks.large_mask(image.shape[0], rng, tuple(c.coverage))
        return {"inpaint_mask": mask[..., None].astype(np.uint8)}
    return {}


def blank(c, image_size: int) -> dict:
    """A padding example's condition (masked out in evaluation)."""
    if c.kind == "low_res":
        side = image_size // int(c.factor)
        return {"low_res": np.zeros((side, side, 3), np.uint8)}
    if c.kind == "inpaint":
        return {"inpaint_mask": np.zeros((image_size, image_size, 1), np.uint8)}
    if c.kind == "semantic":
        return {"segmentation": np.zeros((image_size, image_size), np.uint8)}
    return {}


def collate(examples, batch: dict) -> None:
    """Adds the float condition arrays of `examples` to a collated `batch` (in place)."""
    first = examples[0]
    if "low_res" in first:
        batch["low_res"] = transforms.to_float(np.stack([e["low_res"] for e in examples]))
    if "inpaint_mask" in first:
        mask = np.stack([e["inpaint_mask"] for e in examples]).astype(np.float32)
        batch["inpaint_mask"] = mask
        batch["masked_image"] = masks.masked_image(batch["image"], mask[..., 0] > 0)
    if "segmentation" in first:
        batch["segmentation"] = np.stack([e["segmentation"] for e in examples]).astype(np.int32)
