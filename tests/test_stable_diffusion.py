"""Stable Diffusion weights in and out: a tiny random SD-1-layout single file (with its
CompVis YAML) is imported as a run, sampled from the command line, checked image for
image against diffusers' StableDiffusionPipeline on our diffusers export, and exported to
every layout and read back to identical arrays."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from helpers import assert_trees_identical, jit_init, noisy_params
from toy import SD_CLIP, SD_DDCONFIG, SD_UNET, write_tiny_sd1

from ldm_jax.errors import UserError
from ldm_jax.interop import clip_weights, tensor_files, unet_weights, vae_weights
from ldm_jax.interop import stable_diffusion as sd
from ldm_jax.models import autoencoder, clip, unet_configs
from ldm_jax.training import sd_runs

# The tiny SD-1-shaped release of tests/toy.py (its UNet, VAE and CLIP settings).
UNET, DDCONFIG, CLIP = SD_UNET, SD_DDCONFIG, SD_CLIP
_init, _noisy = jit_init, noisy_params


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    """(checkpoint path, YAML path, {unet, vae, clip} params written into it)."""
    return write_tiny_sd1(tmp_path_factory.mktemp("sd1"))


# The tests on this imported run, and the SD-2 file test, are marked slow: each imports a
# whole SD file, and most sample it or compare with diffusers' pipelines.
@pytest.fixture(scope="module")
def imported(sd_file, tmp_path_factory):
    from ldm_jax import import_sd

    path, yaml_path, _ = sd_file
    workdir = tmp_path_factory.mktemp("imported") / "run"
    import_sd.main([f"--checkpoint={path}", f"--original_config={yaml_path}",
                    f"--workdir={workdir}", "--image_size=32"])  # fmt: skip
    return workdir


@pytest.fixture(scope="module")
def imported_run(imported):
    """load_run(imported, stage="diffusion"): (config, task, state, step), loaded once for
    the tests that only read it (a load costs about 3 s)."""
    from ldm_jax.training.restore import load_run

    return load_run(imported, stage="diffusion")


@pytest.fixture(scope="module")
def imported_diffusers(imported, tmp_path_factory):
    """The export command's diffusers layout of `imported` (a folder), written once."""
    from ldm_jax import export

    folder = tmp_path_factory.mktemp("imported_diffusers") / "diffusers"
    export.main([f"--workdir={imported}", "--layout=diffusers", f"--out={folder}"])
    return folder


@pytest.mark.slow
def test_import_gives_a_run_with_the_files_weights(sd_file, imported, imported_run):
    _, _, params = sd_file
    config, task, state, step = imported_run
    assert step == 0 and config.cond.kind == "clip" and config.diffusion.parameterization == "eps"
    assert config.model.num_heads == 2 and config.model.num_head_channels == -1
    assert_trees_identical(jax.device_get(state.ema_params), params["unet"])
    assert_trees_identical(jax.device_get(state.params["unet"]), params["unet"])
    assert_trees_identical(jax.device_get(task.first_stage.load_params()), params["vae"])
    assert_trees_identical(task.cond.frozen_params()["text_encoder"], params["clip"])
    assert float(state.scale_factor) == pytest.approx(0.18215)
    # The import wrote the UNet's weights once and no optimizer moments; opening the run
    # made the moments (fresh AdamW) and the EMA (the weights).
    from ldm_jax.training.checkpoint import WEIGHTS_ONLY, Checkpointer

    ckpt = Checkpointer(imported / "checkpoints", keep=1, read_only=True)
    assert ckpt.read_metadata(0)[WEIGHTS_ONLY] == ["params", "scale_factor"]
    ckpt.close()
    have, fresh = jax.device_get(state.opt_state), task.tx.init(state.params)
    assert jax.tree.structure(have) == jax.tree.structure(fresh)
    for x, y in zip(jax.tree.leaves(have), jax.tree.leaves(fresh)):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    unet_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params["unet"]))
    files = (imported / "checkpoints/0/state").rglob("*")
    written = sum(f.stat().st_size for f in files if f.is_file())
    assert written < 1.1 * unet_bytes  # once, not twice (weights and EMA), nor the moments


