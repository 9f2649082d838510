"""Layout-to-image LDM-4 (VQ-f4 latents); reference models/ldm/layout2img-openimages256.

Each object is 3 tokens (its class and its two corners on a 90x90 grid; ldm_jax.data.
layouts), up to 30 objects padded to 90 tokens, through the paper's transformer (512
wide, 16 layers, vocabulary 8192, 92 positions, no text tokenizer), into the UNet by
cross-attention (3 transformer blocks per level). The reference trains on OpenImages
boxes; this config reads COCO 2017's (`coco/2017`: objects/bbox in TFDS's ymin-first
order, 80 classes); classifier-free guidance with the empty layout.

    python -m ldm_jax.train --config configs/diffusion/layout2img_openimages256.py \
        --workdir runs/layout256 --config.first_stage.workdir=runs/vq_f4 \
        --config.data.data_dir=/path/to/tfds
    python -m ldm_jax.sample --workdir runs/layout256 --layout layouts.json

CPU smoke run, after `python -m ldm_jax.train --config configs/autoencoder/vq_f4.py:runlocal
--workdir runs/vq_f4_local`:

    python -m ldm_jax.train --config configs/diffusion/layout2img_openimages256.py:runlocal \
        --workdir runs/layout256_local
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False)
    c = common.paper_ldm_config(
        "layout2img",
        first_stage="vq_f4",
        base_learning_rate=2.0e-6,
        batch_size=24,
        dataset="coco/2017",
        linear_end=0.0205,
        loss_type="l1",
    )
    c.conditioning_key = "crossattn"
    c.cond.update(
        kind="layout", n_classes=80, class_names=(), vocab_size=8192, max_objects=30,
        embed_dim=512, n_layer=16, max_length=92, heads=8, dim_head=64, drop_rate=0.1,
    )  # fmt: skip
    c.data.objects.update(bbox_key="objects/bbox", label_key="objects/label", box_format="yxyx")
    c.data.flip = True  # boxes are mirrored with the image
    c.sampling.guidance_scale = 2.0
    c.train.checkpoint_every = 5000
    if args.runlocal:
        common.shrink_paper_ldm(c, "vq_f4")
        c.cond.update(kind="layout", n_classes=10, max_objects=4, max_length=12, n_layer=1,
                      heads=2, dim_head=16)  # fmt: skip
        c.data.name = "digit_scenes"  # random 32² crops: maps and boxes cropped with them
        c.data.resize = None
        c.data.flip = False
        c.data.objects.update(bbox_key="objects/ink_bbox", box_format="xyxy")
    return c
