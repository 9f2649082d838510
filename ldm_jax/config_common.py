"""Shared defaults for every experiment under configs/.

An experiment file builds on `base_config()` and overrides what the paper's config says.
`runlocal` shrinks an experiment to CPU size (toy model, tiny batch, few steps) while
keeping its structure, so every paper config can be smoke-tested on a laptop.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

from ldm_jax.data import annotations as data_annotations
from ldm_jax.data import conditions
from ldm_jax.evaluation import settings as eval_settings
from ldm_jax.parallel import distributed
from ldm_jax.training import lr_schedules


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses `key=value,flag` strings from `--config path.py:ARG` (big_vision style)."""
    out = dict(defaults)
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, _, value = item.partition("=")
        if key not in out:
            raise ValueError(f"unknown config argument {key!r}; valid: {sorted(out)}")
        out[key] = type(defaults[key])(value) if value else True
    return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "autoencoder"
    c.seed = 0
    c.batch_size = 8  # global, over all processes and devices

    # Device mesh within a slice (one size may be -1: fill), and across slices (DCN) for
    # multi-slice TPU jobs.
    c.mesh = ml_collections.ConfigDict(
        dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
    )
    # Multi-host: coordinates (or auto-detection) and the dead-peer timeout.
    c.distributed = distributed.default_config()

    c.data = ml_collections.ConfigDict(
        dict(
            name="photo_crops",
            data_dir=ml_collections.FieldReference(None, field_type=str),
            train_split="train",
            eval_split="test",
            image_size=256,
            resize=ml_collections.FieldReference(None, field_type=int),
            crop="random",
            flip=True,
            prepare_if_missing=True,
            num_threads=2,
            num_workers=0,  # >0: batches made in worker processes (large images)
            image_key="image",
            label_key="label",
            caption_key="caption",
            condition=conditions.default_config(),  # a dense condition made per example
            objects=data_annotations.objects_config(),  # boxes and labels, for layout models
        )
    )

    c.train = ml_collections.ConfigDict(
        dict(
            num_steps=100_000,
            log_every=50,
            checkpoint_every=1000,
            keep_checkpoints=3,
            eval_every=5000,
            eval_examples=256,
            eval_batch_size=32,
            image_every=1000,
            num_image_rows=8,
            on_nonfinite="stop",  # 'stop': raise naming the step; 'skip': drop the update
            progress_bar=True,  # a bar in a terminal, one line per logged step in a log file
            # SIGTERM -> all processes save at one step and exit 0. Multi-process runs agree
            # on the step through JAX's preemption service (asked every step, a local
            # lookup); where it is off, by an all-gather every this many steps.
            preemption_check_every=10,
            # How many dispatched steps may be queued ahead of the devices (0: no bound;
            # training/dispatch.py says why a bound).
            max_steps_in_flight=4,
            # Telemetry (training/telemetry.py): MFU divides by this peak FLOP/s per device
            # (0: the table's, by device kind); profile_steps=(first, last) writes a
            # jax.profiler trace of those steps to <workdir>/profile.
            peak_flops_per_device=0.0,
            profile_steps=(),
            # Diffusion stage: the batch's gradient as the mean over this many microbatches.
            grad_accum_steps=1,
        )
    )
    # Sample metrics during training (FID, IS, precision/recall, ...): see
    # ldm_jax.evaluation.runner; off unless `every` > 0 and `metrics` are named.
    c.evaluation = eval_settings.default_config()
    # Beside TensorBoard and metrics.jsonl (training/outputs.py): a W&B project name logs
    # there too ("" : off); WANDB_MODE=offline keeps the W&B run's files local.
    c.logging = ml_collections.ConfigDict(dict(wandb="", wandb_entity=""))
    return c


