"""FFHQ LDM-4 (VQ-f4, unconditional); reference ffhq-ldm-vq-4.yaml. TFDS ships no FFHQ builder: prepare an array_record dataset named `ffhq` with an `image` feature.

    python -m ldm_jax.train --config configs/diffusion/ffhq_ldm_vq4.py --workdir runs/ffhq_ldm_vq4 \
        --config.first_stage.workdir=runs/vq_f4 --config.data.data_dir=/path/to/tfds

CPU smoke run, after `python -m ldm_jax.train --config configs/autoencoder/vq_f4.py:runlocal
--workdir runs/vq_f4_local`:

    python -m ldm_jax.train --config configs/diffusion/ffhq_ldm_vq4.py:runlocal --workdir runs/ffhq_ldm_vq4_local
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False)
    c = common.paper_ldm_config(
        "ffhq-ldm-vq-4",
        first_stage="vq_f4",
        base_learning_rate=2.0e-6,
        batch_size=42,
        dataset="ffhq",
    )
    if args.runlocal:
        common.shrink_paper_ldm(c, "vq_f4")
    return c
