"""Quickstart: a small KL-f4 autoencoder on the embedded photo_crops dataset (~9 min on 2 CPU cores).

    python -m ldm_jax.train --config configs/autoencoder/quickstart.py --workdir runs/quickstart/autoencoder

The dataset is prepared on first use (random crops of the photographs bundled with
scikit-image and scikit-learn; test crops come from photos never seen in training).
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False, steps=1200)
    c = common.autoencoder_config(
        kind="kl", embed_dim=3, ch_mult=(1, 2, 4), attn_resolutions=(), n_embed=0
    )
    c.model.ch = 32
    c.model.norm_groups = 8
    c.model.num_res_blocks = 1
    c.model.resolution = 32
    c.loss.disc_ndf = 32
    c.loss.disc_num_layers = 2
    c.optim.base_learning_rate = 2.0e-5  # x batch 16 = 3.2e-4
    c.batch_size = 16
    c.data.name = "photo_crops"
    c.data.image_size = 32
    c.data.resize = None  # random 32x32 crops of the 64x64 crops, at native resolution
    c.train.num_steps = args.steps
    c.loss.disc_start = int(0.75 * args.steps)
    c.train.log_every = 25
    c.train.checkpoint_every = 600
    c.train.eval_every = 600
    c.train.eval_examples = 512
    c.train.eval_batch_size = 64
    c.train.image_every = 600
    if args.runlocal:
        common.shrink_autoencoder(c)
        c.data.name = "photo_crops"
    return c