def autoencoder_config(
    *,
    kind: str,
    embed_dim: int,
    ch_mult: tuple[int, ...],
    attn_resolutions: tuple[int, ...],
    n_embed: int = 0,
    attn_type: str = "vanilla",
) -> ml_collections.ConfigDict:
    """A paper first-stage config (section 1 of the reference tables)."""
    c = base_config()
    c.stage = "autoencoder"
    c.model = ml_collections.ConfigDict(
        dict(
            type=kind,
            ch=128,
            ch_mult=ch_mult,
            num_res_blocks=2,
            attn_resolutions=attn_resolutions,
            attn_type=attn_type,
            dropout=0.0,
            in_channels=3,
            out_ch=3,
            resolution=256,
            z_channels=embed_dim,
            embed_dim=embed_dim,
            double_z=kind == "kl",
            n_embed=n_embed,
            beta=0.25,
            norm_groups=32,
            dtype="float32",  # compute dtype ("bfloat16": bf16 compute, fp32 master weights)
            remat="none",  # or "attention" / "full": recompute activations in backward
        )
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            disc_start=50001,
            kl_weight=1.0e-6,
            codebook_weight=1.0,
            disc_weight=0.5,
            disc_factor=1.0,
            disc_loss="hinge",
            disc_in_channels=3,
            disc_num_layers=3,
            disc_ndf=64,
            perceptual_weight=1.0,
            logvar_init=0.0,
            # The reference optimiser leaves the loss's logvar out of its parameter list, so
            # it stays at logvar_init; set True to learn it.
            learn_logvar=False,
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            base_learning_rate=4.5e-6,
            scale_lr=True,  # lr = global batch size x base_learning_rate (reference main.py)
            b1=0.5,
            b2=0.9,
            eps=1.0e-8,
            lr_g_factor=1.0,
        )
    )
    c.data.image_size = 256
    c.data.resize = 384
    return c


def small_kl_f4_autoencoder(dataset: str) -> ml_collections.ConfigDict:
    """The CPU-size KL-f4 autoencoder of the quickstart and the digit-scenes experiments:
    ch 32, one res block per level, no attention, 3 latent channels, trained on random
    32² crops of `dataset` at native resolution (it runs convolutionally on larger
    images), batch 16; the caller sets the steps, the GAN start and its schedule."""
    c = autoencoder_config(
        kind="kl", embed_dim=3, ch_mult=(1, 2, 4), attn_resolutions=(), n_embed=0
    )
    c.model.update(ch=32, norm_groups=8, num_res_blocks=1, resolution=32)
    c.loss.update(disc_ndf=32, disc_num_layers=2)
    c.optim.base_learning_rate = 2.0e-5  # x batch 16 = 3.2e-4
    c.batch_size = 16
    c.data.update(name=dataset, image_size=32, resize=None)
    c.train.update(log_every=25, eval_batch_size=64)
    return c


def paper_autoencoder_data(c, runlocal: bool) -> None:
    """The data of the paper's first-stage experiments: ImageNet's train and validation
    splits (a prepared TFDS dataset); with `runlocal`, the toy model on the embedded
    photo_crops and its test split."""
    c.data.name = "imagenet2012"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    if runlocal:
        shrink_autoencoder(c)
        c.data.name = "photo_crops"
        c.data.eval_split = "test"


