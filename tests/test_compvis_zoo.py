"""The CompVis model zoo's releases in: tiny random `model.ckpt` files in each release's
layout (Lightning's state_dict: first_stage_model.*, model.diffusion_model.*, LitEma's
model_ema.* copies, cond_stage_model.*, the schedule's buffers) with tiny YAMLs of the
release format, imported by `ldm_jax.import_ldm` and sampled by `ldm_jax.sample`; the
BERTEmbedder against x-transformers 0.8 (the module tree the release vendored), the
ClassEmbedder's rows, and the YAML -> config mapping against the project's experiment
files for the real releases' settings.

The UNet and autoencoder tensors are written with ldm_jax's CompVis name tables, which
tests/test_interop_*.py check against diffusers' modules; here they are a round trip
that also checks which copy (EMA or not) the import takes.
"""

import jax
import numpy as np
import pytest
import yaml
from flax import linen as nn
from helpers import assert_all_refused, assert_trees_identical

from ldm_jax.interop import cond_stage_weights, unet_weights, vae_weights
from ldm_jax.models import autoencoder, conditioning, unet_configs

torch = pytest.importorskip("torch", reason="test-only reference: pip install torch==2.13.0")

MODULES = "ldm.modules.encoders.modules."
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
LDM_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"
# Tiny first stages of the releases' ddconfig layout: f=2, GroupNorm(32) as released.
_DD = dict(resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1,
           dropout=0.0)  # fmt: skip
KL = dict(embed_dim=4, ddconfig=dict(_DD, double_z=True, z_channels=4, attn_resolutions=[8]))
VQ = dict(embed_dim=3, n_embed=16, ddconfig=dict(_DD, double_z=False, z_channels=3, attn_resolutions=[]))  # fmt: skip
UNET = dict(image_size=8, model_channels=32, attention_resolutions=[2], num_res_blocks=1,
            channel_mult=[1, 2], num_head_channels=32)  # fmt: skip
SPATIAL = dict(use_spatial_transformer=True, transformer_depth=1, context_dim=32)
STEPS = 2


def _random(shape, rng):
    return (0.05 * rng.standard_normal(shape)).astype(np.float32)


