"""Semantic synthesis LDM-4 fine-tuned at 512² (128x128x3 latents); reference
models/ldm/semantic_synthesis512. The same model as semantic_synthesis256 (see there);
batch 8. Sampled convolutionally at 1024² as the paper's landscapes:

    python -m ldm_jax.train --config configs/diffusion/semantic_synthesis512.py \
        --workdir runs/semantic512 --config.first_stage.workdir=runs/vq_f4 \
        --config.data.data_dir=/path/to/tfds
    python -m ldm_jax.sample --workdir runs/semantic512 --cond_image map_1024.png
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False)
    return common.semantic_synthesis_config(512, args.runlocal)
