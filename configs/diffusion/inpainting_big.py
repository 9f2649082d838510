"""Inpainting LDM-4 (VQ-f4 without attention, large masks); reference models/ldm/inpainting_big.

The UNet sees [z_t, E(masked image), mask at latent size] (3 + 3 + 1 = 7 channels), is
trained with the L1 loss and the reference's warm-up cosine schedule (multiplier 0.001 ->
0.1 over 1000 steps, half cosine to 0.0001 at step 50000). The released config has no
data section; the paper trains on Places with large masks (ldm_jax.data.masks); the batch
size here is our choice.

    python -m ldm_jax.train --config configs/diffusion/inpainting_big.py --workdir runs/inpainting_big \
        --config.first_stage.workdir=runs/vq_f4_noattn --config.data.data_dir=/path/to/tfds
    python -m ldm_jax.sample --workdir runs/inpainting_big --cond_image photo.png --mask mask.png

CPU smoke run, after `python -m ldm_jax.train --config configs/autoencoder/vq_f4_noattn.py:runlocal
--workdir runs/vq_f4_noattn_local`:

    python -m ldm_jax.train --config configs/diffusion/inpainting_big.py:runlocal --workdir runs/inpainting_big_local
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False)
    c = common.paper_ldm_config(
        "inpainting_big",
        first_stage="vq_f4_noattn",
        base_learning_rate=1.0e-6,
        batch_size=32,
        dataset="places365_small",
        linear_end=0.0205,
        loss_type="l1",
    )
    c.conditioning_key = "concat"
    c.data.condition.update(kind="inpaint", coverage=(0.1, 0.5))
    c.data.crop = "random"
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 1000
    if args.runlocal:
        common.shrink_paper_ldm(c, "vq_f4_noattn")
        c.optim.warmup_steps = 2
        c.optim.cosine.max_decay_steps = 4
    return c