def _random_params(model, *inputs, seed=0, **kwargs):
    """Random params of `model` (by eval_shape: nothing is initialised or compiled)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda *x: model.init(jax.random.PRNGKey(0), *x, **kwargs), *inputs)
    return jax.tree.map(lambda s: _random(s.shape, rng), nn.unbox(shapes["params"]))


def _spec(shape, dtype=np.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _first_stage(target: str, fs: dict):
    kind = "kl" if target.endswith("AutoencoderKL") else "vq"
    cfg = dict(fs["ddconfig"], type=kind, embed_dim=fs["embed_dim"], n_embed=fs.get("n_embed", 0))
    model = autoencoder.from_config(cfg)
    kw = {"sample_posterior": False} if kind == "kl" else {}
    return model, _random_params(model, _spec((1, 16, 16, 3)), seed=1, **kw)


def _unet(params: dict, context_dim=None):
    keys = set(unet_configs.UNET_KEYS)
    model = unet_configs.from_config({k: v for k, v in params.items() if k in keys})
    x, t = _spec((1, 8, 8, model.in_channels)), _spec((1,))
    ctx = None if context_dim is None else _spec((1, 1, context_dim))
    return model, x, t, ctx


def _unet_tensors(unet: dict, ema: bool, seed: int) -> tuple[dict, dict]:
    """(model.diffusion_model.* and, with `ema`, LitEma's model_ema.* tensors of random
    weights, the EMA params), the EMA copy distinct from the trained one."""
    model, x, t, ctx = _unet(unet, unet.get("context_dim"))
    trained = _random_params(model, x, t, ctx, seed=seed)
    tensors = unet_weights.unet_to_compvis(trained, model)
    if not ema:
        return tensors, trained
    averaged = _random_params(model, x, t, ctx, seed=seed + 1)
    for name, value in unet_weights.unet_to_compvis(averaged, model).items():
        # LitEma names the copy of `diffusion_model.a.b` "diffusion_modelab"
        tensors["model_ema." + name.removeprefix("model.").replace(".", "")] = value
    tensors |= {"model_ema.decay": np.float32(0.9999), "model_ema.num_updates": np.int32(7)}
    return tensors, averaged


def _save(path, tensors: dict) -> str:
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
    torch.save({"state_dict": state, "global_step": 7, "epoch": 1}, path)
    return str(path)


def _write_yaml(path, model: dict, data=None) -> str:
    path.write_text(yaml.safe_dump({"model": model, **({"data": data} if data else {})}))
    return str(path)


def _ldm_yaml(unet: dict, fs_target: str, fs: dict, cond, **params) -> dict:
    fs_params = dict(fs, lossconfig={"target": "torch.nn.Identity"})
    return {
        "base_learning_rate": 2.0e-06,
        "target": LDM_TARGET,
        "params": {
            "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000,
            "first_stage_key": "image", "image_size": 8, "monitor": "val/loss",
            **params,
            "unet_config": {"target": UNET_TARGET, "params": unet},
            "first_stage_config": {"target": fs_target, "params": fs_params},
            "cond_stage_config": cond,
        },
    }  # fmt: skip


def _schedule_buffers(p: dict) -> dict:
    betas = np.linspace(p["linear_start"] ** 0.5, p["linear_end"] ** 0.5, 1000) ** 2
    return {"betas": betas, "alphas_cumprod": np.cumprod(1 - betas)}


def write_ldm(root, name, model_yaml: dict, cond_tensors=None, ema=True, data=None):
    """A release folder root/name with config.yaml and model.ckpt: -> (ckpt, yaml, the
    UNet params the import must take, first stage params)."""
    folder = root / name
    folder.mkdir()
    p = model_yaml["params"]
    fs = p["first_stage_config"]
    fs_model, fs_params = _first_stage(fs["target"], fs["params"])
    tensors, unet_params = _unet_tensors(p["unet_config"]["params"], ema, seed=3)
    tensors |= vae_weights.vae_to_compvis(fs_params, fs_model)  # first_stage_model.*
    tensors |= _schedule_buffers(p) | (cond_tensors or {})
    ckpt = _save(folder / "model.ckpt", tensors)
    return ckpt, _write_yaml(folder / "config.yaml", model_yaml, data), unet_params, fs_params


def _import(tmp_path_factory, release, name):
    from ldm_jax import import_ldm

    workdir = tmp_path_factory.mktemp("imported") / name
    import_ldm.main([f"--checkpoint={release[0]}", f"--config={release[1]}", f"--workdir={workdir}"])  # fmt: skip
    return workdir


def _sample(workdir, out, *flags):
    from ldm_jax import sample

    sample.main([f"--workdir={workdir}", "--num_per_condition=1", f"--steps={STEPS}",
                 f"--out={out}", *flags])  # fmt: skip
    images = np.load(out / "samples.npz")["images"]
    assert (out / "samples.png").is_file() and images.dtype == np.uint8
    return images


# ----- release files ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


def _bert(n_embed, depth, vocab, length, seed):
    """The vendored x-transformers BERTEmbedder trunk with random weights (torch)."""
    xt = pytest.importorskip("x_transformers", reason="test-only reference: pip install x-transformers==0.8.4")  # fmt: skip
    torch.manual_seed(seed)
    wrapper = xt.TransformerWrapper(num_tokens=vocab, max_seq_len=length,
                                    attn_layers=xt.Encoder(dim=n_embed, depth=depth)).eval()  # fmt: skip
    with torch.no_grad():
        for p in wrapper.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return wrapper


def _bert_tensors(wrapper) -> dict:
    return {"cond_stage_model.transformer." + k: v.numpy().copy() for k, v in wrapper.state_dict().items()}  # fmt: skip


@pytest.fixture(scope="module")
def uncond_release(zoo):
    """celeba256's layout: VQModelInterface first stage, AttentionBlock UNet, EMA copies."""
    unet = dict(UNET, in_channels=3, out_channels=3)
    model = _ldm_yaml(unet, "ldm.models.autoencoder.VQModelInterface", VQ, "__is_unconditional__",
                      channels=3, cond_stage_key="class_label", concat_mode=False)  # fmt: skip
    return write_ldm(zoo, "celeba256", model)


@pytest.fixture(scope="module")
def class_release(zoo):
    """cin256-v2's layout: 1001 ClassEmbedder rows (the last the null class), no EMA."""
    unet = dict(UNET, in_channels=3, out_channels=3, num_heads=1, num_head_channels=-1, **SPATIAL)
    cond = {"target": MODULES + "ClassEmbedder", "params": {"n_classes": 1001, "embed_dim": 32, "key": "class_label"}}  # fmt: skip
    model = _ldm_yaml(unet, "ldm.models.autoencoder.VQModelInterface", VQ, cond, channels=3,
                      cond_stage_key="class_label", conditioning_key="crossattn",
                      cond_stage_trainable=True, use_ema=False)  # fmt: skip
    table = _random((1001, 32), np.random.default_rng(5))
    return (*write_ldm(zoo, "cin256-v2", model, {"cond_stage_model.embedding.weight": table}, ema=False), table)  # fmt: skip


