"""The config reference, docs/CONFIG.md: every key of both stages' defaults, its default in
each stage and what it means, generated from the code so that it cannot drift from it.

    python -m ldm_jax.config_reference > docs/CONFIG.md

The defaults are `config_common._stage_defaults(stage)`, the configs that stored runs are
read back against. MEANINGS holds one line per dotted key; tests/test_config_reference.py
checks that it names exactly the defaults' keys and that the committed file is this
module's output.
"""

from __future__ import annotations

import ml_collections

from ldm_jax import config_common

STAGES = ("autoencoder", "diffusion")
STAGE_COLUMNS = {"autoencoder": "default (first stage)", "diffusion": "default (diffusion)"}
REGENERATE = "python -m ldm_jax.config_reference > docs/CONFIG.md"
ABSENT = "—"
PER_EXPERIMENT_MARK = "†"

# One paragraph per top-level group, in the order the reference lists them ("" is the
# group of the top-level keys).
SECTIONS = {
    "": "What trains, with which seed and batch, and (diffusion) how the condition reaches "
    "the UNet.",
    "train": "The training loop both stages share (ldm_jax/training/loop.py): its length, "
    "logging, checkpoints, held-out evaluations, sample grids and telemetry.",
    "data": "The input pipeline (ldm_jax/data/pipeline.py): the dataset, its splits and "
    "features, the crop, and the dense condition (`data.condition`) made per example.",
    "model": "The network: the autoencoder in the first stage, the UNet in the diffusion "
    "stage (its input and output channels and context width follow from the first stage "
    "and the conditioner). The two share only a few names.",
    "loss": "First stage: the reconstruction loss (L1 + LPIPS), the KL or codebook "
    "regulariser and the PatchGAN discriminator.",
    "optim": "The optimiser: Adam for the autoencoder and its discriminator, AdamW (optax's "
    "default betas) with a learning-rate schedule for the UNet.",
    "first_stage": "Diffusion: the trained autoencoder run whose frozen weights encode and "
    "decode; its architecture comes from that run's checkpoint.",
    "cond": "Diffusion: the conditioning encoder (ldm_jax/training/conditioner.py) for "
    "classes, text or layouts, and classifier-free guidance's condition dropout.",
    "diffusion": "Diffusion: the noise schedule, the UNet's target and the loss.",
    "ema": "Diffusion: the exponential moving average of the UNet's weights, which "
    "sampling and evaluation use.",
    "latent_cache": "Diffusion: encode the training split once with the frozen first stage "
    "and train from the stored codes (ldm_jax/data/latent_cache.py).",
    "sampling": "Diffusion: the sampler of the training run's sample grids, and the "
    "default of `ldm_jax.sample` and of evaluations.",
    "evaluation": "Sample metrics (FID, IS, precision/recall, ...) during training, off "
    "unless `every` > 0 and `metrics` are named; `python -m ldm_jax.evaluate` takes the "
    "same settings as flags.",
    "logging": "Where the scalars and image grids go besides TensorBoard and metrics.jsonl "
    "(ldm_jax/training/outputs.py).",
    "mesh": "The device mesh (ldm_jax/parallel/mesh.py): data, FSDP and tensor parallelism "
    "within a slice, and the multipliers across the slices of a multi-slice TPU job.",
    "distributed": "Multi-process jobs (ldm_jax/parallel/distributed.py): where the "
    "processes meet, and how long they wait for each other.",
}

