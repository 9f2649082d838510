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
    semantic  segmentation [B, S, S] ids      SpatialRescaler(one-hot map): n_stages     out
                                              bilinear halvings, 1x1 conv (trainable)
    coords    (none)                          x and y of each latent pixel, -1..1, and   2 + 4n
                                              their Fourier features at n frequencies
    boxes     (the layout's `tokens`, the     each class's boxes drawn at latent size:   classes
              conditioner's inputs)           the share of each latent pixel covered

The inpaint layout is the reference inpainting model's: [z_t, E(masked image), mask], with
the masked region of the image at -1 (black) and the mask taken by nearest-neighbour
down-sampling; E is the first stage's deterministic encoding (the VQ pre-quantisation
output, or the KL posterior's mean). The semantic layout is the reference's semantic
synthesis models' (182 classes -> 3 channels, in_channels 6); its weights train with the
UNet, in the state's params["dense"] (`init` gives them; kinds without weights give None).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data import condition_pictures, layouts, transforms
from ldm_jax.data import conditions as data_conditions
from ldm_jax.errors import UserError
from ldm_jax.models import conditioning

CONCAT_KEYS = ("concat", "hybrid")


class DenseCondition:
    """No dense condition: nothing is concatenated."""

    kind = "none"
    keys: tuple[str, ...] = ()

    def __init__(self, settings, first_stage, cond_cfg=None):
        self.settings, self.first_stage = settings, first_stage

    @property
    def channels(self) -> int:
        return 0

    def from_cond_inputs(self, cond_inputs: dict, latent_hw):
        """Features made from the conditioner's inputs rather than the batch's (None:
        none). They follow the conditioner's classifier-free dropout and guidance: the
        null condition gives the null features."""
        return None

    def init(self, rng):
        """The condition's trainable weights (None: it has none)."""
        return None

    def check_sizes(self, image_size: int, latent_size: int) -> None:
        """Refuses an image size the condition cannot bring to the latent size."""

    def host_inputs(self, batch: dict) -> dict:
        """The condition's arrays of a host or device batch."""
        return {k: batch[k] for k in self.keys}

    def features(self, params, frozen, inputs: dict, latent_hw, scale_factor):
        """[B, h, w, channels] to concatenate with z_t (None: nothing); `params` are
        `init`'s weights as trained."""
        return None

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The size of the image sampled from a user's condition image of this size."""
        return height, width

    def sample_shape(self, condition: dict) -> tuple[int, int, int]:
        """(batch, height, width) of the images sampled from a condition's arrays."""
        return condition["image"].shape[:3]

    def pictures(self, condition: dict) -> np.ndarray:
        """The condition as pictures at the output size, host floats in [-1, 1]."""
        return np.asarray(condition["masked_image"])

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

    def features(self, params, frozen, inputs, latent_hw, scale_factor):
        low = inputs["low_res"]
        h, w = latent_hw
        if low.shape[1:3] == (h, w):
            return low
        return jax.image.resize(low, (low.shape[0], h, w, 3), "bicubic", antialias=True)

    def output_size(self, height, width):
        f = int(self.settings.factor)
        return height * f, width * f

    def sample_shape(self, condition):
        low = condition["low_res"]
        return (low.shape[0], *self.output_size(*low.shape[1:3]))

    def pictures(self, condition):
        f = int(self.settings.factor)  # the low-res image, nearest-upscaled
        return np.repeat(np.repeat(np.asarray(condition["low_res"]), f, 1), f, 2)

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

    def features(self, params, frozen, inputs, latent_hw, scale_factor):
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


class Semantic(DenseCondition):
    kind = "semantic"
    keys = ("segmentation",)

    def __init__(self, settings, first_stage, cond_cfg=None):
        super().__init__(settings, first_stage)
        r = {"n_stages": 2, "out_channels": 3, "multiplier": 0.5, **dict(settings.rescaler)}
        self.num_classes = int(settings.num_classes)
        self.module = conditioning.SpatialRescaler(
            self.num_classes, int(r["out_channels"]), int(r["n_stages"]), float(r["multiplier"])
        )

    @property
    def channels(self) -> int:
        return self.module.out_channels

    def init(self, rng):
        ids = jnp.zeros((1, 4, 4), jnp.int32)
        return self.module.init(rng, ids)["params"]

    def sample_shape(self, condition):
        return condition["segmentation"].shape[:3]

    def pictures(self, condition):
        coloured = condition_pictures.class_map(condition["segmentation"], self.num_classes)
        return transforms.to_float(coloured)

    def rescaled_size(self, size: int) -> int:
        for _ in range(self.module.n_stages):
            size = int(size * self.module.multiplier)
        return size

    def check_sizes(self, image_size, latent_size):
        if self.rescaled_size(image_size) != latent_size:
            raise UserError(
                f"data.condition.rescaler brings a {image_size}-pixel map to "
                f"{self.rescaled_size(image_size)}, not the latent size {latent_size}; set "
                "rescaler.n_stages so that image_size * multiplier ** n_stages is it."
            )

    def features(self, params, frozen, inputs, latent_hw, scale_factor):
        out = self.module.apply({"params": params}, inputs["segmentation"])
        if out.shape[1:3] != tuple(latent_hw):
            raise UserError(
                f"a {inputs['segmentation'].shape[1]}x{inputs['segmentation'].shape[2]} class "
                f"map rescales to {out.shape[1]}x{out.shape[2]}, not the latent "
                f"{latent_hw[0]}x{latent_hw[1]}; give a map whose sides are multiples of "
                f"{self.first_stage.factor}."
            )
        return out

    def user_inputs(self, image, mask):
        """`image`: the class map, int [H, W] (sample.read_class_map reads a PNG of ids)."""
        if mask is not None:
            raise UserError("--mask is for inpainting; this run synthesises from a class map.")
        ids = np.asarray(image)
        if ids.ndim != 2:
            raise UserError("a semantic run's --cond_image is a class map: one id per pixel.")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_classes):
            bad = ids.min() if ids.min() < 0 else ids.max()  # the id out of range
            raise UserError(
                f"the class map has id {int(bad)}, but this run knows ids "
                f"0..{self.num_classes - 1}; give a PNG of class ids in that range."
            )
        return {"segmentation": ids[None].astype(np.int32)}