def _export_diffusers(workdir, tmp_path):
    """The export command's diffusers layout of `workdir`, in tmp_path / "diffusers"."""
    from ldm_jax import export

    folder = tmp_path / "diffusers"
    export.main([f"--workdir={workdir}", "--layout=diffusers", f"--out={folder}"])
    return folder


def _diffusers_pipeline(pipeline: str, folder, tokenizer: str):
    """diffusers' `pipeline` class opened on our diffusers export in `folder` by its own
    loader, as a diffusers user opens it; its tokenizer pads as `tokenizer` ('sd1' /
    'sd2') and the vocabulary files beside tokenizer.json are the CLIP BPE's."""
    diffusers = pytest.importorskip("diffusers")

    from ldm_jax.models import clip_tokenizer

    pipe = getattr(diffusers, pipeline).from_pretrained(folder, safety_checker=None)
    assert pipe.tokenizer.pad_token == clip_tokenizer.PAD_TOKENS[tokenizer]
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    bpe = clip_tokenizer.tokenizer_files()
    for name in ("vocab.json", "merges.txt"):
        assert (folder / "tokenizer" / name).read_text() == (bpe / name).read_text()
    return pipe


def _pipeline_agrees(run, folder, tokenizer: str, negatives=(None,)) -> None:
    """ldm_jax's sampling of a run (`run`: load_run's config, task, state, step) and
    diffusers' StableDiffusionPipeline on our diffusers export of it in `folder` give the
    same images from the same starting latents (DDIM, 3 steps, guidance 7.5), with the
    empty prompt or each negative prompt as the guidance's unconditional branch. 3 does
    not divide the 1000 timesteps: the imported run takes diffusers' 3-step grid, where the
    reference's would refuse it."""
    torch = pytest.importorskip("torch")

    prompt = "a photo of a cat"
    pipe = _diffusers_pipeline("StableDiffusionPipeline", folder, tokenizer)
    config, task, state, _ = run
    noise = jax.random.normal(jax.random.PRNGKey(7), (2, 16, 16, 4))
    inputs = task.cond.encode_prompts([prompt] * 2)
    sampling = config.sampling.copy_and_resolve_references()
    sampling.update(dict(steps=3, guidance_scale=7.5))
    latents = torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy())
    results = []
    for negative in negatives:
        uncond = None if negative is None else task.cond.encode_prompts([negative] * 2)
        ours = task.sample(state, task.frozen_params(), inputs, jax.random.PRNGKey(0),
                           noise=noise, sampling=sampling, uncond=uncond)  # fmt: skip
        with torch.no_grad():
            theirs = pipe([prompt] * 2, num_inference_steps=3, guidance_scale=7.5,
                          latents=latents.clone(), height=32, width=32, output_type="np",
                          negative_prompt=None if negative is None else [negative] * 2).images  # fmt: skip
        got = (np.asarray(ours) + 1.0) / 2.0
        assert np.std(theirs) > 0.01
        np.testing.assert_allclose(np.clip(got, 0, 1), theirs, atol=1e-4)  # measured 5e-6 to 1e-5
        results.append(got)
    for other in results[1:]:  # a negative prompt changes the images
        assert np.max(np.abs(other - results[0])) > 1e-3


