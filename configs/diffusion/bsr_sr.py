"""4x super-resolution LDM-4 (VQ-f4 latents, BSR degradation); reference models/ldm/bsr_sr.

The low-res image (256/4 = 64²) is concatenated with the 64x64x3 latents (UNet in_channels
6); the degradation is `bsrgan_light` (blur, down-scaling, noise, JPEG; ldm_jax.data.
degradations). The reference crops a random square of 0.5-1.0 of the smaller side and
resizes it to 256; here the smaller side is resized to 256 and a random 256² crop taken.

    python -m ldm_jax.train --config configs/diffusion/bsr_sr.py --workdir runs/bsr_sr \
        --config.first_stage.workdir=runs/vq_f4 --config.data.data_dir=/path/to/tfds
    python -m ldm_jax.sample --workdir runs/bsr_sr --cond_image photo_256.png   # -> 1024²

CPU smoke run, after `python -m ldm_jax.train --config configs/autoencoder/vq_f4.py:runlocal
--workdir runs/vq_f4_local`:

    python -m ldm_jax.train --config configs/diffusion/bsr_sr.py:runlocal --workdir runs/bsr_sr_local
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False)
    c = common.paper_ldm_config(
        "bsr_sr",
        first_stage="vq_f4",
        base_learning_rate=1.0e-6,
        batch_size=64,
        dataset="open_images_v4",
        linear_end=0.0155,
    )
    c.conditioning_key = "concat"
    c.data.condition.update(kind="low_res", factor=4, degradation="bsr_light")
    c.data.crop = "random"
    c.train.checkpoint_every = 5000
    if args.runlocal:
        common.shrink_paper_ldm(c, "vq_f4")
        c.data.flip = False
    return c
