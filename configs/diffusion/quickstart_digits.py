"""Quickstart stage 2: a class-conditional LDM on the digits, in the quickstart autoencoder's
latents (f=4: 32x32 digits -> 8x8x3), with classifier-free guidance.

    python -m ldm_jax.train --config configs/diffusion/quickstart_digits.py \
        --workdir runs/quickstart/ldm_digits \
        --config.first_stage.workdir=runs/quickstart/autoencoder

`:text` trains the text-conditional variant instead: captions ("a handwritten digit
seven") -> BERT WordPiece tokens -> a transformer encoder trained with the UNet.
"""

from ldm_jax import config_common as common


def get_config(arg=None):
    args = common.parse_arg(arg, runlocal=False, text=False, steps=1000)
    c = common.diffusion_config(
        first_stage_workdir="runs/quickstart/autoencoder",
        model_channels=64,
        channel_mult=(1, 2),
        attention_resolutions=(1, 2),
        num_head_channels=32,
        use_spatial_transformer=True,
    )
    c.model.norm_groups = 16
    c.conditioning_key = "crossattn"
    if args.text:
        c.cond.update(kind="text", embed_dim=64, n_layer=2, max_length=16, drop_rate=0.1)
    else:
        c.cond.update(kind="class", n_classes=10, embed_dim=64, drop_rate=0.1)
    c.diffusion.scale_by_std = True
    c.diffusion.linear_start, c.diffusion.linear_end = 0.0015, 0.0195
    c.optim.base_learning_rate = 1.0e-5  # x batch 32 = 3.2e-4
    c.optim.warmup_steps = 100
    c.ema.decay = 0.999
    c.batch_size = 32
    c.data.name = "digits"
    c.data.image_size = 32
    c.data.resize = None
    c.data.crop = "center"
    c.data.flip = False  # a mirrored 7 is not a 7
    # Encode the digits once (seconds) instead of every step (~40% of the step on a CPU).
    c.latent_cache.enabled = True
    c.train.num_steps = args.steps
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.eval_every = args.steps
    c.train.eval_examples = 256
    c.train.eval_batch_size = 64
    c.train.image_every = args.steps
    c.train.num_image_rows = 10
    # DDIM at eta 1: at eta 0 the deterministic sampler carries the x0 errors of the
    # noisiest steps through to latents far outside the data's (|z| up to 15.7 against the
    # real digits' 3.2), decoded as colour-noise blobs: 31% of 100 class samples off the
    # digits' manifold at eta 0, 0% at eta 1, on the same model (BENCHMARKS.md).
    c.sampling.update(sampler="ddim", steps=50, eta=1.0, guidance_scale=3.0, grid_rows=4)
    if args.runlocal:
        common.shrink_diffusion(c)
        c.model.channel_mult = (1, 2)
    return c