@pytest.mark.slow
def test_text_to_image_command_and_diffusers_pipeline_agree(
    imported, imported_run, imported_diffusers, tmp_path
):
    from ldm_jax import sample

    out = sample.main([f"--workdir={imported}", "--prompts", "a photo of a cat",
                       "--num_per_condition=2", "--steps=3", "--guidance=7.5",
                       f"--out={tmp_path / 'samples'}"])  # fmt: skip
    assert out["images"].shape == (2, 32, 32, 3) and (tmp_path / "samples/samples.png").is_file()
    _pipeline_agrees(
        imported_run, imported_diffusers, "sd1", negatives=(None, "blurry, low quality")
    )


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ldm_jax", "msgpack", "compvis", "diffusers"])
def test_export_imports_back_to_identical_arrays(imported, sd_file, tmp_path, layout, request):
    from ldm_jax import export

    _, _, params = sd_file
    name = {"ldm_jax": "w.safetensors", "msgpack": "w.msgpack", "compvis": "w.safetensors"}
    if layout == "diffusers":  # the same command, run once for the pipeline tests too
        out = request.getfixturevalue("imported_diffusers")
    else:
        out = tmp_path / name[layout]
        export.main([f"--workdir={imported}", f"--layout={layout}", f"--out={out}"])
    if layout in ("ldm_jax", "msgpack"):
        back = tensor_files.load_params(out)
        got = {"unet": back["unet"], "vae": back["vae"], "clip": back["text_encoder"]}
        assert json.loads(out.with_suffix(".json").read_text())["cond"]["kind"] == "clip"
    else:
        if layout == "compvis":
            model = sd.from_single_file(out, original_config=out.with_suffix(".yaml"))
        else:
            model = sd.from_diffusers(out)
        got = {"unet": model.unet_params, "vae": model.vae_params, "clip": model.clip_params}
        assert model.parameterization == "eps" and model.scale_factor == pytest.approx(0.18215)
        assert model.clip == {**CLIP, "layer_norm_eps": 1e-5} or model.clip == CLIP
    for part in ("unet", "vae", "clip"):
        assert_trees_identical(got[part], params[part])


@pytest.mark.slow
def test_bad_inputs_are_clear_errors(sd_file, imported, tmp_path):
    path, yaml_path, _ = sd_file
    with pytest.raises(UserError, match="exists: import into a new --workdir"):
        sd_runs.write_run(sd.from_single_file(path, original_config=yaml_path), imported)
    only_unet = tmp_path / "unet-only.safetensors"
    tensor_files.save_safetensors(only_unet, tensor_files.load_safetensors(path, sd.UNET_PREFIX))
    with pytest.raises(UserError, match="no SD text encoder"):
        sd.from_single_file(only_unet)
    state = tensor_files.load_safetensors(path)
    key = sd.UNET_PREFIX + "out.2.weight"
    state[key] = state[key][:, :-1]
    broken = tmp_path / "broken.safetensors"
    tensor_files.save_safetensors(broken, state)
    with pytest.raises(UserError, match="out.2.weight"):
        sd.from_single_file(broken, original_config=yaml_path)
    from ldm_jax import export

    with pytest.raises(SystemExit):
        export.main([f"--workdir={imported}", "--layout=ldm_jax", f"--out={path}"])  # exists


# ----- SD 2 style: OpenCLIP names, penultimate layer, linear projections, v-prediction -----
UNET2 = {k: v for k, v in UNET.items() if k != "num_heads"} | dict(
    num_head_channels=32, context_dim=128, use_linear_in_transformer=True
)
CLIP2 = dict(width=128, num_layers=3, num_heads=2, mlp_dim=256, vocab_size=49408,
             context_length=77, activation="gelu")  # fmt: skip


def _open_clip_names(hf: dict, prefix: str) -> dict:
    """transformers CLIP names -> OpenCLIP's (q, k, v fused into in_proj), written here
    independently of the converter under test."""
    out = {}
    for name, value in hf.items():
        name = name.removeprefix("text_model.")
        if name.startswith("encoder.layers."):
            i, part = name[len("encoder.layers.") :].split(".", 1)
            if part.startswith("self_attn.") and part.split(".")[1] in (
                "q_proj",
                "k_proj",
                "v_proj",
            ):
                continue
            part = (part.replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
                    .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj")
                    .replace("self_attn.out_proj", "attn.out_proj"))  # fmt: skip
            out[f"{prefix}transformer.resblocks.{i}.{part}"] = value
        else:
            new = {"embeddings.token_embedding.weight": "token_embedding.weight",
                   "embeddings.position_embedding.weight": "positional_embedding",
                   "final_layer_norm.weight": "ln_final.weight",
                   "final_layer_norm.bias": "ln_final.bias"}[name]  # fmt: skip
            out[prefix + new] = value
    layers = {k.split(".")[3] for k in hf if k.startswith("text_model.encoder.layers.")}
    for i in layers:
        p = f"text_model.encoder.layers.{i}.self_attn."
        for leaf in ("weight", "bias"):
            fused = [hf[f"{p}{x}_proj.{leaf}"] for x in "qkv"]
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{leaf}"] = np.concatenate(fused)
    out[prefix + "text_projection"] = np.ones((128, 128), np.float32)  # unused by SD
    out[prefix + "logit_scale"] = np.float32(4.6)
    return out


