"""KL-f16 autoencoder (z=16; latent 16x16x16 at 256^2).

Reference: first-stage table of the paper's released configs (models/first_stage_models/
kl-f16). Train on a prepared TFDS dataset (OpenImages/ImageNet in the paper):

    python -m ldm_jax.train --config configs/autoencoder/kl_f16.py --workdir runs/kl_f16 \
        --config.data.name=imagenet2012 --config.data.data_dir=/path/to/tensorflow_datasets

CPU smoke run (tiny model, photo_crops, 4 steps):

    python -m ldm_jax.train --config configs/autoencoder/kl_f16.py:runlocal --workdir runs/kl_f16_local
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False)
    c = common.autoencoder_config(
        kind="kl", embed_dim=16, ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,), n_embed=0
    )
    c.loss.disc_start = 50001
    c.loss.disc_weight = 0.5
    c.loss.disc_num_layers = 3
    c.batch_size = 6
    common.paper_autoencoder_data(c, args.runlocal)
    return c
