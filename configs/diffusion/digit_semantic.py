"""CPU experiment on the embedded digit_scenes: semantic synthesis, a class map (background +
10 digits) -> the scene, through the trainable SpatialRescaler concatenated with the
latents of the digit-scenes KL-f4 autoencoder (see config_common.digit_scene_config).

    python -m ldm_jax.train --config configs/autoencoder/digit_scenes.py \
        --workdir runs/digit_scenes/autoencoder
    python -m ldm_jax.train --config configs/diffusion/digit_semantic.py \
        --workdir runs/digit_scenes/semantic
    python -m ldm_jax.evaluate --workdir runs/digit_scenes/semantic \
        --metric region_accuracy --metric foreground_iou
    python -m ldm_jax.sample --workdir runs/digit_scenes/semantic --cond_image map.png
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False, steps=1500)
    return common.digit_scene_config("semantic", args.steps, args.runlocal)
