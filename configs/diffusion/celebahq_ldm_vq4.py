"""CelebA-HQ LDM-4 (VQ-f4, unconditional); reference configs/latent-diffusion/celebahq-ldm-vq-4.yaml.

    python -m ldm_jax.train --config configs/diffusion/celebahq_ldm_vq4.py --workdir runs/celebahq_ldm_vq4 \
        --config.first_stage.workdir=runs/vq_f4 --config.data.data_dir=/path/to/tfds

CPU smoke run, after `python -m ldm_jax.train --config configs/autoencoder/vq_f4.py:runlocal
--workdir runs/vq_f4_local`:

    python -m ldm_jax.train --config configs/diffusion/celebahq_ldm_vq4.py:runlocal --workdir runs/celebahq_ldm_vq4_local
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False)
    c = common.paper_ldm_config(
        "celebahq-ldm-vq-4",
        first_stage="vq_f4",
        base_learning_rate=2.0e-6,
        batch_size=48,
        dataset="celeb_a_hq/256",
    )
    if args.runlocal:
        common.shrink_paper_ldm(c, "vq_f4")
    return c
