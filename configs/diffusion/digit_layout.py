"""CPU experiment on the embedded digit_scenes: layout-to-image, each digit's ink box and
label as tokens (ldm_jax.data.layouts) through a small transformer, by cross-attention,
and the same boxes drawn at latent size, one channel per class, concatenated (dense kind
'boxes'), in the latents of the digit-scenes KL-f4 autoencoder (see
config_common.digit_scene_config). The paper's form, tokens alone:
--config.conditioning_key=crossattn --config.data.condition.kind=none.

    python -m ldm_jax.train --config configs/autoencoder/digit_scenes.py \
        --workdir runs/digit_scenes/autoencoder
    python -m ldm_jax.train --config configs/diffusion/digit_layout.py \
        --workdir runs/digit_scenes/layout
    python -m ldm_jax.evaluate --workdir runs/digit_scenes/layout \
        --metric box_accuracy --metric box_iou
    python -m ldm_jax.sample --workdir runs/digit_scenes/layout \
        --layout "3:0.1,0.1,0.4,0.5;7:0.55,0.4,0.9,0.9"
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False, steps=2000)  # 15 min on 2 cores
    return common.digit_scene_config("layout", args.steps, args.runlocal)
