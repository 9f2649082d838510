"""Semantic synthesis LDM-4 (VQ-f4 latents); reference models/ldm/semantic_synthesis256.

The one-hot class map goes through the trainable SpatialRescaler (2 bilinear halvings,
1x1 conv to 3 channels, no bias) and is concatenated with the 64x64x3 latents (UNet
in_channels 6). The reference trains on its landscapes maps (182 classes); its data class
is not published, so this config reads a TFDS segmentation dataset: ADE20K as
`scene_parse150` (`annotation`, ids 0..150; 0 = other), keeping the reference's 182 map
channels (every ADE20K id fits, and the rescaler's weights have the reference's shape).
For cityscapes set data.name, data.condition.map_key='segmentation_label' and its ids.

    python -m ldm_jax.train --config configs/diffusion/semantic_synthesis256.py \
        --workdir runs/semantic256 --config.first_stage.workdir=runs/vq_f4 \
        --config.data.data_dir=/path/to/tfds
    python -m ldm_jax.sample --workdir runs/semantic256 --cond_image map_512.png  # -> 512²

CPU smoke run, after `python -m ldm_jax.train --config configs/autoencoder/vq_f4.py:runlocal
--workdir runs/vq_f4_local`:

    python -m ldm_jax.train --config configs/diffusion/semantic_synthesis256.py:runlocal \
        --workdir runs/semantic256_local
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False)
    return common.semantic_synthesis_config(256, args.runlocal)