MEANINGS = {
    # ----- top level ----------------------------------------------------------------------
    "stage": "Which stage the config trains: 'autoencoder' (the first stage) or 'diffusion'. "
    "Set by the stage's builder, which gives the keys of that stage.",
    "seed": "Seeds the initialisation, the data order and the augmentations (an int >= 0); "
    "a resumed run must keep its seed.",
    "batch_size": "Global training batch, over all processes and devices: a multiple of the "
    "mesh's batch shards and of the process count. optim.scale_lr multiplies the learning "
    "rate by it.",
    "conditioning_key": "How the condition reaches the UNet: None or 'crossattn': "
    "cross-attention on the conditioner's context (when cond.kind gives one); 'concat': "
    "data.condition's features concatenated with z_t; 'hybrid': both; 'adm': class ids "
    "through the UNet's own label embedding (cond.kind 'class').",
    # ----- train --------------------------------------------------------------------------
    "train.num_steps": "Training steps of the run; a resumed run goes on to this step. 0 only "
    "initialises and saves step 0.",
    "train.log_every": "Steps between logged metrics and progress lines, and the last step (0: "
    "the last step only); loss and gradients are checked for NaN/Inf at these steps.",
    "train.checkpoint_every": "Steps between checkpoints (0: only at the end); the last step, and the step a "
    "preempted run stops at, are saved too.",
    "train.keep_checkpoints": "How many of the latest checkpoints `<workdir>/checkpoints` keeps; "
    "older ones are deleted.",
    "train.eval_every": "Steps between held-out evaluations, and the last step (0: the last only): PSNR, "
    "SSIM and LPIPS of reconstructions (first stage) or the EMA UNet's loss (diffusion), on "
    "data.eval_split.",
    "train.eval_examples": "Examples of data.eval_split the held-out evaluations use (capped "
    "at the split's size).",
    "train.eval_batch_size": "Global batch of the held-out evaluations and of the sample "
    "grids: a multiple of the mesh's batch shards.",
    "train.image_every": "Steps between sample grids, and the last step (0: the last only), written to "
    "`<workdir>/images/` and to TensorBoard.",
    "train.num_image_rows": "How many images wide each sample grid is, despite the name: "
    "originals over their reconstructions (first stage); samples, at most one per class or "
    "per eval example for conditioned models (diffusion).",
    "train.on_nonfinite": "When loss or gradients become NaN/Inf: 'stop' (raise naming the "
    "step; earlier checkpoints are kept) or 'skip' (drop the update and count it in "
    "skipped_steps).",
    "train.progress_bar": "A progress bar in a terminal, one line per logged step in a log "
    "file; False: neither (evaluation and preemption lines still print).",
    "train.preemption_check_every": "Multi-process runs without JAX's preemption service: "
    "steps between the all-gathers that agree to stop after a SIGTERM (a single process "
    "checks every step).",
    "train.max_steps_in_flight": "Dispatched steps that may be queued ahead of the devices "
    "(0: no bound). Unbounded queues hold every queued batch in device memory and "
    "deadlocked multi-process CPU runs.",
    "train.peak_flops_per_device": "Peak FLOP/s of one device, which the MFU figure divides "
    "by; 0: the built-in table's for the device kind (no MFU for devices it lacks, e.g. "
    "CPUs).",
    "train.profile_steps": "(first, last): write a jax.profiler trace of those steps "
    "(1-based, inclusive) to `<workdir>/profile`; (): none.",
    "train.grad_accum_steps": "Diffusion: the batch's gradient as the mean over this many "
    "equal microbatches (must divide batch_size), to save memory. The first stage needs 1.",
    # ----- data ---------------------------------------------------------------------------
    "data.name": "Dataset: a TFDS name, prepared as array_record (a config and version may "
    "follow: 'lsun/church_outdoor:3.1.0'), or one of the project's own: 'digits', "
    "'photo_crops', 'digit_scenes'.",
    "data.data_dir": "TFDS data directory (a local path or gs://); None: TFDS's default "
    "($TFDS_DATA_DIR, else ~/tensorflow_datasets).",
    "data.train_split": "Split to train on; TFDS's slicing syntax works ('train[:90%]').",
    "data.eval_split": "Held-out split: the evaluations' examples and the sample grids' batch.",
    "data.image_size": "Side in pixels of the square crop the model sees; a multiple of the "
    "first stage's f (diffusion: times the UNet's downsampling).",
    "data.resize": "Resize each image so that its smaller side is this many pixels (bicubic) "
    "before cropping; >= image_size. None: crop the stored image as it is.",
    "data.crop": "Training crop: 'random' or 'center'; evaluations always take the centre.",
    "data.flip": "Random horizontal flips (p 0.5) in training; never in evaluations.",
    "data.prepare_if_missing": "Build one of the project's datasets on the spot when it is not "
    "prepared in data_dir (TFDS datasets must be prepared beforehand).",
    "data.num_threads": "Threads that read and decode examples (training with num_workers 0, "
    "and every evaluation); 0: no read-ahead.",
    "data.num_workers": "> 0: training batches are made in this many worker processes, whole "
    "batches each (for large images); 0: in threads of the training process.",
    "data.image_key": "Feature holding the image ('/'-separated path into nested features).",
    "data.label_key": "Feature holding the class label, for cond.kind 'class'; ignored where "
    "the dataset lacks it.",
    "data.caption_key": "Feature holding the caption (one is drawn where there are several), "
    "for text conditions; ignored where the dataset lacks it.",
    "data.condition.kind": "The dense condition made per example: 'none', 'low_res' "
    "(super-resolution), 'inpaint', 'semantic' (a class map), 'coords' (latent positions) "
    "or 'boxes' (a layout's boxes drawn); all but 'none' need conditioning_key 'concat' or "
    "'hybrid'.",
    "data.condition.factor": "low_res: the image's side over the condition's (must divide "
    "image_size).",
    "data.condition.degradation": "low_res: how the low-resolution input is made: "
    "'bsr_light' (random blur, down-scaling, noise and JPEG, as the paper's "
    "super-resolution model) or 'bicubic'.",
    "data.condition.coverage": "inpaint: (low, high): the share of the image a drawn mask "
    "covers, 0 < low <= high < 1.",
    "data.condition.eval_seed": "Seed of the eval split's conditions (masks, degradations): "
    "the same in every evaluation.",
    "data.condition.num_classes": "semantic: the number of classes in the maps, background "
    "included (ids are below it; >= 2).",
    "data.condition.map_key": "semantic: the dataset feature holding each example's class map.",
    "data.condition.rescaler.n_stages": "semantic: bilinear resizes by `multiplier` from the "
    "class map to the latents; `image_size * multiplier ** n_stages` must be the latent size.",
    "data.condition.rescaler.out_channels": "semantic: channels of the rescaled map that the "
    "UNet takes beside z_t (a trained 1x1 convolution from the one-hot classes).",
    "data.condition.rescaler.multiplier": "semantic: the scale of each resize stage.",
    "data.condition.frequencies": "coords: Fourier features (sin, cos of pi f x) of the "
    "position at these frequencies, beside x and y; (): x and y only.",
    "data.objects.bbox_key": "Feature holding each example's boxes, for layout conditions "
    "(read when the dataset has both this and label_key).",
    "data.objects.label_key": "Feature holding the class of each box of bbox_key.",
    "data.objects.box_format": "Order of the box coordinates, normalised to [0, 1]: 'yxyx' "
    "(TFDS's BBoxFeature) or 'xyxy'.",
    # ----- model: the autoencoder ---------------------------------------------------------
    "model.type": "First stage: the regulariser, 'kl' (a Gaussian posterior) or 'vq' (a codebook).",
    "model.ch": "First stage: base channel count of the encoder and decoder.",
    "model.ch_mult": "First stage: channel multiplier of each level; the downsampling factor "
    "f is `2 ** (len(ch_mult) - 1)`.",
    "model.attn_resolutions": "First stage: feature-map sides, counted down from `resolution`, "
    "at which the levels get attention blocks; (): none beside the middle block's.",
    "model.attn_type": "First stage: 'vanilla' (self-attention) or 'none' (no attention "
    "anywhere, the middle block included).",
    "model.in_channels": "First stage: channels of the input images (3: the pipeline yields RGB).",
    "model.out_ch": "First stage: channels of the reconstructions.",
    "model.resolution": "First stage: the image side that attn_resolutions count from; the "
    "training crop is data.image_size, and the model runs on any multiple of f.",
    "model.z_channels": "First stage: channels of the encoder's output, before the 1x1 "
    "convolution to embed_dim.",
    "model.embed_dim": "First stage: channels of the latents, the space the diffusion stage "
    "works in (VQ: the width of the codebook's vectors).",
    "model.double_z": "First stage, 'kl': the encoder gives a mean and a log-variance; must "
    "stay True for 'kl', ignored by 'vq'.",
    "model.n_embed": "First stage, 'vq': the codebook's size; ignored by 'kl'.",
    "model.beta": "First stage, 'vq': the weight of the codebook term in the quantiser's loss.",
    # ----- model: the UNet ----------------------------------------------------------------
    "model.model_channels": "Diffusion: base channel count of the UNet.",
    "model.channel_mult": "Diffusion: channel multiplier of each level; image sides must be "
    "multiples of `f * 2 ** (len(channel_mult) - 1)`.",
    "model.attention_resolutions": "Diffusion: downsampling factors (1, 2, 4, ...) of the "
    "levels that get attention; the middle block always has it.",
    "model.num_heads": "Diffusion: attention heads; -1: from num_head_channels.",
    "model.num_head_channels": "Diffusion: channels per attention head, which wins over "
    "num_heads; -1: use num_heads.",
    "model.use_spatial_transformer": "Diffusion: attention blocks are transformers with "
    "cross-attention on the context; True exactly when the run has one (cond.kind other "
    "than 'none', conditioning_key not 'adm').",
    "model.transformer_depth": "Diffusion: transformer blocks in each attention block of a "
    "spatial-transformer UNet.",
    "model.use_linear_in_transformer": "Diffusion: the transformers project in and out with "
    "linear layers instead of 1x1 convolutions (Stable Diffusion 2).",
    "model.use_scale_shift_norm": "Diffusion: the timestep embedding scales and shifts the "
    "ResBlocks' second GroupNorm instead of being added before it.",
    "model.resblock_updown": "Diffusion: down- and up-sample with ResBlocks instead of a strided "
    "convolution and nearest-neighbour upsampling with a convolution.",
    "model.legacy": "Diffusion: the reference's legacy rule for the attention heads' width (True "
    "for the paper's models, False for Stable Diffusion's).",
    # ----- model: both --------------------------------------------------------------------
    "model.num_res_blocks": "ResBlocks per level.",
    "model.dropout": "Dropout rate in the ResBlocks during training.",
    "model.norm_groups": "Groups of every GroupNorm: each normalised channel count must be a "
    "multiple of it.",
    "model.dtype": "Compute dtype: 'float32', 'bfloat16' or 'float16'; weights and optimiser "
    "state stay float32.",
    "model.remat": "Recompute activations in the backward pass instead of storing them: "
    "'none', 'attention' (attention blocks) or 'full' (every ResBlock and attention block).",
    # ----- loss ---------------------------------------------------------------------------
    "loss.disc_start": "Step from which the GAN terms are on (0 before it).",
    "loss.kl_weight": "'kl': weight of the KL regulariser.",
    "loss.codebook_weight": "'vq': weight of the quantiser's loss.",
    "loss.perceptual_weight": "Weight of LPIPS in the reconstruction loss; 0 skips the VGG16 "
    "pass altogether.",
    "loss.disc_weight": "Scale of the adaptive GAN weight (the ratio of the reconstruction's "
    "and the GAN's gradient norms at the decoder's last layer).",
    "loss.disc_factor": "Factor of the generator's and discriminator's GAN terms once they are on.",
    "loss.disc_loss": "Discriminator loss: 'hinge' or 'vanilla' (softplus).",
    "loss.disc_in_channels": "Channels of the discriminator's input images.",
    "loss.disc_num_layers": "Strided convolution layers of the PatchGAN discriminator.",
    "loss.disc_ndf": "Filters of the discriminator's first layer (doubled per layer, up to 8x).",
    "loss.logvar_init": "'kl': the output log-variance that divides the reconstruction loss, "
    "at the start.",
    "loss.learn_logvar": "'kl': train that log-variance; False keeps it at logvar_init (the "
    "reference's optimiser leaves it out).",
    # ----- optim --------------------------------------------------------------------------
    "optim.base_learning_rate": "Learning rate per example of the batch when scale_lr, else "
    "the learning rate itself.",
    "optim.scale_lr": "Learning rate = `batch_size * base_learning_rate` (the reference's "
    "rule); False: base_learning_rate as it is.",
    "optim.b1": "First stage: Adam's beta1 (generator and discriminator).",
    "optim.b2": "First stage: Adam's beta2.",
    "optim.eps": "First stage: Adam's epsilon.",
    "optim.lr_g_factor": "First stage: the generator's learning rate is the discriminator's "
    "times this.",
    "optim.weight_decay": "Diffusion: AdamW's weight decay.",
    "optim.warmup_steps": "Diffusion: linear warm-up steps; 'constant' rises from 0, "
    "'warmup_cosine' from cosine.lr_start; 0: none.",
    "optim.schedule": "Diffusion: learning-rate schedule, 'constant' or 'warmup_cosine' (a "
    "warm-up, then a cosine decay, as multipliers of the learning rate).",
    "optim.cosine.lr_start": "Diffusion, 'warmup_cosine': the multiplier at step 0.",
    "optim.cosine.lr_max": "Diffusion, 'warmup_cosine': the multiplier at the end of the "
    "warm-up, where the cosine starts.",
    "optim.cosine.lr_min": "Diffusion, 'warmup_cosine': the multiplier the cosine ends at, "
    "kept after max_decay_steps.",
    "optim.cosine.max_decay_steps": "Diffusion, 'warmup_cosine': the step the cosine reaches "
    "lr_min at (> warmup_steps).",
    # ----- first_stage --------------------------------------------------------------------
    "first_stage.workdir": "The autoencoder run's --workdir (a local path or gs://); its "
    "checkpoints/ must exist.",
    "first_stage.step": "Which of that run's checkpoints to use; -1: the latest.",
    # ----- cond ---------------------------------------------------------------------------
    "cond.kind": "Conditioning encoder: 'none', 'class' (labels), 'text' (BERT tokens, a "
    "transformer trained with the UNet), 'text_frozen' (a frozen pretrained MiniLM), 'clip' "
    "(Stable Diffusion's frozen CLIP text encoder) or 'layout' (labelled boxes as tokens).",
    "cond.n_classes": "'class' and 'layout': the number of classes (labels in [0, n)); the "
    "null class of guidance is n.",
    "cond.embed_dim": "Width of the trained encoder's output (class embedding, text or layout "
    "transformer): the UNet's context width. 'text_frozen' and 'clip' use their encoder's.",
    "cond.n_layer": "'text' and 'layout': transformer layers of the encoder.",
    "cond.max_length": "'text' and 'text_frozen': tokens per prompt (padded or cut); "
    "'layout': at least the layout's token count. 'clip' uses its encoder's context length.",
    "cond.drop_rate": "Probability that a training example's condition is replaced by the "
    "unconditional one (null class, empty prompt, empty layout), for classifier-free "
    "guidance; 0: never.",
    # ----- diffusion ----------------------------------------------------------------------
    "diffusion.beta_schedule": "Noise schedule: 'linear' (the LDM one: linear in sqrt(beta)), "
    "'sqrt_linear' (linear in beta), 'sqrt' or 'cosine'.",
    "diffusion.timesteps": "Training timesteps T of the forward process.",
    "diffusion.linear_start": "First beta of the linear schedules (beta_1).",
    "diffusion.linear_end": "Last beta of the linear schedules (beta_T).",
    "diffusion.cosine_s": "Offset s of the cosine schedule.",
    "diffusion.parameterization": "What the UNet predicts: 'eps' (the noise), 'x0' (the clean "
    "latents) or 'v'.",
    "diffusion.loss_type": "Loss on that prediction: 'l2' or 'l1'.",
    "diffusion.min_snr_gamma": "Min-SNR-gamma loss weighting (min(SNR, gamma) on the x0 loss, "
    "expressed for the target); None: off.",
    "diffusion.scale_factor": "The first stage's latents are multiplied by it before "
    "diffusion (and divided before decoding).",
    "diffusion.scale_by_std": "A fresh run sets scale_factor to 1 / std of the first "
    "training batch's latents (overriding scale_factor).",
    # ----- ema ----------------------------------------------------------------------------
    "ema.decay": "EMA decay of the UNet's weights, warmed up as "
    "`min(decay, (1 + n) / (10 + n))` at step n.",
    # ----- latent_cache -------------------------------------------------------------------
    "latent_cache.enabled": "Train from cached codes; needs data.crop 'center', data.flip "
    "False and no 'semantic' or layout condition.",
    "latent_cache.dir": "Where the cache lives; None: "
    "`<first_stage.workdir>/latent_cache/<dataset>-<split>-<size>-step<N>`, shared by runs "
    "on that first stage.",
    "latent_cache.batch_size": "Global batch of the encoding pass: a multiple of the mesh's "
    "batch shards.",
    # ----- sampling -----------------------------------------------------------------------
    "sampling.sampler": "'ddim', 'plms', 'dpm_solver_pp_2m' or 'ddpm' (every training timestep).",
    "sampling.steps": "Sampler steps (ignored by 'ddpm').",
    "sampling.eta": "DDIM: 0 is deterministic, 1 DDPM-like noise.",
    "sampling.spacing": "DDIM and PLMS grid: 'uniform' (the reference's: one step more when "
    "steps does not divide timesteps), 'leading' (diffusers': exactly `steps`) or 'quad'.",
    "sampling.guidance_scale": "Classifier-free guidance scale; 1.0: no guidance.",
    "sampling.grid_rows": "Rows of samples in each training sample grid (each row a fresh draw).",
    "sampling.grid_conditions": "The class ids (class runs) or prompts (text runs) that "
    "every training sample grid shows, one column each, captioned and the same at every "
    "step, e.g. ('a red bus', 'two dogs'); (): the first classes, or the eval batch's "
    "examples.",
    # ----- evaluation ---------------------------------------------------------------------
    "evaluation.metrics": "Metric names, e.g. ('fid', 'is'); which apply depends on the run "
    "(ldm_jax/evaluation/metrics.py lists them). (): none.",
    "logging.wandb": "A Weights & Biases project to log to as well (needs the wandb package); "
    "'': off. The W&B run id is kept in <workdir>/wandb_id, so a resumed run goes on in the "
    "same W&B run; WANDB_MODE=offline keeps its files in <workdir>/wandb.",
    "logging.wandb_entity": "The W&B team or user the project belongs to; '': W&B's "
    "default for the logged-in user.",
    "evaluation.every": "Training steps between evaluations; 0: never during training.",
    "evaluation.num_samples": "Samples drawn (diffusion), or held-out images restored or "
    "reconstructed.",
    "evaluation.num_reference": "Reference images for FID and precision/recall statistics; "
    "None: the whole split.",
    "evaluation.split": "The split evaluated against: the reference images of sample metrics "
    "(None: data.train_split) or the held-out images restored or reconstructed (None: "
    "data.eval_split).",
    "evaluation.sampler": "Sampler for the evaluation; None: sampling.sampler.",
    "evaluation.steps": "Sampler steps; None: sampling.steps.",
    "evaluation.guidance": "Guidance scale; None: sampling.guidance_scale.",
    "evaluation.seed": "Seed of the evaluation's samples.",
    "evaluation.batch_size": "Global batch of the evaluation; None: the largest multiple of "
    "the mesh's batch shards up to 64 (one row per shard where there are more).",
    "evaluation.resize": "Resize to Inception's 299 px: 'tf1_bilinear' (the TF FID code's) or "
    "'torch_bilinear' (pytorch-fid's).",
    "evaluation.inception": "FID Inception weights file; None: pytorch-fid's file in "
    "inception_cache, else the packaged network.",
    "evaluation.inception_cache": "Directory of the cached Inception weights.",
    "evaluation.download_inception": "Download pytorch-fid's Inception weights into "
    "inception_cache when missing.",
    "evaluation.stats_dir": "Directory of the cached reference statistics.",
    "evaluation.is_splits": "Splits of the samples for the Inception Score's mean and spread.",
    "evaluation.pr_k": "k of the k-nearest-neighbour balls of precision and recall.",
    # ----- mesh ---------------------------------------------------------------------------
    "mesh.data": "Data-parallel size within a slice; -1 (on one axis at most): the devices "
    "left over.",
    "mesh.fsdp": "FSDP size: weights, optimiser state and EMA are split over it, and the "
    "batch too.",
    "mesh.tensor": "Tensor-parallel size: the output side of weights is split over it.",
    "mesh.dcn_data": "Multi-slice TPU jobs: slices along the data axis (1: one slice).",
    "mesh.dcn_fsdp": "Multi-slice TPU jobs: slices along the fsdp axis.",
    "mesh.dcn_tensor": "Multi-slice TPU jobs: slices along the tensor axis.",
    # ----- distributed --------------------------------------------------------------------
    "distributed.coordinator_address": "host:port of process 0's coordinator; None: "
    "$LDM_JAX_COORDINATOR, else a SLURM or TPU cluster JAX detects, else a single process.",
    "distributed.num_processes": "Processes in the job (None: $LDM_JAX_NUM_PROCESSES or "
    "detected); give all three coordinates or none.",
    "distributed.process_id": "This process's index in [0, num_processes) (None: "
    "$LDM_JAX_PROCESS_ID or detected).",
    "distributed.initialization_timeout_s": "Seconds to wait for every process to join.",
    "distributed.heartbeat_timeout_s": "Seconds without a heartbeat after which a peer counts "
    "as dead and the others exit non-zero.",
}