@pytest.fixture(scope="module")
def text_release(zoo):
    """txt2img-1p4B's layout: KL-f first stage, BERTEmbedder (WordPiece, 77 tokens)."""
    unet = dict(UNET, in_channels=4, out_channels=4, num_heads=2, num_head_channels=-1, legacy=False, **SPATIAL)  # fmt: skip
    cond = {"target": MODULES + "BERTEmbedder", "params": {"n_embed": 32, "n_layer": 1}}
    model = _ldm_yaml(unet, "ldm.models.autoencoder.AutoencoderKL", KL, cond, channels=4,
                      linear_start=0.00085, linear_end=0.012, cond_stage_key="caption",
                      conditioning_key="crossattn", cond_stage_trainable=True,
                      scale_factor=0.18215, use_ema=False)  # fmt: skip
    wrapper = _bert(32, 1, 30522, 77, seed=0)
    return (*write_ldm(zoo, "txt2img", model, _bert_tensors(wrapper), ema=False), wrapper)


@pytest.fixture(scope="module")
def semantic_release(zoo):
    """semantic_synthesis256's layout: SpatialRescaler (1x1 conv, no bias), concat."""
    unet = dict(UNET, in_channels=6, out_channels=3, num_heads=8, num_head_channels=-1)
    cond = {"target": MODULES + "SpatialRescaler", "params": {"n_stages": 1, "in_channels": 5, "out_channels": 3}}  # fmt: skip
    model = _ldm_yaml(unet, "ldm.models.autoencoder.VQModelInterface", VQ, cond, channels=3,
                      cond_stage_key="segmentation", concat_mode=True, cond_stage_trainable=True,
                      loss_type="l1", linear_end=0.0205)  # fmt: skip
    mapper = _random((3, 5, 1, 1), np.random.default_rng(6))
    return (*write_ldm(zoo, "semantic", model, {"cond_stage_model.channel_mapper.weight": mapper}), mapper)  # fmt: skip


@pytest.fixture(scope="module")
def layout_release(zoo):
    """layout2img-openimages256's layout: BERTEmbedder over 92 layout tokens of 8192."""
    unet = dict(UNET, in_channels=3, out_channels=3, **SPATIAL)
    cond = {"target": MODULES + "BERTEmbedder",
            "params": {"n_embed": 32, "n_layer": 1, "vocab_size": 8192, "max_seq_len": 92, "use_tokenizer": False}}  # fmt: skip
    model = _ldm_yaml(unet, "ldm.models.autoencoder.VQModelInterface", VQ, cond, channels=3,
                      cond_stage_key="coordinates_bbox", conditioning_key="crossattn",
                      cond_stage_trainable=True, loss_type="l1", linear_end=0.0205)  # fmt: skip
    return write_ldm(zoo, "layout", model, _bert_tensors(_bert(32, 1, 8192, 92, seed=1)))


def _first_stage_release(zoo, name, target, fs, loss_target, extra_loss):
    folder = zoo / name
    folder.mkdir()
    model, params = _first_stage(target, fs)
    tensors = vae_weights.vae_to_compvis(params, model, prefix="") | extra_loss
    loss = {"target": loss_target, "params": {"disc_start": 11, "disc_weight": 0.75}}
    yaml_path = _write_yaml(folder / "config.yaml", {
        "base_learning_rate": 4.5e-6, "target": target, "params": dict(fs, lossconfig=loss)})  # fmt: skip
    return _save(folder / "model.ckpt", tensors), yaml_path, params


@pytest.fixture(scope="module")
def kl_release(zoo):
    """A kl-f* first stage: its loss's logvar and discriminator tensors beside it."""
    loss = {"loss.logvar": np.float32(0.25), "loss.discriminator.main.0.weight": np.ones((8, 3, 4, 4), np.float32)}  # fmt: skip
    return _first_stage_release(zoo, "kl-f2", "ldm.models.autoencoder.AutoencoderKL", KL,
                                "ldm.modules.losses.LPIPSWithDiscriminator", loss)  # fmt: skip


@pytest.fixture(scope="module")
def vq_release(zoo):
    """A vq-f4-noattn-like first stage (no attention at all)."""
    fs = dict(VQ, ddconfig=dict(VQ["ddconfig"], attn_type="none"))
    loss = {"loss.perceptual_loss.lin0.model.1.weight": np.ones((1, 64, 1, 1), np.float32)}
    return _first_stage_release(zoo, "vq-f2-noattn", "ldm.models.autoencoder.VQModel", fs,
                                "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator", loss)  # fmt: skip


