"""The first stage of the digit-scenes experiments: the quickstart's small KL-f4
autoencoder, trained on random 32² crops of the embedded digit_scenes (it runs
convolutionally on the 64² scenes: 16x16x3 latents).

    python -m ldm_jax.train --config configs/autoencoder/digit_scenes.py \
        --workdir runs/digit_scenes/autoencoder

No GAN phase in this budget (issue 17 measured it costing fidelity at the quickstart's
step counts); L1 + LPIPS + the KL term.
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False, steps=800)
    c = common.small_kl_f4_autoencoder("digit_scenes")
    c.loss.disc_start = 10**9  # never, in this budget
    c.data.flip = False
    c.train.update(num_steps=args.steps, checkpoint_every=400, eval_every=args.steps,
                   eval_examples=256, image_every=args.steps)  # fmt: skip
    if args.runlocal:
        common.shrink_autoencoder(c)
        c.data.name = "digit_scenes"
        c.data.flip = False
    return c
