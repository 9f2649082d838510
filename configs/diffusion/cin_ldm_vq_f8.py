"""ImageNet class-conditional LDM-8 (VQ-f8, cross-attention to a class embedding); reference cin-ldm-vq-f8.yaml.

    python -m ldm_jax.train --config configs/diffusion/cin_ldm_vq_f8.py --workdir runs/cin_ldm_vq_f8 \
        --config.first_stage.workdir=runs/vq_f8 --config.data.data_dir=/path/to/tfds

CPU smoke run, after `python -m ldm_jax.train --config configs/autoencoder/vq_f8.py:runlocal
--workdir runs/vq_f8_local`:

    python -m ldm_jax.train --config configs/diffusion/cin_ldm_vq_f8.py:runlocal --workdir runs/cin_ldm_vq_f8_local
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False)
    c = common.paper_ldm_config(
        "cin-ldm-vq-f8",
        first_stage="vq_f8",
        base_learning_rate=1.0e-6,
        batch_size=64,
        dataset="imagenet2012",
    )
    c.conditioning_key = "crossattn"
    c.cond.update(kind="class", n_classes=1000, embed_dim=512, drop_rate=0.0)
    if args.runlocal:
        common.shrink_paper_ldm(c, "vq_f8")
    return c
