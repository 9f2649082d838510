"""VQ-f8 autoencoder (z=4, 16384 codes; latent 32x32x4 at 256^2).

Reference: first-stage table of the paper's released configs (models/first_stage_models/
vq-f8). Train on a prepared TFDS dataset (OpenImages/ImageNet in the paper):

    python -m ldm_jax.train --config configs/autoencoder/vq_f8.py --workdir runs/vq_f8 \
        --config.data.name=imagenet2012 --config.data.data_dir=/path/to/tensorflow_datasets

CPU smoke run (tiny model, photo_crops, 4 steps):

    python -m ldm_jax.train --config configs/autoencoder/vq_f8.py:runlocal --workdir runs/vq_f8_local
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False)
    c = common.autoencoder_config(
        kind="vq", embed_dim=4, ch_mult=(1, 2, 2, 4), attn_resolutions=(32,), n_embed=16384
    )
    c.loss.disc_start = 1
    c.loss.disc_weight = 0.6
    c.loss.disc_num_layers = 2
    c.batch_size = 10
    common.paper_autoencoder_data(c, args.runlocal)
    return c