@pytest.mark.slow
def test_sd2_style_single_file(tmp_path):
    """An SD-2-layout file: without its YAML, the parameterization must be given; imported,
    its weights are the file's (the unused last CLIP block skipped) and its v-prediction
    text-to-image equals diffusers' pipeline."""
    from ldm_jax import import_sd

    unet_model = unet_configs.from_config(UNET2)
    vae_model = autoencoder.from_config(sd.kl_f8_vae() | {**DDCONFIG, "embed_dim": 4})
    full_clip = clip.CLIPTextEncoder(**CLIP2, output="last")
    r = jax.random.PRNGKey(1)
    x, t = jnp.zeros((1, 16, 16, 4)), jnp.zeros((1,), jnp.int32)
    unet = _noisy(_init(unet_model, r, x, t, context=jnp.zeros((1, 77, 128))), 4)
    vae = _noisy(_init(vae_model, {"params": r, "sample": r}, jnp.zeros((1, 32, 32, 3))), 5)
    text = _noisy(_init(full_clip, r, jnp.zeros((1, 77), jnp.int32)), 6)
    tensors = unet_weights.unet_to_compvis(unet, unet_model, prefix=sd.UNET_PREFIX)
    tensors |= vae_weights.vae_to_compvis(vae, vae_model, prefix=sd.VAE_PREFIX)
    tensors |= _open_clip_names(clip_weights.export_hf_clip(text), sd.SD2_CLIP_PREFIX)
    path = tmp_path / "tiny-sd2.safetensors"
    tensor_files.save_safetensors(path, tensors)
    with pytest.raises(UserError, match="--parameterization eps or v"):
        sd.from_single_file(path)
    config = {"model": {"params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": 16,
        "parameterization": "v", "scale_factor": 0.18215,
        "unet_config": {"params": UNET2},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": DDCONFIG}},
    }}}  # fmt: skip
    (tmp_path / "v2.yaml").write_text(yaml.safe_dump(config))
    workdir = tmp_path / "run"
    import_sd.main([f"--checkpoint={path}", f"--original_config={tmp_path / 'v2.yaml'}",
                    f"--workdir={workdir}", "--image_size=32"])  # fmt: skip
    from ldm_jax.training.restore import load_run

    run = load_run(workdir)
    config, task, state, _ = run
    assert config.diffusion.parameterization == "v" and config.cond.tokenizer == "sd2"
    assert dict(config.cond.clip)["output"] == "penultimate" and config.model.num_heads == -1
    assert_trees_identical(jax.device_get(state.ema_params), unet)
    expected_text = {k: v for k, v in text.items() if k != "layers_2"}  # the skipped block
    assert_trees_identical(task.cond.frozen_params()["text_encoder"], expected_text)
    folder = _export_diffusers(workdir, tmp_path)
    _pipeline_agrees(run, folder, "sd2")
    # The export's tokenizer/ is transformers' own save_pretrained (pad token in
    # tokenizer_config.json, no special_tokens_map.json): imported back, it pads as SD 2.
    assert not (folder / "tokenizer/special_tokens_map.json").exists()
    assert json.loads((folder / "tokenizer/tokenizer_config.json").read_text())["pad_token"] == "!"
    again = tmp_path / "again"
    import_sd.main([f"--diffusers={folder}", f"--workdir={again / 'run'}", "--image_size=32"])
    run = load_run(again / "run")
    assert run[0].cond.tokenizer == "sd2"
    _pipeline_agrees(run, _export_diffusers(again / "run", again), "sd2")


