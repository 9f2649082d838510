"""VQ-f4 autoencoder without attention (z=3, 8192 codes): the first stage of the paper's
inpainting model (models/first_stage_models/vq-f4-noattn, attn_type none).

    python -m ldm_jax.train --config configs/autoencoder/vq_f4_noattn.py --workdir runs/vq_f4_noattn \
        --config.data.name=imagenet2012 --config.data.data_dir=/path/to/tensorflow_datasets

CPU smoke run (tiny model, photo_crops, 4 steps):

    python -m ldm_jax.train --config configs/autoencoder/vq_f4_noattn.py:runlocal --workdir runs/vq_f4_noattn_local
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False)
    c = common.autoencoder_config(
        kind="vq", embed_dim=3, ch_mult=(1, 2, 4), attn_resolutions=(), n_embed=8192
    )
    c.model.attn_type = "none"
    c.loss.disc_start = 11  # the reference's (vq-f4 itself starts at 0)
    c.loss.disc_weight = 0.75
    c.loss.disc_num_layers = 3
    c.batch_size = 8
    common.paper_autoencoder_data(c, args.runlocal)
    return c