_MEANING_RANK = {key: i for i, key in enumerate(MEANINGS)}

# Required arguments of the stage builders unlike the placeholders `_stage_defaults`
# builds with: a key whose value changes with them is set by every experiment.
_PROBES = {
    "autoencoder": lambda: config_common.autoencoder_config(
        kind="vq", embed_dim=2, ch_mult=(1, 2), attn_resolutions=(8,)
    ),
    "diffusion": lambda: config_common.diffusion_config(
        first_stage_workdir="runs/probe",
        model_channels=2,
        channel_mult=(1, 2),
        attention_resolutions=(2,),
    ),
}


def stage_defaults(stage: str) -> ml_collections.ConfigDict:
    """What the code itself takes as the stage's defaults (stored configs are read back
    against them)."""
    return config_common._stage_defaults(stage)


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the leaf's default as the reference prints it."""
    out = {}
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = format_default(config, key)
    return out


def format_default(parent: ml_collections.ConfigDict, key: str) -> str:
    """repr of the value; a None that holds a typed place also names the type an override
    must have."""
    value = parent[key]
    if value is None:
        field_type = parent.get_ref(key).get_type()
        if field_type is not type(None):
            return f"`None` ({field_type.__name__})"
    return f"`{value!r}`"


def per_experiment_keys(stage: str) -> set[str]:
    """The stage's keys whose defaults are placeholders for what every experiment sets."""
    defaults, probe = flatten(stage_defaults(stage)), flatten(_PROBES[stage]())
    return {key for key, value in defaults.items() if probe.get(key) != value}