def test_tokenizer_padding_of_a_diffusers_folder(tmp_path):
    """The pad token from tokenizer_config.json (current transformers), overridden by an
    older folder's special_tokens_map.json, CLIP's default without either; others refused."""
    from ldm_jax.models import clip_tokenizer

    for variant in ("sd1", "sd2"):
        clip_tokenizer.clip_tokenizer(variant).save_pretrained(tmp_path / variant)
        assert sd.tokenizer_padding(tmp_path / variant) == variant
    (tmp_path / "sd1/special_tokens_map.json").write_text(
        json.dumps({"pad_token": {"content": "!", "lstrip": False}})
    )
    assert sd.tokenizer_padding(tmp_path / "sd1") == "sd2"
    assert sd.tokenizer_padding(tmp_path / "missing") == "sd1"
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd/tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(UserError, match="pad token '<pad>'"):
        sd.tokenizer_padding(tmp_path / "odd")


@pytest.mark.slow
def test_fine_tune_an_imported_run(imported, imported_run, data_dir, tmp_path):
    """`ldm_jax.train` continues an import from its stored config (configs/from_run.py) on
    the digits captions: the UNet and its EMA move, the CLIP tower and VAE stay frozen,
    and the run resumes where it stopped."""
    import shutil

    from toy import run_module

    from ldm_jax.training.restore import load_run

    run = tmp_path / "run"
    shutil.copytree(imported, run)
    args = [f"--config=configs/from_run.py:{run}", f"--workdir={run}",
            "--config.data.name=digits", f"--config.data.data_dir={data_dir}",
            "--config.data.eval_split=test", "--config.batch_size=4",
            "--config.train.eval_batch_size=4", "--config.train.progress_bar=False",
            "--config.train.checkpoint_every=1000", "--config.train.log_every=1",
            "--config.train.eval_examples=4", "--config.sampling.steps=2",
            "--config.sampling.grid_rows=1"]  # fmt: skip
    # 8 image rows, 4 captions: the grid takes one column per caption.
    run_module("ldm_jax.train", *args, "--config.train.num_steps=2")
    before = imported_run[2]
    _, _, after, step = load_run(run)
    assert step == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert (run / "images" / "diffusion_0000002.png").is_file()

    def moved(a, b):
        return max(
            float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
        )

    assert moved(after.params["unet"], before.params["unet"]) > 1e-5
    assert moved(after.ema_params, before.ema_params) > 0
    text = tensor_files.load_params(run / "text_encoder.safetensors")
    assert_trees_identical(text, tensor_files.load_params(imported / "text_encoder.safetensors"))
    # The step-2 checkpoint stores the fine-tune's settings: resuming needs only the step.
    spec = f"--config=configs/from_run.py:{run}"
    run_module("ldm_jax.train", spec, f"--workdir={run}", "--config.train.num_steps=3")
    config, _, _, step = load_run(run)
    assert step == 3 and config.data.name == "digits" and config.batch_size == 4


