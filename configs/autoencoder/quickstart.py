"""Quickstart stage 1: a small KL-f4 autoencoder on the embedded digits, the data its
LDMs run on (~9 min on 2 CPU cores).

    python -m ldm_jax.train --config configs/autoencoder/quickstart.py --workdir runs/quickstart/autoencoder

As in the paper, the first stage is trained on its LDM's domain: the photo autoencoder
(configs/autoencoder/photo_f4.py) reconstructs held-out digits at 17.0 dB PSNR, with 15%
of them off the digits' manifold, against 34.4 dB and 1.6% for this one (BENCHMARKS.md,
"Quickstart pictures").
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False, steps=1200)
    c = common.small_kl_f4_autoencoder("digits")  # whole 32² digits, the test split held out
    c.train.num_steps = args.steps
    c.loss.disc_start = int(0.75 * args.steps)
    c.train.update(checkpoint_every=600, eval_every=600, eval_examples=512, image_every=600)
    if args.runlocal:
        common.shrink_autoencoder(c)
    return c
