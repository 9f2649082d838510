"""The CompVis model zoo's config.yaml -> ldm_jax run configs.

A release's YAML names its class in `model.target` and its architecture in `model.params`:

    ldm.models.autoencoder.AutoencoderKL / VQModel    a first stage (ddconfig, embed_dim,
                                                      n_embed, lossconfig)
    ldm.models.diffusion.ddpm.LatentDiffusion         an LDM: unet_config, first_stage_config
                                                      (VQModelInterface / AutoencoderKL),
                                                      cond_stage_config, the schedule

`autoencoder_run_config` and `diffusion_run_config` give the config of an ldm_jax run of
the same model, on the same values as the project's experiment files where they describe
the same model (configs/autoencoder/*.py, configs/diffusion/*.py; a test checks it).
What the YAML does not say is the matching experiment's choice (the dataset of a release
without a data section), or the reference's where the experiment departs from it (the
layout model's OpenImages class ids, where its experiment reads COCO). Anything the
project cannot run is one UserError.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from ldm_jax import config_common, storage
from ldm_jax.errors import UserError
from ldm_jax.models.autoencoder import ATTN_TYPES

AUTOENCODER_TARGETS = {
    "ldm.models.autoencoder.AutoencoderKL": "kl",
    "ldm.models.autoencoder.VQModel": "vq",
    "ldm.models.autoencoder.VQModelInterface": "vq",  # VQModel that encodes to h (no quantiser)
}
LDM_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"
_ENCODERS = "ldm.modules.encoders.modules."
UNCONDITIONAL = "__is_unconditional__"
FIRST_STAGE = "__is_first_stage__"  # the inpainting model: its first stage encodes the condition
IDENTITY = "torch.nn.Identity"  # the condition itself (the SR model's low-res image)
COND_STAGES = (UNCONDITIONAL, FIRST_STAGE, IDENTITY, _ENCODERS + "ClassEmbedder",
               _ENCODERS + "BERTEmbedder", _ENCODERS + "SpatialRescaler")  # fmt: skip
IMAGENET_CLASSES = 1000
OPEN_IMAGES_BOX_CLASSES = 601  # the boxable classes the layout model's ids name
BERT_VOCAB = 30522  # bert-base-uncased, the WordPiece tokenizer of ldm_jax's `text` kind
# The YAML's training data class (a substring of its target) -> the TFDS dataset name the
# project's experiment files read for it.
_DATASETS = {"ImageNet": "imagenet2012", "LSUNChurches": "lsun/church_outdoor",
             "LSUNBedrooms": "lsun/bedroom", "CelebAHQ": "celeb_a_hq/256", "FFHQ": "ffhq",
             "OpenImages": "open_images_v4"}  # fmt: skip
# Releases without a data section: the dataset of the experiment file of the same model.
_DATASET_BY_CONDITION = {"class": "imagenet2012", "text": "coco_captions",
                         "inpaint": "places365_small", "semantic": "scene_parse150"}  # fmt: skip
# openaimodel UNetModel arguments that ldm_jax's UNet takes as they are (with the
# reference's defaults); in/out channels and context_dim are checked against the run's.
_UNET_DEFAULTS = dict(
    num_res_blocks=2, num_heads=-1, num_head_channels=-1, use_spatial_transformer=False,
    transformer_depth=1, use_scale_shift_norm=False, resblock_updown=False, dropout=0.0,
    legacy=True,
)  # fmt: skip
_LOSS_KEYS = ("disc_start", "kl_weight", "codebook_weight", "disc_weight", "disc_factor",
              "disc_in_channels", "disc_num_layers", "perceptual_weight", "logvar_init",
              "disc_loss")  # fmt: skip


@dataclasses.dataclass
class Release:
    """A release's config.yaml: its model target and params, learning rate and data."""

    target: str
    params: dict
    base_learning_rate: float | None
    data: dict
    source: str

    @property
    def stage(self) -> str:
        return "autoencoder" if self.target in AUTOENCODER_TARGETS else "diffusion"