# ----- equivalence on tiny random weights ------------------------------------------------
def test_bert_embedder_equals_x_transformers():
    """The release's BERTEmbedder trunk (x-transformers 0.8 as vendored) and ldm_jax's
    TransformerEncoder on its converted tensors give the same context [B, L, d]."""
    wrapper = _bert(32, 2, 100, 12, seed=2)
    module = conditioning.TransformerEncoder(n_embed=32, n_layer=2, vocab_size=100, max_seq_len=12)
    params = cond_stage_weights.transformer_from_compvis(_bert_tensors(wrapper), module)
    tokens = np.random.default_rng(0).integers(0, 100, (3, 12))
    with torch.no_grad():
        want = wrapper(torch.from_numpy(tokens), return_embeddings=True).numpy()
    got = np.asarray(module.apply(params, tokens.astype(np.int32)))
    assert got.shape == (3, 12, 32)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_class_embedder_rows():
    """1001 rows: 1000 classes and the learned null class, ldm_jax's null row as it is;
    1000 rows: the classes, with a zero null row."""
    module = conditioning.ClassEmbedder(n_classes=1000, embed_dim=8)
    table = _random((1001, 8), np.random.default_rng(0))
    for rows in (1001, 1000):
        state = {"cond_stage_model.embedding.weight": table[:rows]}
        params = cond_stage_weights.class_table_from_compvis(state, module)
        out = np.asarray(module.apply(params, np.array([0, 999, module.null_class])))
        np.testing.assert_array_equal(out[:2, 0], table[[0, 999]])
        np.testing.assert_array_equal(out[2, 0], table[1000] if rows == 1001 else 0.0)


# ----- import, then sample, each kind of release ------------------------------------------
@pytest.fixture(scope="module")
def uncond_run(uncond_release, tmp_path_factory):
    return _import(tmp_path_factory, uncond_release, "celeba256")


@pytest.mark.slow
def test_unconditional_release_takes_the_ema_weights_and_samples(
    uncond_release, uncond_run, tmp_path
):
    from ldm_jax.training.restore import load_run

    _, _, ema_params, fs_params = uncond_release
    config, task, state, step = load_run(uncond_run, stage="diffusion")
    assert step == 0 and config.cond.kind == "none" and config.conditioning_key is None
    assert_trees_identical(jax.device_get(state.ema_params), ema_params)
    assert_trees_identical(jax.device_get(state.params["unet"]), ema_params)
    assert_trees_identical(jax.device_get(task.first_stage.load_params()), fs_params)
    assert float(state.scale_factor) == 1.0 and config.data.image_size == 16
    images = _sample(uncond_run, tmp_path / "out")
    assert images.shape == (1, 16, 16, 3) and images.std() > 0


@pytest.mark.slow
def test_class_release_keeps_its_null_row_and_samples_with_guidance(class_release, tmp_path_factory, tmp_path):  # fmt: skip
    from ldm_jax.training.restore import load_run

    workdir = _import(tmp_path_factory, class_release, "cin256-v2")
    config, task, state, _ = load_run(workdir, stage="diffusion")
    assert (config.cond.kind, config.cond.n_classes, task.cond.null_class) == ("class", 1000, 1000)
    table = jax.device_get(state.params["cond"]["embedding"]["embedding"])
    np.testing.assert_array_equal(table, class_release[4])
    assert_trees_identical(jax.device_get(state.ema_params), class_release[2])  # no EMA in file
    images = _sample(workdir, tmp_path / "out", "--labels=1,999", "--guidance=3.0")
    assert images.shape == (2, 16, 16, 3)


@pytest.mark.slow
def test_text_release_embeds_prompts_as_the_reference_and_samples(text_release, tmp_path_factory, tmp_path):  # fmt: skip
    """The run's text context of a prompt (its WordPiece ids, padding attended over as
    the BERTEmbedder does) equals x-transformers' on the same ids."""
    from ldm_jax.training.restore import load_run

    workdir = _import(tmp_path_factory, text_release, "txt2img")
    config, task, state, _ = load_run(workdir, stage="diffusion")
    assert config.cond.kind == "text" and config.cond.attend_padding
    assert float(state.scale_factor) == pytest.approx(0.18215)
    inputs = task.cond.encode_prompts(["a painting of a squirrel eating a burger", ""])
    context, _ = task.cond.embed(state.params["cond"], {}, inputs)
    with torch.no_grad():
        ids = torch.from_numpy(inputs["tokens"].astype(np.int64))
        want = text_release[4](ids, return_embeddings=True).numpy()
    np.testing.assert_allclose(np.asarray(context), want, atol=2e-5, rtol=0)
    images = _sample(workdir, tmp_path / "out", "--prompts", "a red car")
    assert images.shape == (1, 16, 16, 3)


