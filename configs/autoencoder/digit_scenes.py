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
    c = common.autoencoder_config(
        kind="kl", embed_dim=3, ch_mult=(1, 2, 4), attn_resolutions=(), n_embed=0
    )
    c.model.ch = 32
    c.model.norm_groups = 8
    c.model.num_res_blocks = 1
    c.model.resolution = 32
    c.loss.disc_ndf = 32
    c.loss.disc_num_layers = 2
    c.loss.disc_start = 10**9  # never, in this budget
    c.optim.base_learning_rate = 2.0e-5  # x batch 16 = 3.2e-4
    c.batch_size = 16
    c.data.name = "digit_scenes"
    c.data.image_size = 32
    c.data.resize = None
    c.data.flip = False
    c.train.num_steps = args.steps
    c.train.log_every = 25
    c.train.checkpoint_every = 400
    c.train.eval_every = args.steps
    c.train.eval_examples = 256
    c.train.eval_batch_size = 64
    c.train.image_every = args.steps
    if args.runlocal:
        common.shrink_autoencoder(c)
        c.data.name = "digit_scenes"
        c.data.flip = False
    return c
