"""CPU experiment on the embedded photo_crops: unconditional generation: the mask-guided inpainting baseline,
in the photo autoencoder's KL-f4 latents (configs/autoencoder/photo_f4.py; see
config_common.photo_ldm_config).

    python -m ldm_jax.train --config configs/diffusion/photo_uncond.py --workdir runs/photo_uncond \
        --config.first_stage.workdir=runs/photo_f4
    python -m ldm_jax.evaluate --workdir runs/photo_uncond --config.data.condition.kind=inpaint \
        --metric lpips --metric fid --metric l1_masked --metric lpips_masked
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False, steps=2000)
    return common.photo_ldm_config("none", args.steps, args.runlocal)