def read_release(path) -> Release:
    """The YAML at `path`; an unknown model.target is refused, naming the known ones."""
    import yaml

    try:
        root = yaml.safe_load(storage.path(path).read_text())
        model = root["model"]
        target, params = str(model["target"]), dict(model.get("params") or {})
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a CompVis config.yaml with model.target ({e!r})") from e
    if target not in AUTOENCODER_TARGETS and target != LDM_TARGET:
        known = sorted([*AUTOENCODER_TARGETS, LDM_TARGET])
        raise UserError(f"{path}: model.target {target!r} is not a release ldm_jax reads ({known})")
    lr = model.get("base_learning_rate")
    data = (root.get("data") or {}).get("params") or {}
    return Release(target, params, None if lr is None else float(lr), dict(data), str(path))


def _dataset(release: Release, fallback: str | None) -> str | None:
    train = (release.data.get("train") or {}).get("target", "")
    found = [name for key, name in _DATASETS.items() if key in train]
    return found[0] if found else fallback


def _section(params: dict, key: str, what: str) -> dict:
    try:
        return dict(params[key])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{what}: the YAML has no {key} ({e!r})") from e


# ----- first stages ------------------------------------------------------------------------
def first_stage_config(target: str, params: dict, source: str) -> ml_collections.ConfigDict:
    """The autoencoder config of a first stage's `target` and `params` (ddconfig, ...)."""
    kind = AUTOENCODER_TARGETS.get(target)
    if kind is None:
        raise UserError(
            f"first stage target {target!r}: ldm_jax reads {sorted(AUTOENCODER_TARGETS)}"
        )
    dd = _section(params, "ddconfig", "first stage")
    attn_type = dd.get("attn_type", "vanilla")
    if attn_type not in ATTN_TYPES:
        raise UserError(f"first stage attn_type {attn_type!r}: ldm_jax has {list(ATTN_TYPES)}")
    if kind == "kl" and not dd.get("double_z", True):
        raise UserError("an AutoencoderKL needs double_z: true (mean and log-variance)")
    try:
        c = config_common.autoencoder_config(
            kind=kind, embed_dim=int(params["embed_dim"]), ch_mult=tuple(dd["ch_mult"]),
            attn_resolutions=tuple(dd.get("attn_resolutions") or ()),
            n_embed=int(params.get("n_embed", 0)), attn_type=attn_type,
        )  # fmt: skip
        c.model.update(
            ch=int(dd["ch"]), num_res_blocks=int(dd["num_res_blocks"]),
            dropout=float(dd.get("dropout", 0.0)), in_channels=int(dd["in_channels"]),
            out_ch=int(dd["out_ch"]), resolution=int(dd["resolution"]),
            z_channels=int(dd["z_channels"]), double_z=kind == "kl",
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"first stage ddconfig / embed_dim incomplete in {source} ({e!r})") from e
    if kind == "vq" and c.model.n_embed < 1:
        raise UserError(f"a VQModel needs n_embed (its codebook size) in {source}")
    loss = dict((params.get("lossconfig") or {}).get("params") or {})
    c.loss.update({k: type(c.loss[k])(loss[k]) for k in _LOSS_KEYS if k in loss})
    config_common.paper_autoencoder_data(c, runlocal=False)
    with c.unlocked():
        c.imported_from = source
    return c


def autoencoder_run_config(release: Release) -> ml_collections.ConfigDict:
    """A first-stage release as an autoencoder run's config (configs/autoencoder/*.py)."""
    c = first_stage_config(release.target, release.params, release.source)
    if release.base_learning_rate is not None:
        c.optim.base_learning_rate = release.base_learning_rate
    return c


# ----- latent diffusion models -------------------------------------------------------------
def _conditioning_key(params: dict, cond_target: str):
    """The reference's resolution: none when unconditional, else the YAML's key, else
    'concat' when concat_mode (default True), else 'crossattn'."""
    if cond_target == UNCONDITIONAL:
        return None
    key = params.get("conditioning_key")
    if key is not None:
        return str(key)
    return "concat" if params.get("concat_mode", True) else "crossattn"