@pytest.mark.slow
def test_semantic_release_imports_its_rescaler_and_samples_from_a_map(semantic_release, tmp_path_factory, tmp_path):  # fmt: skip
    from PIL import Image

    from ldm_jax.training.restore import load_run

    workdir = _import(tmp_path_factory, semantic_release, "semantic")
    config, _, state, _ = load_run(workdir, stage="diffusion")
    assert config.data.condition.kind == "semantic" and config.conditioning_key == "concat"
    mapper = jax.device_get(state.params["dense"]["channel_mapper"])
    np.testing.assert_array_equal(mapper, semantic_release[4][:, :, 0, 0].T)
    ids = np.repeat(np.arange(4, dtype=np.uint8), 64).reshape(16, 16)
    Image.fromarray(ids).save(tmp_path / "map.png")
    images = _sample(workdir, tmp_path / "out", f"--cond_image={tmp_path / 'map.png'}")
    assert images.shape[1:] == (16, 16, 3)


@pytest.mark.slow
def test_layout_release_samples_from_a_layout(layout_release, tmp_path_factory, tmp_path):
    from ldm_jax.training.restore import load_run

    workdir = _import(tmp_path_factory, layout_release, "layout")
    config, task, _, _ = load_run(workdir, stage="diffusion")
    assert config.cond.kind == "layout" and task.cond.tokens.length == 90
    images = _sample(workdir, tmp_path / "out", "--layout", "3:0.1,0.1,0.4,0.5;7:0.5,0.4,0.9,0.9")
    assert images.shape == (1, 16, 16, 3)


# ----- first stages ----------------------------------------------------------------------
@pytest.mark.slow
def test_kl_first_stage_is_an_autoencoder_run_that_evaluates(kl_release, data_dir, tmp_path_factory):  # fmt: skip
    from ldm_jax import evaluate
    from ldm_jax.training.restore import load_run

    workdir = _import(tmp_path_factory, kl_release, "kl-f2")
    config, _, state, step = load_run(workdir, stage="autoencoder")
    assert step == 0 and config.model.type == "kl" and config.loss.disc_start == 11
    assert_trees_identical(jax.device_get(state.gen_params["model"]), kl_release[2])
    assert float(state.gen_params["logvar"]) == 0.25  # the release's loss.logvar
    metrics = [f"--metric={m}" for m in ("psnr", "ssim", "lpips")]
    report = evaluate.main([f"--workdir={workdir}", *metrics, "--dataset=photo_crops",
                            f"--data_dir={data_dir}", "--split=test", "--num_samples=8",
                            "--batch_size=8", "--config.data.image_size=16",
                            "--config.data.resize=16"])  # fmt: skip
    assert all(np.isfinite(report["results"][m]) for m in ("psnr", "ssim", "lpips"))


def test_vq_first_stage_is_a_diffusion_run_first_stage(vq_release, tmp_path_factory):
    import ml_collections

    from ldm_jax.training.first_stage import FirstStage

    workdir = _import(tmp_path_factory, vq_release, "vq-f2-noattn")
    first_stage = FirstStage(ml_collections.ConfigDict(dict(workdir=str(workdir), step=-1)))
    assert first_stage.model_cfg.attn_type == "none" and first_stage.regularizer == "vq"
    assert_trees_identical(jax.device_get(first_stage.load_params()), vq_release[2])


@pytest.fixture(scope="module")
def sr_release(zoo):
    """bsr_sr's layout: no cond stage weights (torch.nn.Identity), the low-res image
    concatenated to z_t at the latent grid (downscale_f equal to the first stage's f)."""
    unet = dict(UNET, in_channels=6, out_channels=3, num_head_channels=32)
    model = _ldm_yaml(unet, "ldm.models.autoencoder.VQModelInterface", VQ, {"target": "torch.nn.Identity"},
                      channels=3, cond_stage_key="LR_image", concat_mode=True, linear_end=0.0155)  # fmt: skip
    data = {"params": {"train": {"target": "ldm.data.openimages.SuperresOpenImagesAdvancedTrain",
                                 "params": {"size": 16, "degradation": "bsrgan_light", "downscale_f": 2}}}}  # fmt: skip
    return write_ldm(zoo, "bsr_sr", model, data=data)


@pytest.fixture(scope="module")
def inpaint_release(zoo):
    """inpainting_big's layout: the cond stage is the first stage (VQ, no attention),
    which the file holds a second time under cond_stage_model.*; the UNet takes z_t,
    E(masked image) and the mask (3 + 3 + 1 channels)."""
    fs = dict(VQ, ddconfig=dict(VQ["ddconfig"], attn_type="none"))
    unet = dict(UNET, in_channels=7, out_channels=3, num_heads=8, num_head_channels=-1, resblock_updown=True)  # fmt: skip
    model = _ldm_yaml(unet, "ldm.models.autoencoder.VQModelInterface", fs, "__is_first_stage__",
                      channels=3, cond_stage_key="masked_image", concat_mode=True, loss_type="l1")  # fmt: skip
    fs_model, fs_params = _first_stage(model["params"]["first_stage_config"]["target"], fs)
    copy = vae_weights.vae_to_compvis(fs_params, fs_model, prefix="cond_stage_model.")
    return write_ldm(zoo, "inpainting_big", model, copy)