@pytest.mark.slow
def test_img2img_matches_diffusers_img2img_pipeline(imported_run, imported_diffusers):
    """Image-to-image at strength 0.6 (DDIM 10 steps: the last 6, from the encoded image
    noised to their first timestep) equals diffusers' StableDiffusionImg2ImgPipeline given
    the same latents and noise."""
    torch = pytest.importorskip("torch")

    pipe = _diffusers_pipeline("StableDiffusionImg2ImgPipeline", imported_diffusers, "sd1")
    config, task, state, _ = imported_run
    frozen = task.frozen_params()
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)
    z0 = task.encode_images(state, frozen, images, jax.random.PRNGKey(2))
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((2, 4, 16, 16), generator=generator)  # what the pipeline draws
    sampling = config.sampling.copy_and_resolve_references()
    sampling.update(dict(steps=10, guidance_scale=7.5))
    assert task.img2img_start(0.6, sampling)[0] == 4
    prompt = ["a photo of a cat"] * 2
    ours = task.sample(state, frozen, task.cond.encode_prompts(prompt), jax.random.PRNGKey(0),
                       sampling=sampling, init_latents=z0, strength=0.6,
                       noise=jnp.asarray(noise.numpy().transpose(0, 2, 3, 1)))  # fmt: skip
    latents = torch.from_numpy(np.asarray(z0).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        theirs = pipe(prompt, image=latents, strength=0.6, num_inference_steps=10,
                      guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                      output_type="np").images  # fmt: skip
    got = np.clip((np.asarray(ours) + 1.0) / 2.0, 0, 1)
    assert np.std(theirs) > 0.01
    np.testing.assert_allclose(got, theirs, atol=1e-4)  # measured 6.7e-6


@pytest.mark.slow
def test_negative_prompt_and_img2img_command(imported, imported_run, tmp_path, capsys):
    """--negative_prompt with --init_image/--strength: the command's images are the API's
    (the negative prompt's encoding as guidance's unconditional branch; the init image
    encoded with the sample key folded with 2^20), recorded with their settings; a
    negative prompt changes them; bad input is one error each."""
    from PIL import Image

    from ldm_jax import sample
    from ldm_jax.data import images as images_lib

    negative = "blurry, low quality"
    picture = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "init.png")
    common = [f"--workdir={imported}", "--prompts", "a photo of a cat", "--num_per_condition=2",
              "--steps=4", f"--init_image={tmp_path / 'init.png'}"]  # fmt: skip
    out = sample.main([*common, "--guidance=7.5", "--strength=0.5", "--negative_prompt",
                       negative, f"--out={tmp_path / 'i2i'}"])  # fmt: skip
    settings = json.loads((tmp_path / "i2i/samples.json").read_text())
    assert settings["negative_prompt"] == negative and settings["strength"] == 0.5
    assert settings["init_image"].endswith("init.png")
    config, task, state, _ = imported_run
    sampling = config.sampling.copy_and_resolve_references()
    sampling.update(dict(steps=4, guidance_scale=7.5))
    image = images_lib.load_image(tmp_path / "init.png", 32)
    assert image.shape == (32, 32, 3) and -1 <= image.min() and image.max() <= 1
    rng = jax.random.fold_in(jax.random.PRNGKey(0), 0)
    frozen = task.frozen_params()
    z0 = task.encode_images(state, frozen, jnp.asarray(np.stack([image] * 2)),
                            jax.random.fold_in(rng, 1 << 20))  # fmt: skip
    encode = task.cond.encode_prompts
    want = {
        name: images_lib.to_uint8(task.sample(state, frozen, encode(["a photo of a cat"] * 2), rng,
                                           sampling=sampling, uncond=un, init_latents=z0,
                                           strength=0.5))
        for name, un in (("negative", encode([negative] * 2)), ("empty", None))
    }  # fmt: skip
    diff = np.abs(out["images"].astype(int) - want["negative"].astype(int))
    assert diff.max() <= 1  # uint8 rounding of sharded vs single-device floats
    assert np.abs(out["images"].astype(int) - want["empty"].astype(int)).max() > 5
    for bad, message in (("--strength=0.1", "takes no step of 4"),
                         ("--strength=1.5", r"strength must be in \(0, 1\]"),
                         ("--negative_prompt=x", "pass --guidance above 1")):  # fmt: skip
        with pytest.raises(SystemExit):
            sample.main([*common, "--guidance=1.0" if "negative" in bad else "--guidance=7.5", bad])
        assert re.search(message, capsys.readouterr().err)
    with pytest.raises(SystemExit):
        sample.main([*common[:-1], f"--init_image={tmp_path / 'missing.png'}"])
    assert "missing.png not found" in capsys.readouterr().err