class Coordinates(DenseCondition):
    """Where each latent pixel is (CoordConv): x and y from -1 to 1 across the latent.
    Not a paper condition: it gives a layout run's UNet the absolute position that its
    convolutions lack and that a cross-attended layout has to be matched against. Made
    from the latent size alone ([1, h, w, 2], broadcast over the batch), so sampling at
    another size spans the same -1..1."""

    kind = "coords"

    @property
    def frequencies(self) -> tuple[float, ...]:
        return tuple(
            float(f) for f in (self.settings.get("frequencies", ()) if self.settings else ())
        )

    @property
    def channels(self) -> int:
        return 2 + 4 * len(self.frequencies)

    def features(self, params, frozen, inputs, latent_hw, scale_factor):
        """[1, h, w, channels]: x, y, then sin and cos of pi * f * x and of pi * f * y for
        each of `condition.frequencies` (Fourier features a layout's corners can be
        matched against by attention)."""
        h, w = latent_hw
        y, x = jnp.meshgrid(jnp.linspace(-1.0, 1.0, h), jnp.linspace(-1.0, 1.0, w), indexing="ij")
        parts = [x, y]
        for f in self.frequencies:
            for v in (x, y):
                parts += [jnp.sin(jnp.pi * f * v), jnp.cos(jnp.pi * f * v)]
        return jnp.stack(parts, axis=-1)[None]


class Boxes(DenseCondition):
    """A layout run's boxes drawn at latent size, one channel per class: the share of each
    latent pixel covered by the class's box that covers most of it, 0..1. Not a
    paper condition: beside the tokens' cross-attention (conditioning_key 'hybrid'), it
    puts each box where the UNet's convolutions see it, as a class map does for semantic
    synthesis. Drawn from the layout tokens themselves, so the empty layout of
    classifier-free guidance draws nothing."""

    kind = "boxes"

    def __init__(self, settings, first_stage, cond_cfg=None):
        super().__init__(settings, first_stage)
        if cond_cfg is None or cond_cfg.get("kind") != "layout":
            raise UserError(
                "data.condition.kind='boxes' draws a layout's boxes: it needs "
                "config.cond.kind='layout' (and conditioning_key 'hybrid')."
            )
        self.n_classes = int(cond_cfg.n_classes)
        self.tokens = layouts.TokenLayout(int(cond_cfg.vocab_size), int(cond_cfg.max_objects))

    @property
    def channels(self) -> int:
        return self.n_classes

    def from_cond_inputs(self, cond_inputs, latent_hw):
        return draw_boxes(cond_inputs["tokens"], self.tokens, self.n_classes, latent_hw)


def _cover(lo, hi, n: int):
    """[..., n]: the share of each of n equal cells of [0, 1] inside [lo, hi]."""
    edges = jnp.arange(n + 1, dtype=jnp.float32) / n
    inside = jnp.minimum(hi[..., None], edges[1:]) - jnp.maximum(lo[..., None], edges[:-1])
    return jnp.clip(inside * n, 0.0, 1.0)


def draw_boxes(tokens, scheme: layouts.TokenLayout, n_classes: int, hw):
    """float32 [B, h, w, n_classes]: the boxes that layout `tokens` [B, 3 * max_objects]
    name: in each class's channel, the share of each pixel covered by that class's box
    that covers most of it."""
    g, (h, w) = scheme.grid, hw
    objects = jnp.asarray(tokens).reshape(tokens.shape[0], -1, layouts.TOKENS_PER_OBJECT)
    label, first, last = objects[..., 0], objects[..., 1], objects[..., 2]
    x0, y0 = (first % g) / (g - 1), (first // g) / (g - 1)
    x1, y1 = (last % g) / (g - 1), (last // g) / (g - 1)
    box = _cover(y0, y1, h)[..., :, None] * _cover(x0, x1, w)[..., None, :]  # [B, M, h, w]
    real = (label != scheme.pad) & (label < n_classes)
    which = jax.nn.one_hot(label, n_classes) * real[..., None]  # [B, M, C]
    return jnp.max(box[..., None] * which[:, :, None, None, :], axis=1)


KINDS = {cls.kind: cls for cls in (DenseCondition, LowRes, Inpaint, Semantic, Coordinates, Boxes)}


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
    return KINDS[settings.kind](settings, first_stage, config.get("cond"))