def defaults_by_stage() -> dict[str, dict[str, str]]:
    """{stage: {key: printed default}}, the per-experiment ones marked."""
    out = {}
    for stage in STAGES:
        defaults, marked = flatten(stage_defaults(stage)), per_experiment_keys(stage)
        out[stage] = {
            k: f"{v} {PER_EXPERIMENT_MARK}" if k in marked else v for k, v in defaults.items()
        }
    return out


def all_keys(by_stage: dict[str, dict[str, str]]) -> list[str]:
    return sorted(set().union(*by_stage.values()))


def group_of(key: str) -> str:
    return key.split(".")[0] if "." in key else ""


def section_order(keys) -> list[str]:
    """SECTIONS' order, then any group it lacks (so that a new group still shows)."""
    groups = {group_of(k) for k in keys}
    return [g for g in SECTIONS if g in groups] + sorted(groups - set(SECTIONS))


def _reading_order(key: str) -> tuple[bool, int, str]:
    """MEANINGS' order (related keys together), then any key it lacks."""
    rank = _MEANING_RANK.get(key)
    return rank is None, rank or 0, key


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_section(group: str, keys: list[str], by_stage) -> list[str]:
    title = f"`{group}`" if group else "Top level"
    lines = [f"## {title}", ""]
    if SECTIONS.get(group):
        lines += [SECTIONS[group], ""]
    header = ["key", *(STAGE_COLUMNS[s] for s in STAGES), "meaning"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for key in sorted(keys, key=_reading_order):
        cells = [f"`{key}`", *(by_stage[s].get(key, ABSENT) for s in STAGES)]
        cells.append(MEANINGS.get(key, ""))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines + [""]


def render_intro(keys: list[str], by_stage) -> list[str]:
    both = [k for k in keys if all(k in by_stage[s] for s in STAGES)]
    marked = sorted(set().union(*(per_experiment_keys(s) for s in STAGES)))
    return [
        "# Config reference",
        "",
        f"Every key of the two stages' configs ({len(keys)} keys: "
        f"{len(by_stage['autoencoder'])} in the first stage, {len(by_stage['diffusion'])} in "
        f"the diffusion stage, {len(both)} shared), its default and its meaning. This file "
        "is generated from the code; regenerate it with",
        "",
        f"    {REGENERATE}",
        "",
        "and `tests/test_config_reference.py` fails until it matches the code again.",
        "",
        "An experiment is a file under `configs/` that starts from one stage's defaults "
        "(`ldm_jax/config_common.py`: `autoencoder_config` for the first stage, "
        "`diffusion_config` for the diffusion stage) and overrides what its paper's config "
        "says, so most experiments differ from the defaults below in many keys: the batch, "
        "the dataset, the learning rate, the model's shapes. Override any key on the "
        "command line:",
        "",
        "    python -m ldm_jax.train --config configs/autoencoder/kl_f8.py --workdir runs/kl_f8 \\",
        "        --config.batch_size=16 --config.train.log_every=10 \\",
        "        --config.train.profile_steps='(10, 12)'",
        "",
        "The config is locked: a key it does not have is an error naming it, and a value "
        "must have the key's type (a `None` shown with a type takes a value of that type). "
        "`python -m ldm_jax.sample`, `ldm_jax.evaluate` and `ldm_jax.inspect_checkpoint` "
        "take the same `--config.KEY=VALUE` overrides of a run's stored config. A few "
        "experiments add keys that only their configs have (the layout models' "
        "`cond.vocab_size`, `cond.max_objects`, ...; ldm_jax/training/conditioner.py reads "
        "them).",
        "",
        f"{PER_EXPERIMENT_MARK} Set by every experiment (the builder's required arguments): "
        "the value shown is only the placeholder the defaults are built with. These are "
        + ", ".join(f"`{k}`" for k in marked)
        + f". {ABSENT}: the stage has no such key.",
        "",
    ]


def render() -> str:
    """docs/CONFIG.md."""
    by_stage = defaults_by_stage()
    keys = all_keys(by_stage)
    lines = render_intro(keys, by_stage)
    for group in section_order(keys):
        lines += render_section(group, [k for k in keys if group_of(k) == group], by_stage)
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()