def shrink_autoencoder(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`runlocal`: same structure, CPU size (tiny channels, 32x32 images, 4 steps)."""
    c.model.ch = 16
    c.model.norm_groups = 4
    c.model.num_res_blocks = 1
    c.model.n_embed = min(c.model.n_embed, 64)
    # Keep attention at the same levels: scale the attention resolutions with the image.
    c.model.attn_resolutions = tuple(
        max(1, r * 32 // c.model.resolution) for r in c.model.attn_resolutions
    )
    c.model.resolution = 32
    c.loss.disc_ndf = 8
    c.loss.disc_num_layers = min(c.loss.disc_num_layers, 2)
    c.loss.disc_start = min(c.loss.disc_start, 2)
    _shrink_run(c, batch_size=2, eval_batch_size=8, image_rows=2)
    return c


def _shrink_run(c, *, batch_size: int, eval_batch_size: int, image_rows: int) -> None:
    """The run settings every `runlocal` shares: 32x32 images, 4 steps, everything logged."""
    c.batch_size = batch_size
    c.data.image_size = 32
    c.data.resize = None
    c.train.update(
        num_steps=4,
        log_every=1,
        checkpoint_every=2,
        eval_every=4,
        eval_examples=8,
        eval_batch_size=eval_batch_size,
        image_every=4,
        num_image_rows=image_rows,
    )


def diffusion_config(
    *,
    first_stage_workdir: str,
    model_channels: int,
    channel_mult: tuple[int, ...],
    attention_resolutions: tuple[int, ...],
    num_heads: int = -1,
    num_head_channels: int = 32,
    use_spatial_transformer: bool = False,
) -> ml_collections.ConfigDict:
    """A paper LDM config (section 2 of the reference tables); overrides follow per file."""
    c = base_config()
    c.stage = "diffusion"
    c.first_stage = ml_collections.ConfigDict(dict(workdir=first_stage_workdir, step=-1))
    # UNet; in/out channels and context_dim follow from the first stage and conditioner.
    c.model = ml_collections.ConfigDict(
        dict(
            model_channels=model_channels,
            channel_mult=channel_mult,
            num_res_blocks=2,
            attention_resolutions=attention_resolutions,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            use_spatial_transformer=use_spatial_transformer,
            transformer_depth=1,
            use_linear_in_transformer=False,
            use_scale_shift_norm=False,
            resblock_updown=False,
            dropout=0.0,
            legacy=True,
            norm_groups=32,
            dtype="float32",  # compute dtype ("bfloat16": bf16 compute, fp32 master weights)
            remat="none",  # or "attention" / "full": recompute activations in backward
        )
    )
    c.conditioning_key = ml_collections.FieldReference(None, field_type=str)
    c.cond = ml_collections.ConfigDict(
        dict(kind="none", n_classes=0, embed_dim=512, n_layer=0, max_length=77, drop_rate=0.0)
    )
    c.diffusion = ml_collections.ConfigDict(
        dict(
            beta_schedule="linear",
            timesteps=1000,
            linear_start=0.0015,
            linear_end=0.0195,
            cosine_s=8e-3,
            parameterization="eps",
            loss_type="l2",
            min_snr_gamma=ml_collections.FieldReference(None, field_type=float),
            scale_factor=1.0,
            scale_by_std=False,
        )
    )
    c.ema = ml_collections.ConfigDict(dict(decay=0.9999))
    # Encode the training split once with the frozen first stage and train from the codes
    # (ldm_jax.data.latent_cache); dir None = inside the autoencoder's workdir.
    c.latent_cache = ml_collections.ConfigDict(
        dict(enabled=False, dir=ml_collections.FieldReference(None, field_type=str), batch_size=64)
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            base_learning_rate=2.0e-6, scale_lr=True, weight_decay=0.01, warmup_steps=0,
            schedule="constant", cosine=lr_schedules.default_cosine(),  # training/lr_schedules.py
        )
    )  # fmt: skip
    # spacing (DDIM, PLMS): "uniform" is the reference's grid (one step more when steps
    # does not divide the timesteps), "leading" diffusers' (exactly `steps` steps).
    # grid_conditions: the class ids or prompts the training run's sample grids show, one
    # column each and the same at every step (() : the first classes, or the eval batch's).
    c.sampling = ml_collections.ConfigDict(
        dict(sampler="ddim", steps=50, eta=0.0, spacing="uniform", guidance_scale=1.0,
             grid_rows=2, grid_conditions=())
    )  # fmt: skip
    c.data.image_size = 256
    c.data.resize = 256
    c.data.crop = "center"
    c.data.flip = True
    return c


def shrink_diffusion(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`runlocal` for diffusion: toy UNet, 32x32 images, a few steps, few sampler steps."""
    c.model.model_channels = 32
    c.model.channel_mult = tuple(c.model.channel_mult)[:2]
    c.model.attention_resolutions = (2,)
    c.model.num_res_blocks = 1
    c.model.num_heads = -1
    c.model.num_head_channels = 16
    c.model.norm_groups = 8
    c.cond.embed_dim = 32
    c.cond.n_layer = min(c.cond.n_layer, 2)
    c.cond.max_length = 16
    _shrink_run(c, batch_size=4, eval_batch_size=4, image_rows=4)
    c.sampling.steps = 5
    c.sampling.grid_rows = 1
    return c


def paper_ldm_config(
    unet: str,
    *,
    first_stage: str,
    base_learning_rate: float,
    batch_size: int,
    dataset: str,
    linear_start: float = 0.0015,
    linear_end: float = 0.0195,
    loss_type: str = "l2",
) -> ml_collections.ConfigDict:
    """A paper LDM experiment: UNet from `unet_configs.PAPER_UNETS[unet]`, first stage from
    `runs/<first_stage>` (train it with configs/autoencoder/<first_stage>.py)."""
    from ldm_jax.models.unet_configs import PAPER_UNETS

    u = dict(PAPER_UNETS[unet])
    for derived in ("image_size", "in_channels", "out_channels", "context_dim"):
        u.pop(derived, None)  # follow from the first stage, the data and the conditioner
    c = diffusion_config(
        first_stage_workdir=f"runs/{first_stage}",
        model_channels=u.pop("model_channels"),
        channel_mult=u.pop("channel_mult"),
        attention_resolutions=u.pop("attention_resolutions"),
    )
    # Both head settings from the preset (-1 where it names none): a head width left at
    # diffusion_config's default would win over the preset's head count, and heads change
    # no shape, so nothing else would notice.
    c.model.num_heads = u.pop("num_heads", -1)
    c.model.num_head_channels = u.pop("num_head_channels", -1)
    c.model.update(u)
    c.optim.base_learning_rate = base_learning_rate
    c.batch_size = batch_size
    c.diffusion.update(linear_start=linear_start, linear_end=linear_end, loss_type=loss_type)
    c.data.name = dataset
    c.data.eval_split = "validation"
    return c


def shrink_paper_ldm(c: ml_collections.ConfigDict, first_stage: str) -> ml_collections.ConfigDict:
    """`runlocal` for a paper LDM: its first stage's own runlocal run, toy UNet, photo crops."""
    shrink_diffusion(c)
    c.first_stage.workdir = f"runs/{first_stage}_local"
    c.model.use_spatial_transformer = c.cond.kind != "none" and c.conditioning_key != "adm"
    c.model.transformer_depth = 1
    c.model.resblock_updown = False
    c.cond.n_classes = min(c.cond.n_classes, 10) if c.cond.kind == "class" else 0
    if c.cond.kind == "class":
        c.data.name = "digits"
        c.data.flip = False
    else:
        c.data.name = "digits" if c.cond.kind.startswith("text") else "photo_crops"
    c.data.eval_split = "test"
    return c


def _stage_defaults(stage: str) -> ml_collections.ConfigDict:
    if stage == "diffusion":
        return diffusion_config(
            first_stage_workdir="", model_channels=1, channel_mult=(1,), attention_resolutions=()
        )
    return autoencoder_config(kind="kl", embed_dim=1, ch_mult=(1,), attn_resolutions=())


def from_stored(stored: Mapping) -> ml_collections.ConfigDict:
    """A config saved as JSON (a checkpoint's), with the field types of the defaults back.

    JSON keeps no types: an unset `data.data_dir` comes back as a bare None, which
    `--config.data.data_dir=...` cannot override, and tuples come back as lists. Each None
    that is a typed placeholder in the stage's defaults becomes that placeholder again, and
    lists become tuples; keys the defaults lack are kept as they are.
    """

    def typed(values: Mapping, defaults) -> ml_collections.ConfigDict:
        out = ml_collections.ConfigDict()
        for key, value in values.items():
            known = isinstance(defaults, ml_collections.ConfigDict) and key in defaults
            if isinstance(value, Mapping):
                out[key] = typed(value, defaults[key] if known else None)
            elif value is None and known and defaults.get_ref(key).get_type() is not type(None):
                out[key] = ml_collections.FieldReference(None, defaults.get_ref(key).get_type())
            elif isinstance(value, list):
                out[key] = tuple(value)
            else:
                out[key] = value
        return out

    return typed(stored, _stage_defaults(stored.get("stage", "autoencoder")))


def _cpu_experiment_64(c, dataset: str, steps: int) -> None:
    """What the CPU experiments on the embedded 64² datasets share: whole 64² examples
    (centre "crop" of the full image, no flip: maps and boxes stay aligned), the test
    split held out, batch 16, scale_by_std, EMA 0.999, one evaluation and grid at the end,
    and DDIM 50 at eta 1 (eta 0 carries the large x0 errors of the noisiest steps through
    to the end as colour-noise blobs: SR test PSNR 17.3 dB vs 20.9 dB)."""
    c.diffusion.scale_by_std = True
    c.optim.base_learning_rate = 2.0e-5  # x batch 16 = 3.2e-4
    c.optim.warmup_steps = 100
    c.ema.decay = 0.999
    c.batch_size = 16
    c.data.update(name=dataset, image_size=64, resize=None, crop="center", flip=False,
                  eval_split="test")  # fmt: skip
    c.train.update(num_steps=steps, log_every=50, checkpoint_every=500, eval_every=steps,
                   eval_examples=256, eval_batch_size=64, image_every=steps, num_image_rows=8)  # fmt: skip
    c.sampling.update(sampler="ddim", steps=50, eta=1.0, grid_rows=2)


def photo_ldm_config(condition: str, steps: int, runlocal: bool) -> ml_collections.ConfigDict:
    """The CPU restoration experiments on the embedded photo_crops (64² crops; test crops
    from photos never trained on), in the latents of the photo KL-f4 autoencoder
    (configs/autoencoder/photo_f4.py; 64² -> 16x16x3): `condition` 'low_res' (4x
    super-resolution, 16² -> 64², bicubic), 'inpaint' (large masks) or 'none'
    (unconditional: inpaints by mask guidance)."""
    c = diffusion_config(
        first_stage_workdir="runs/photo_f4",
        model_channels=64,
        channel_mult=(1, 2, 2),
        attention_resolutions=(4,),
        num_head_channels=32,
    )
    c.model.num_res_blocks = 1
    c.model.norm_groups = 16
    if condition != "none":
        c.conditioning_key = "concat"
        c.data.condition.update(kind=condition, factor=4, degradation="bicubic")
    c.diffusion.loss_type = "l1" if condition == "inpaint" else "l2"
    _cpu_experiment_64(c, "photo_crops", steps)
    c.latent_cache.enabled = True  # encode the crops once; conditions are drawn per step
    if runlocal:
        shrink_diffusion(c)
        c.model.channel_mult = (1, 2)
        c.model.attention_resolutions = (2,)
        c.data.image_size = 32
        c.latent_cache.enabled = False
    return c


def digit_scene_config(task: str, steps: int, runlocal: bool) -> ml_collections.ConfigDict:
    """The CPU experiments on the embedded digit_scenes (64², 1-4 digits, test scenes from
    test digits only), in the latents of the digit-scenes KL-f4 autoencoder
    (configs/autoencoder/digit_scenes.py, 64² -> 16x16x3): `task` 'semantic' (the class
    map through the SpatialRescaler, concatenated) or 'layout' (the ink boxes as tokens,
    cross-attention, classifier-free guidance with the empty layout)."""
    c = diffusion_config(
        first_stage_workdir="runs/digit_scenes/autoencoder",
        model_channels=64,
        channel_mult=(1, 2, 2),
        # a layout is placed by cross-attention: at every level, 16x16 latents included
        attention_resolutions=(1, 2, 4) if task == "layout" else (2, 4),
        num_head_channels=32,
        use_spatial_transformer=task == "layout",
    )
    c.model.num_res_blocks = 1
    c.model.norm_groups = 16
    if task == "semantic":
        c.conditioning_key = "concat"
        c.data.condition.update(kind="semantic", num_classes=11)
    else:
        # The tokens by cross-attention (the paper's layout model), and each class's boxes
        # drawn at latent size, concatenated (data.condition.kind 'boxes'). With the
        # cross-attention alone (conditioning_key 'crossattn', data.condition.kind 'none')
        # 2000 steps stay at chance, as they do with the latents' position as channels
        # ('coords') or corner embeddings started from their grid points
        # (cond.corner_init): BENCHMARKS.md.
        c.conditioning_key = "hybrid"
        c.data.condition.kind = "boxes"
        c.cond.update(
            # vocab 257: a 16 x 16 corner grid (4 px cells, boxes within 2 px). The paper's
            # 8192 (90 x 90) would leave each corner token ~15 sightings in this budget,
            # too few for its embedding to learn where it is.
            kind="layout", n_classes=10, class_names=tuple(str(d) for d in range(10)),
            vocab_size=257, max_objects=4, embed_dim=128, n_layer=2, max_length=12,
            heads=4, dim_head=32, drop_rate=0.1,
        )  # fmt: skip
        c.sampling.guidance_scale = 2.0
    c.diffusion.loss_type = "l2"
    _cpu_experiment_64(c, "digit_scenes", steps)  # digits are not mirror-symmetric either
    c.data.objects.update(bbox_key="objects/ink_bbox", box_format="xyxy")
    if runlocal:
        shrink_diffusion(c)
        c.first_stage.workdir = "runs/digit_scenes_local/autoencoder"
        c.data.image_size = 64
        c.model.attention_resolutions = (2,)
        if task == "layout":
            c.cond.update(embed_dim=32, n_layer=1, max_length=12, heads=2, dim_head=16)
    return c


def semantic_synthesis_config(size: int, runlocal: bool) -> ml_collections.ConfigDict:
    """The paper's semantic synthesis LDM-4 at `size` (256, or 512 fine-tuning: batch 8),
    on a TFDS segmentation dataset (configs/diffusion/semantic_synthesis256.py)."""
    c = paper_ldm_config(
        "semantic_synthesis",
        first_stage="vq_f4",
        base_learning_rate=1.0e-6,
        batch_size=8 if size == 512 else 16,
        dataset="scene_parse150",
        linear_end=0.0205,
        loss_type="l1",
    )
    c.conditioning_key = "concat"
    c.data.condition.update(kind="semantic", num_classes=182, map_key="annotation")
    c.data.image_size = size
    c.data.resize = size
    c.data.crop = "random"
    c.train.checkpoint_every = 5000
    if runlocal:
        shrink_paper_ldm(c, "vq_f4")
        c.data.name = "digit_scenes"  # random 32² crops: maps and boxes cropped with them
        c.data.resize = None
        c.data.flip = False
        c.data.condition.update(num_classes=11, map_key="segmentation")
    return c