@pytest.mark.slow
def test_a_folders_own_tokenizer_comes_with_the_run(imported_diffusers, tmp_path):
    """A diffusers folder whose tokenizer has a token added (textual inversion's way: one
    more token, one more embedding row) imports with that tokenizer: the run tokenizes
    and embeds prompts as transformers does on the folder. A standard folder's tokenizer
    is the built-in CLIP BPE and is not copied."""
    import shutil

    import torch
    from safetensors.numpy import load_file, save_file
    from transformers import CLIPTextModel

    from ldm_jax import import_sd
    from ldm_jax.interop import stable_diffusion as sd
    from ldm_jax.training.restore import load_run

    assert sd.folder_tokenizer(imported_diffusers / "tokenizer", "sd1", 49408) is None
    folder = tmp_path / "with_token"
    shutil.copytree(imported_diffusers, folder)
    tokenizer = sd.load_tokenizer_folder(folder / "tokenizer")
    tokenizer.add_tokens(["<cat-toy>"])
    for name in ("vocab.json", "merges.txt"):  # the added token lives in tokenizer.json
        (folder / "tokenizer" / name).unlink()
    tokenizer.save_pretrained(folder / "tokenizer")
    weights = folder / "text_encoder/model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("token_embedding.weight"))
    new_row = np.random.default_rng(0).normal(size=(1, tensors[key].shape[1])).astype(np.float32)
    tensors[key] = np.concatenate([tensors[key], new_row])
    save_file(tensors, weights)
    config_path = folder / "text_encoder/config.json"
    text_config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(text_config | {"vocab_size": len(tokenizer)}))

    workdir = tmp_path / "run"
    import_sd.main([f"--diffusers={folder}", f"--workdir={workdir}", "--image_size=32"])
    assert (workdir / "tokenizer/tokenizer.json").is_file()
    config, task, state, _ = load_run(workdir)
    prompts = ["a photo of a <cat-toy>", "a photo of a cat"]
    inputs = task.cond.encode_prompts(prompts)
    expected = tokenizer(prompts, padding="max_length", max_length=77).input_ids
    np.testing.assert_array_equal(inputs["tokens"], expected)
    assert 49408 in inputs["tokens"][0]
    context, _ = task.cond.embed(state.params.get("cond"), task.cond.frozen_params(), inputs)
    with torch.no_grad():
        theirs = CLIPTextModel.from_pretrained(folder / "text_encoder")(
            torch.tensor(np.asarray(expected))
        ).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(context), theirs, atol=1e-4)

    too_few = tmp_path / "mismatched"
    shutil.copytree(folder, too_few)
    (too_few / "text_encoder/config.json").write_text(json.dumps(text_config))
    with pytest.raises(SystemExit) as exit_info:
        import_sd.main([f"--diffusers={too_few}", f"--workdir={tmp_path / 'bad'}"])
    assert exit_info.value.code == 2 and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_a_hub_id_imports_from_the_hub_cache_offline(imported_diffusers, tmp_path, monkeypatch):
    """`--diffusers ORG/NAME` reads a hub cache laid out as huggingface_hub lays it out
    (refs/main -> snapshots/<commit>/...) with the hub unreachable (HF_HUB_OFFLINE), into
    the same run as the folder itself; an id the cache lacks is one line and exit 2."""
    import shutil

    import huggingface_hub

    from ldm_jax import import_sd
    from ldm_jax.training.restore import load_run

    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-sd"
    shutil.copytree(imported_diffusers, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "someone/tiny-sd" is no local folder here

    import_sd.main(["--diffusers=someone/tiny-sd", f"--workdir={tmp_path / 'run'}",
                    "--image_size=32"])  # fmt: skip
    _, _, from_hub, _ = load_run(tmp_path / "run")
    import_sd.main([f"--diffusers={imported_diffusers}", f"--workdir={tmp_path / 'direct'}",
                    "--image_size=32"])  # fmt: skip
    _, _, direct, _ = load_run(tmp_path / "direct")
    assert_trees_identical(jax.device_get(from_hub.ema_params), jax.device_get(direct.ema_params))
    with pytest.raises(SystemExit) as exit_info:
        import_sd.main(["--diffusers=someone/not-cached", f"--workdir={tmp_path / 'bad'}"])
    assert exit_info.value.code == 2 and not (tmp_path / "bad").exists()
