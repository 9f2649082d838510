"""CPU experiment on the embedded photo_crops: inpainting with large masks (10-50% of the image),
in the photo autoencoder's KL-f4 latents (configs/autoencoder/photo_f4.py; see
config_common.photo_ldm_config).

    python -m ldm_jax.train --config configs/diffusion/photo_inpaint.py --workdir runs/photo_inpaint \
        --config.first_stage.workdir=runs/photo_f4
    python -m ldm_jax.evaluate --workdir runs/photo_inpaint --metric lpips --metric fid \
        --metric l1_masked --metric lpips_masked
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False, steps=2000)
    return common.photo_ldm_config("inpaint", args.steps, args.runlocal)