def _photo(tmp_path, name, size, seed):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / name)
    return tmp_path / name, pixels


@pytest.mark.slow
def test_super_resolution_release_upsamples_a_low_res_image(sr_release, tmp_path_factory, tmp_path):  # fmt: skip
    from ldm_jax.training.restore import load_run

    workdir = _import(tmp_path_factory, sr_release, "bsr_sr")
    config, _, state, _ = load_run(workdir, stage="diffusion")
    condition = config.data.condition
    assert (condition.kind, condition.factor, condition.degradation) == ("low_res", 2, "bsr_light")
    assert_trees_identical(jax.device_get(state.ema_params), sr_release[2])
    low, pixels = _photo(tmp_path, "low.png", 8, seed=4)
    out = tmp_path / "out"
    images = _sample(workdir, out, f"--cond_image={low}")
    assert images.shape == (1, 16, 16, 3)  # 8 px x2
    shown = np.load(out / "samples.npz")["condition"][0]  # the low-res input, upscaled x2
    np.testing.assert_array_equal(shown, pixels.repeat(2, 0).repeat(2, 1))


@pytest.mark.slow
def test_inpainting_release_imports_beside_its_first_stage_copy_and_fills_a_mask(inpaint_release, tmp_path_factory, tmp_path):  # fmt: skip
    from PIL import Image

    from ldm_jax.training.restore import stored_config

    workdir = _import(tmp_path_factory, inpaint_release, "inpainting_big")
    config = stored_config(workdir)
    assert config["data"]["condition"]["kind"] == "inpaint" and config["model"]["resblock_updown"]
    image, pixels = _photo(tmp_path, "image.png", 16, seed=5)
    fill = np.zeros((16, 16), bool)
    fill[4:12, 2:10] = True
    Image.fromarray(fill.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    images = _sample(workdir, tmp_path / "out", f"--cond_image={image}", f"--mask={tmp_path / 'mask.png'}")  # fmt: skip
    assert images.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(images[0][~fill], pixels[~fill])  # kept outside the mask
    assert np.any(images[0][fill] != pixels[fill])


# ----- the YAML -> config mapping on the real releases' settings --------------------------
def _real_vq(n_embed=8192, z=3, ch_mult=(1, 2, 4), attn=(), **dd):
    ddconfig = dict(double_z=False, z_channels=z, resolution=256, in_channels=3, out_ch=3,
                    ch=128, ch_mult=list(ch_mult), num_res_blocks=2, attn_resolutions=list(attn),
                    dropout=0.0, **dd)  # fmt: skip
    return "ldm.models.autoencoder.VQModelInterface", dict(embed_dim=z, n_embed=n_embed, ddconfig=ddconfig)  # fmt: skip


KL_F8 = ("ldm.models.autoencoder.AutoencoderKL",
         dict(embed_dim=4, ddconfig=dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3,
                                         ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)))  # fmt: skip
VQ4_UNCOND = dict(image_size=64, in_channels=3, out_channels=3, model_channels=224,
                  attention_resolutions=[8, 4, 2], num_res_blocks=2, channel_mult=[1, 2, 3, 4],
                  num_head_channels=32)  # fmt: skip