def _set_condition(c, cond_target: str, cond: dict, key, release: Release) -> str:
    """Sets c.cond / c.data.condition for the release's cond stage; returns its kind."""
    if cond_target not in COND_STAGES:
        raise UserError(
            f"cond_stage_config target {cond_target!r} has no ldm_jax counterpart (ldm_jax "
            f"reads {list(COND_STAGES)}; Stable Diffusion releases: python -m ldm_jax.import_sd)"
        )
    name = cond_target.removeprefix(_ENCODERS)
    if cond_target == UNCONDITIONAL:
        return "none"
    if name == "ClassEmbedder" and key == "crossattn":
        rows = int(cond.get("n_classes", IMAGENET_CLASSES))
        learned_null = rows == IMAGENET_CLASSES + 1  # cin256-v2: its last row is the null class
        classes = IMAGENET_CLASSES if learned_null else rows
        c.cond.update(kind="class", n_classes=classes, embed_dim=int(cond.get("embed_dim", 512)))
        c.cond.drop_rate = 0.1 if learned_null else 0.0
        c.sampling.guidance_scale = 1.5 if learned_null else 1.0  # the paper's LDM-4-G scale
        return "class"
    if name == "BERTEmbedder" and key == "crossattn":
        return _set_bert(c, cond)
    if name == "SpatialRescaler" and key == "concat":
        if cond.get("bias", False) or cond.get("method", "bilinear") != "bilinear":
            raise UserError("SpatialRescaler: ldm_jax's is bilinear and bias-free, as released")
        classes = int(cond.get("in_channels", 3))
        c.data.condition.update(kind="semantic", num_classes=classes, map_key="annotation")
        c.data.condition.rescaler = dict(
            n_stages=int(cond.get("n_stages", 1)), out_channels=int(cond["out_channels"]),
            multiplier=float(cond.get("multiplier", 0.5)),
        )  # fmt: skip
        return "semantic"
    if cond_target == IDENTITY and key == "concat":  # the low-res image itself (bsr_sr)
        data = (release.data.get("train") or {}).get("params") or {}
        bsr = data.get("degradation", "bsrgan_light") == "bsrgan_light"
        factor = int(data.get("downscale_f", 4))
        c.data.condition.update(
            kind="low_res", factor=factor, degradation="bsr_light" if bsr else "bicubic"
        )
        return "low_res"
    if cond_target == FIRST_STAGE and key == "concat":  # E(masked image) and the mask
        c.data.condition.update(kind="inpaint", coverage=(0.1, 0.5))
        return "inpaint"
    raise UserError(f"cond_stage {name} with conditioning_key {key!r} has no ldm_jax counterpart")


def _set_bert(c, cond: dict) -> str:
    """A BERTEmbedder: WordPiece text (use_tokenizer) or a layout's token ids."""
    n_embed, n_layer = int(cond["n_embed"]), int(cond["n_layer"])
    vocab, length = int(cond.get("vocab_size", BERT_VOCAB)), int(cond.get("max_seq_len", 77))
    if float(cond.get("embedding_dropout", 0.0)) != 0.0:
        raise UserError("BERTEmbedder embedding_dropout must be 0 (ldm_jax's encoder has none)")
    if cond.get("use_tokenizer", True):
        if vocab != BERT_VOCAB:
            raise UserError(
                f"BERTEmbedder vocab_size {vocab}: the WordPiece tokenizer has {BERT_VOCAB}"
            )
        c.cond.update(kind="text", embed_dim=n_embed, n_layer=n_layer, max_length=length)
        c.cond.drop_rate = 0.1
        with c.cond.unlocked():
            c.cond.attend_padding = True  # the BERTEmbedder attends over its padding
        c.data.caption_key = "captions/text"
        c.sampling.guidance_scale = 1.5  # the paper's text-to-image scale
        return "text"
    # Layout tokens: 3 per object on the reference's grid, 2 positions spare (its crop).
    with c.cond.unlocked():
        c.cond.update(kind="layout", n_classes=OPEN_IMAGES_BOX_CLASSES, class_names=(),
                      vocab_size=vocab, max_objects=length // 3, embed_dim=n_embed,
                      n_layer=n_layer, max_length=length, heads=8, dim_head=64, drop_rate=0.0)  # fmt: skip
    c.data.objects.update(bbox_key="objects/bbox", label_key="objects/label", box_format="yxyx")
    return "layout"


