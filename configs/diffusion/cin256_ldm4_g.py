"""ImageNet class-conditional LDM-4-G (VQ-f4, cross-attention to a class embedding, guidance); reference cin256-v2.yaml (it sets no batch size: 64 here).

    python -m ldm_jax.train --config configs/diffusion/cin256_ldm4_g.py --workdir runs/cin256_ldm4_g \
        --config.first_stage.workdir=runs/vq_f4 --config.data.data_dir=/path/to/tfds

CPU smoke run, after `python -m ldm_jax.train --config configs/autoencoder/vq_f4.py:runlocal
--workdir runs/vq_f4_local`:

    python -m ldm_jax.train --config configs/diffusion/cin256_ldm4_g.py:runlocal --workdir runs/cin256_ldm4_g_local
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False)
    c = common.paper_ldm_config(
        "cin256-v2",
        first_stage="vq_f4",
        base_learning_rate=1.0e-4,
        batch_size=64,
        dataset="imagenet2012",
    )
    c.conditioning_key = "crossattn"
    # The reference's table has 1001 rows: the 1000 classes and, last, the learned null
    # class of guidance, which ldm_jax's ClassEmbedder adds itself (row n_classes).
    c.cond.update(kind="class", n_classes=1000, embed_dim=512, drop_rate=0.1)
    c.ema.decay = 0.0  # use_ema: False in the reference
    c.optim.scale_lr = False
    c.sampling.guidance_scale = 1.5
    if args.runlocal:
        common.shrink_paper_ldm(c, "vq_f4")
    return c
