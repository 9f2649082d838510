"""Text-to-image LDM-KL-8 (1.45B, BERT tokenizer + 32-layer transformer, context 1280); reference txt2img-1p4B-eval.yaml (no data section there: COCO captions here).

    python -m ldm_jax.train --config configs/diffusion/txt2img_ldm_kl8.py --workdir runs/txt2img_ldm_kl8 \
        --config.first_stage.workdir=runs/kl_f8 --config.data.data_dir=/path/to/tfds

CPU smoke run, after `python -m ldm_jax.train --config configs/autoencoder/kl_f8.py:runlocal
--workdir runs/kl_f8_local`:

    python -m ldm_jax.train --config configs/diffusion/txt2img_ldm_kl8.py:runlocal --workdir runs/txt2img_ldm_kl8_local
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False)
    c = common.paper_ldm_config(
        "txt2img-1p4B",
        first_stage="kl_f8",
        base_learning_rate=5.0e-05,
        batch_size=32,
        dataset="coco_captions",
    )
    c.diffusion.update(linear_start=0.00085, linear_end=0.012, scale_factor=0.18215)
    c.conditioning_key = "crossattn"
    c.cond.update(kind="text", embed_dim=1280, n_layer=32, max_length=77, drop_rate=0.1)
    c.data.caption_key = "captions/text"
    c.ema.decay = 0.0  # use_ema: False in the reference
    c.optim.scale_lr = False
    if args.runlocal:
        common.shrink_paper_ldm(c, "kl_f8")
    return c