def _unet_settings(unet: dict) -> dict:
    settings = {k: unet.get(k, v) for k, v in _UNET_DEFAULTS.items()}
    if unet.get("num_classes") is not None:
        raise UserError(
            "a UNet with num_classes (class labels added to the time embedding) is not a "
            "released LDM layout ldm_jax reads"
        )
    try:
        shape = dict(
            model_channels=int(unet["model_channels"]),
            channel_mult=tuple(int(m) for m in unet["channel_mult"]),
            attention_resolutions=tuple(int(r) for r in unet["attention_resolutions"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"unet_config.params incomplete ({e!r})") from e
    return shape | {k: type(_UNET_DEFAULTS[k])(v) for k, v in settings.items()}


def diffusion_run_config(release: Release, first_stage_workdir) -> tuple:
    """(diffusion config, first stage's autoencoder config) of an LDM release whose first
    stage is written to `first_stage_workdir`."""
    p = release.params
    unet = _section(_section(p, "unet_config", "LDM"), "params", "unet_config")
    fs = _section(p, "first_stage_config", "LDM")
    fs_params = dict(fs.get("params") or {})
    fs_config = first_stage_config(str(fs.get("target")), fs_params, release.source)
    cond_cfg = p.get("cond_stage_config")  # a dict, or the name of a special case
    cond_cfg = dict(cond_cfg) if isinstance(cond_cfg, dict) else {"target": cond_cfg}
    cond_target, cond_params = str(cond_cfg.get("target")), dict(cond_cfg.get("params") or {})
    u = _unet_settings(unet)
    c = config_common.diffusion_config(
        first_stage_workdir=str(first_stage_workdir), model_channels=u.pop("model_channels"),
        channel_mult=u.pop("channel_mult"), attention_resolutions=u.pop("attention_resolutions"),
    )  # fmt: skip
    c.model.update(u)
    c.conditioning_key = _conditioning_key(p, cond_target)
    kind = _set_condition(c, cond_target, cond_params, c.conditioning_key, release)
    c.diffusion.update(
        beta_schedule=str(p.get("beta_schedule", "linear")), timesteps=int(p.get("timesteps", 1000)),
        linear_start=float(p.get("linear_start", 1e-4)), linear_end=float(p.get("linear_end", 2e-2)),
        parameterization=str(p.get("parameterization", "eps")), loss_type=str(p.get("loss_type", "l2")),
        scale_factor=float(p.get("scale_factor", 1.0)), scale_by_std=bool(p.get("scale_by_std", False)),
    )  # fmt: skip
    c.ema.decay = 0.9999 if p.get("use_ema", True) else 0.0
    if release.base_learning_rate is not None:
        c.optim.base_learning_rate = release.base_learning_rate
    factor = 2 ** (len(fs_config.model.ch_mult) - 1)
    size = int(p.get("image_size", unet.get("image_size", 64))) * factor
    c.data.update(image_size=size, resize=size, eval_split="validation")
    c.data.name = _dataset(release, _DATASET_BY_CONDITION.get(kind, c.data.name))
    _check_unet_channels(unet, c, fs_config, kind)
    with c.unlocked():
        c.imported_from = release.source
    return c, fs_config


def _check_unet_channels(unet: dict, c, fs_config, kind: str) -> None:
    """The YAML's in/out channels and context width are those the run derives from its
    first stage and condition (a mismatch would only show as a shape error later)."""
    latent = fs_config.model.embed_dim
    extra = {"low_res": 3, "inpaint": latent + 1}.get(kind, 0)
    if kind == "semantic":
        extra = c.data.condition.rescaler["out_channels"]
    want = {"in_channels": latent + extra, "out_channels": latent}
    for key, value in want.items():
        if key in unet and int(unet[key]) != value:
            raise UserError(
                f"unet_config {key}={unet[key]} but the first stage's {latent} latent channels "
                f"with a {kind!r} condition make {value}"
            )
    context = unet.get("context_dim")
    if c.conditioning_key == "crossattn" and context not in (None, c.cond.embed_dim):
        raise UserError(
            f"unet_config context_dim={context} but the cond stage's embeddings are "
            f"{c.cond.embed_dim} wide"
        )
