"""CPU experiment on the embedded photo_crops: 4x super-resolution (16² -> 64², bicubic degradation),
in the photo autoencoder's KL-f4 latents (configs/autoencoder/photo_f4.py; see
config_common.photo_ldm_config).

    python -m ldm_jax.train --config configs/diffusion/photo_sr.py --workdir runs/photo_sr \
        --config.first_stage.workdir=runs/photo_f4
    python -m ldm_jax.evaluate --workdir runs/photo_sr --metric psnr --metric ssim \
        --metric lpips --metric fid
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False, steps=2000)
    return common.photo_ldm_config("low_res", args.steps, args.runlocal)
