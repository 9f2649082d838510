"""Every paper LDM config builds the paper's UNet (parameter counts via eval_shape) with the
reference's diffusion settings; the CPU-size variants keep the structure."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.config_loader import load_config
from ldm_jax.models import unet_configs

# config -> (PAPER_UNETS name, first stage, latent channels (or UNet (in, out) channels for
#            dense conditions), context dim, params, (linear_start, linear_end), loss, base
#            lr); the counts are the reference UNetModel's (stable-diffusion-sdkit, torch)
PAPER = {
    "celebahq_ldm_vq4": ("celebahq-ldm-vq-4", "vq_f4", 3, None, 274_056_163, (0.0015, 0.0195), "l2", 2e-6),
    "ffhq_ldm_vq4": ("ffhq-ldm-vq-4", "vq_f4", 3, None, 274_056_163, (0.0015, 0.0195), "l2", 2e-6),
    "lsun_bedrooms_ldm_vq4": ("lsun_bedrooms-ldm-vq-4", "vq_f4", 3, None, 274_056_163, (0.0015, 0.0195), "l2", 2e-6),
    "lsun_churches_ldm_kl8": ("lsun_churches-ldm-kl-8", "kl_f8", 4, None, 294_966_916, (0.0015, 0.0155), "l1", 5e-5),
    "cin256_ldm4_g": ("cin256-v2", "vq_f4", 3, 512, 400_920_579, (0.0015, 0.0195), "l2", 1e-4),
    "cin_ldm_vq_f8": ("cin-ldm-vq-f8", "vq_f8", 4, 512, 394_984_196, (0.0015, 0.0195), "l2", 1e-6),
    "txt2img_ldm_kl8": ("txt2img-1p4B", "kl_f8", 4, 1280, 872_300_484, (0.00085, 0.012), "l2", 5e-5),
    "bsr_sr": ("bsr_sr", "vq_f4", (6, 3), None, 113_622_563, (0.0015, 0.0155), "l2", 1e-6),
    "inpainting_big": ("inpainting_big", "vq_f4_noattn", (7, 3), None, 387_245_827, (0.0015, 0.0205), "l1", 1e-6),
    "semantic_synthesis256": ("semantic_synthesis", "vq_f4", (6, 3), None, 215_229_315, (0.0015, 0.0205), "l1", 1e-6),
    "semantic_synthesis512": ("semantic_synthesis", "vq_f4", (6, 3), None, 215_229_315, (0.0015, 0.0205), "l1", 1e-6),
    "layout2img_openimages256": ("layout2img", "vq_f4", 3, 512, 246_277_379, (0.0015, 0.0205), "l1", 2e-6),
}  # fmt: skip


def _unet_params(config, channels, context_dim) -> int:
    c_in, c_out = channels if isinstance(channels, tuple) else (channels, channels)
    u = config.model.copy_and_resolve_references()
    with u.unlocked():
        u.in_channels, u.out_channels, u.context_dim = c_in, c_out, context_dim
    model = unet_configs.from_config(u)
    x = jax.ShapeDtypeStruct((1, 32, 32, c_in), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    ctx = None if context_dim is None else jax.ShapeDtypeStruct((1, 1, context_dim), jnp.float32)
    shapes = jax.eval_shape(
        lambda x, t, c: model.init(jax.random.PRNGKey(0), x, t, context=c), x, t, ctx
    )
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_ldm_config(name):
    unet, first_stage, channels, context_dim, count, betas, loss, lr = PAPER[name]
    c = load_config(f"configs/diffusion/{name}.py")
    assert c.stage == "diffusion" and c.first_stage.workdir == f"runs/{first_stage}"
    assert (c.diffusion.linear_start, c.diffusion.linear_end) == betas
    assert c.diffusion.loss_type == loss and c.optim.base_learning_rate == lr
    assert c.diffusion.timesteps == 1000 and c.diffusion.parameterization == "eps"
    want = unet_configs.PAPER_UNETS[unet]
    for key in ("model_channels", "num_res_blocks", "num_heads", "num_head_channels"):
        if key in want:
            assert c.model[key] == want[key], key
    assert tuple(c.model.channel_mult) == tuple(want["channel_mult"])
    assert tuple(c.model.attention_resolutions) == tuple(want["attention_resolutions"])
    assert _unet_params(c, channels, context_dim) == count
    small = load_config(f"configs/diffusion/{name}.py:runlocal")
    assert small.first_stage.workdir == f"runs/{first_stage}_local"
    assert small.data.image_size == 32 and small.model.model_channels == 32


def test_semantic_and_layout_paper_conditions():
    """The semantic models concatenate the rescaled 182-class map (3 channels: in_channels
    6), at 256 (batch 16) and 512 (batch 8, the reference's); the layout model's layout
    is 30 objects as 90 tokens in the reference's 8192 ids and 92 positions."""
    from ldm_jax.training.conditioner import Conditioner

    for size, batch in ((256, 16), (512, 8)):
        c = load_config(f"configs/diffusion/semantic_synthesis{size}.py")
        assert c.conditioning_key == "concat" and c.data.image_size == size
        assert c.batch_size == batch
        assert c.data.condition.kind == "semantic" and c.data.condition.num_classes == 182
        assert dict(c.data.condition.rescaler) == dict(n_stages=2, out_channels=3, multiplier=0.5)
    c = load_config("configs/diffusion/layout2img_openimages256.py")
    cond = Conditioner(c.cond, c.conditioning_key)
    assert (cond.tokens.vocab_size, cond.tokens.length, cond.tokens.grid) == (8192, 90, 90)
    assert (cond.module.n_embed, cond.module.n_layer, cond.module.max_seq_len) == (512, 16, 92)
    assert c.data.objects.box_format == "yxyx" and c.data.name == "coco/2017"


def test_txt2img_uses_the_sd_latent_scale():
    c = load_config("configs/diffusion/txt2img_ldm_kl8.py")
    assert c.diffusion.scale_factor == 0.18215 and c.cond.n_layer == 32


def test_dense_condition_configs_set_the_reference_layout():
    sr = load_config("configs/diffusion/bsr_sr.py")
    assert sr.conditioning_key == "concat" and sr.data.condition.kind == "low_res"
    assert (sr.data.condition.factor, sr.data.condition.degradation) == (4, "bsr_light")
    inpaint = load_config("configs/diffusion/inpainting_big.py")
    assert inpaint.data.condition.kind == "inpaint" and inpaint.optim.schedule == "warmup_cosine"
    assert unet_configs.PAPER_UNETS["inpainting_big"]["resblock_updown"]
    fs = load_config("configs/autoencoder/vq_f4_noattn.py")
    assert fs.model.attn_type == "none" and fs.model.type == "vq" and fs.model.n_embed == 8192