# release -> (experiment file, unet_config.params, first stage, cond_stage_config, LatentDiffusion params, data)
REAL = {
    "celeba256": ("celebahq_ldm_vq4", VQ4_UNCOND, _real_vq(), "__is_unconditional__",
                  dict(image_size=64, concat_mode=False), "ldm.data.faceshq.CelebAHQTrain"),
    "lsun_churches256": ("lsun_churches_ldm_kl8",
                         dict(image_size=32, in_channels=4, out_channels=4, model_channels=192,
                              attention_resolutions=[1, 2, 4, 8], num_res_blocks=2,
                              channel_mult=[1, 2, 2, 4, 4], num_heads=8, use_scale_shift_norm=True,
                              resblock_updown=True),
                         KL_F8, "__is_unconditional__",
                         dict(image_size=32, linear_end=0.0155, loss_type="l1", scale_by_std=True,
                              concat_mode=False), "ldm.data.lsun.LSUNChurchesTrain"),
    "cin256-v2": ("cin256_ldm4_g",
                  dict(image_size=64, in_channels=3, out_channels=3, model_channels=192,
                       attention_resolutions=[8, 4, 2], num_res_blocks=2, channel_mult=[1, 2, 3, 5],
                       num_heads=1, use_spatial_transformer=True, transformer_depth=1, context_dim=512),
                  _real_vq(), {"target": MODULES + "ClassEmbedder", "params": {"n_classes": 1001, "embed_dim": 512}},
                  dict(image_size=64, conditioning_key="crossattn", use_ema=False), None),
    "cin256": ("cin_ldm_vq_f8",
               dict(image_size=32, in_channels=4, out_channels=4, model_channels=256,
                    attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4],
                    num_head_channels=32, use_spatial_transformer=True, transformer_depth=1, context_dim=512),
               _real_vq(16384, 4, (1, 2, 2, 4), (32,)), {"target": MODULES + "ClassEmbedder", "params": {"embed_dim": 512}},
               dict(image_size=32, conditioning_key="crossattn"), "ldm.data.imagenet.ImageNetTrain"),
    "txt2img-1p4B": ("txt2img_ldm_kl8",
                     dict(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                          attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
                          num_heads=8, use_spatial_transformer=True, transformer_depth=1,
                          context_dim=1280, use_checkpoint=True, legacy=False),
                     KL_F8, {"target": MODULES + "BERTEmbedder", "params": {"n_embed": 1280, "n_layer": 32}},
                     dict(image_size=32, linear_start=0.00085, linear_end=0.012, conditioning_key="crossattn",
                          scale_factor=0.18215, use_ema=False), None),
    "bsr_sr": ("bsr_sr",
               dict(image_size=64, in_channels=6, out_channels=3, model_channels=160,
                    attention_resolutions=[16, 8], num_res_blocks=2, channel_mult=[1, 2, 2, 4],
                    num_head_channels=32),
               _real_vq(), "torch.nn.Identity", dict(image_size=64, linear_end=0.0155, concat_mode=True),
               "ldm.data.openimages.SuperresOpenImagesAdvancedTrain"),
    "inpainting_big": ("inpainting_big",
                       dict(image_size=64, in_channels=7, out_channels=3, model_channels=256,
                            attention_resolutions=[8, 4, 2], num_res_blocks=2, channel_mult=[1, 2, 3, 4],
                            num_heads=8, resblock_updown=True),
                       _real_vq(attn_type="none"), "__is_first_stage__",
                       dict(image_size=64, linear_end=0.0205, loss_type="l1", concat_mode=True), None),
    "semantic_synthesis256": ("semantic_synthesis256",
                              dict(image_size=64, in_channels=6, out_channels=3, model_channels=128,
                                   attention_resolutions=[32, 16, 8], num_res_blocks=2, channel_mult=[1, 4, 8],
                                   num_heads=8),
                              _real_vq(), {"target": MODULES + "SpatialRescaler",
                                           "params": {"n_stages": 2, "in_channels": 182, "out_channels": 3}},
                              dict(image_size=64, linear_end=0.0205, loss_type="l1", concat_mode=True), None),
    "layout2img-openimages256": ("layout2img_openimages256",
                                 dict(image_size=64, in_channels=3, out_channels=3, model_channels=128,
                                      attention_resolutions=[8, 4, 2], num_res_blocks=2, channel_mult=[1, 2, 3, 4],
                                      num_head_channels=32, use_spatial_transformer=True, transformer_depth=3,
                                      context_dim=512),
                                 _real_vq(), {"target": MODULES + "BERTEmbedder",
                                              "params": {"n_embed": 512, "n_layer": 16, "vocab_size": 8192,
                                                         "max_seq_len": 92, "use_tokenizer": False}},
                                 dict(image_size=64, linear_end=0.0205, loss_type="l1", conditioning_key="crossattn"),
                                 "ldm.data.openimages.OpenImagesBBoxTrain"),
}  # fmt: skip
_COND_KEYS = ("kind", "n_classes", "embed_dim", "n_layer", "max_length", "vocab_size",
              "max_objects", "heads", "dim_head")  # fmt: skip
_CONDITION_KEYS = ("kind", "factor", "degradation", "num_classes", "rescaler")


def _real_release(tmp_path, name):
    from ldm_jax.training import compvis_configs

    _, unet, (fs_target, fs), cond, params, data = REAL[name]
    model = _ldm_yaml(unet, fs_target, fs, cond, **params)
    data = {"params": {"train": {"target": data, "params": {"degradation": "bsrgan_light", "downscale_f": 4}}}} if data else None  # fmt: skip
    return compvis_configs.read_release(_write_yaml(tmp_path / f"{name}.yaml", model, data))


