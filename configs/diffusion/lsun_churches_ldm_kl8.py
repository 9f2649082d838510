"""LSUN-Churches LDM-8 (KL-f8, unconditional, scale_by_std, L1 loss); reference lsun_churches-ldm-kl-8.yaml.

    python -m ldm_jax.train --config configs/diffusion/lsun_churches_ldm_kl8.py --workdir runs/lsun_churches_ldm_kl8 \
        --config.first_stage.workdir=runs/kl_f8 --config.data.data_dir=/path/to/tfds

CPU smoke run, after `python -m ldm_jax.train --config configs/autoencoder/kl_f8.py:runlocal
--workdir runs/kl_f8_local`:

    python -m ldm_jax.train --config configs/diffusion/lsun_churches_ldm_kl8.py:runlocal --workdir runs/lsun_churches_ldm_kl8_local
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False)
    c = common.paper_ldm_config(
        "lsun_churches-ldm-kl-8",
        first_stage="kl_f8",
        base_learning_rate=5.0e-5,
        batch_size=96,
        dataset="lsun/church_outdoor",
    )
    c.diffusion.update(linear_end=0.0155, loss_type="l1", scale_by_std=True)
    c.optim.scale_lr = False  # the reference YAML says it runs with --scale_lr False
    c.optim.warmup_steps = 10000  # LambdaLinearScheduler: 1e-6 -> 1 over 10k steps
    if args.runlocal:
        common.shrink_paper_ldm(c, "kl_f8")
    return c
