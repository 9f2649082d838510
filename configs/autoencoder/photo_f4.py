"""A small KL-f4 autoencoder on the embedded photo_crops dataset (~9 min on 2 CPU cores):
the first stage of the photo experiments (photo_sr, photo_inpaint, photo_uncond).

    python -m ldm_jax.train --config configs/autoencoder/photo_f4.py --workdir runs/photo_f4

The dataset is prepared on first use (random crops of the photographs bundled with
scikit-image and scikit-learn; test crops come from photos never seen in training).
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False, steps=1200)
    c = common.small_kl_f4_autoencoder("photo_crops")  # random 32² crops of the 64² crops
    c.train.num_steps = args.steps
    c.loss.disc_start = int(0.75 * args.steps)
    c.train.update(checkpoint_every=600, eval_every=600, eval_examples=512, image_every=600)
    if args.runlocal:
        common.shrink_autoencoder(c)
        c.data.name = "photo_crops"
    return c