@pytest.mark.parametrize("name", sorted(REAL))
def test_release_yaml_maps_onto_the_experiment_file(name, tmp_path):
    """The UNet (heads included), schedule, conditioning and first stage that an imported
    release's run gets are those of the project's experiment file for the same model."""
    from ldm_jax.config_loader import load_config
    from ldm_jax.training import compvis_configs

    got, fs = compvis_configs.diffusion_run_config(_real_release(tmp_path, name), tmp_path / "fs")
    want = load_config(f"configs/diffusion/{REAL[name][0]}.py", lock=False)
    assert got.model.to_dict() == want.model.to_dict()
    for key in ("beta_schedule", "timesteps", "linear_start", "linear_end", "parameterization",
                "loss_type", "scale_factor", "scale_by_std"):  # fmt: skip
        assert got.diffusion[key] == want.diffusion[key], key
    assert got.conditioning_key == want.conditioning_key
    assert {k: got.cond.get(k) for k in _COND_KEYS if k in want.cond} == {
        k: want.cond[k] for k in _COND_KEYS if k in want.cond
    } or name.startswith("layout")  # its class count is OpenImages', the experiment's COCO's
    condition = lambda c: {k: c.data.condition.to_dict()[k] for k in _CONDITION_KEYS}  # noqa: E731
    assert condition(got) == condition(want)
    assert got.ema.decay == want.ema.decay and got.data.image_size == want.data.image_size
    fs_want = load_config(f"configs/autoencoder/{want.first_stage.workdir.split('/')[-1]}.py")
    assert fs.model.to_dict() == fs_want.model.to_dict()
    if not name.startswith("layout"):  # the experiment reads COCO's boxes
        assert got.data.name == want.data.name


def test_first_stage_yaml_maps_onto_the_experiment_file(tmp_path):
    from ldm_jax.config_loader import load_config
    from ldm_jax.training import compvis_configs

    loss = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
            "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 11,
                       "disc_weight": 0.75, "codebook_weight": 1.0}}  # fmt: skip
    target, fs = _real_vq(attn_type="none")
    model = {"base_learning_rate": 4.5e-6, "target": "ldm.models.autoencoder.VQModel",
             "params": dict(fs, lossconfig=loss)}  # fmt: skip
    release = compvis_configs.read_release(_write_yaml(tmp_path / "vq.yaml", model))
    got = compvis_configs.autoencoder_run_config(release)
    want = load_config("configs/autoencoder/vq_f4_noattn.py")
    assert got.model.to_dict() == want.model.to_dict()
    assert got.loss.to_dict() == want.loss.to_dict() and got.data.name == want.data.name


# ----- bad input ----------------------------------------------------------------------------
def _edited_yaml(path, source, edit) -> str:
    config = yaml.safe_load(open(source).read())
    edit(config["model"])
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_bad_releases_are_refused_in_one_line_and_nothing_is_written(uncond_release, tmp_path, capsys):  # fmt: skip
    from ldm_jax import import_ldm

    ckpt, good = uncond_release[:2]
    edits = {
        "target": lambda m: m.update(target="ldm.models.diffusion.ddpm.LatentUpscaleDiffusion"),
        "clip": lambda m: m["params"].update(
            cond_stage_config={"target": MODULES + "FrozenCLIPEmbedder"}
        ),  # fmt: skip
        "shape": lambda m: m["params"]["unet_config"]["params"].update(model_channels=64),
        "betas": lambda m: m["params"].update(linear_end=0.0205),
        "channels": lambda m: m["params"]["unet_config"]["params"].update(in_channels=6),
    }
    bad = {k: _edited_yaml(tmp_path / f"{k}.yaml", good, e) for k, e in edits.items()}
    existing = tmp_path / "existing"
    (existing / "checkpoints").mkdir(parents=True)
    out = tmp_path / "out"

    def argv(config, checkpoint=ckpt, workdir=out):
        return [f"--checkpoint={checkpoint}", f"--config={config}", f"--workdir={workdir}"]

    cases = [
        ("unknown model.target", argv(bad["target"]), "model.target"),
        ("a cond stage ldm_jax lacks", argv(bad["clip"]), "FrozenCLIPEmbedder"),
        ("YAML shapes that are not the tensors'", argv(bad["shape"]), "shape"),
        ("a schedule that is not the file's", argv(bad["betas"]), "betas"),
        ("UNet channels that are not the run's", argv(bad["channels"]), "in_channels=6"),
        ("a workdir with checkpoints", argv(good, workdir=existing), "exists"),
        ("a missing checkpoint", argv(good, checkpoint=tmp_path / "none.ckpt"), "does not exist"),
        ("a missing YAML", argv(tmp_path / "none.yaml"), "config.yaml"),
    ]
    assert_all_refused(import_ldm.main, cases, capsys, out, {"existing": existing})
