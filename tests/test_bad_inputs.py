"""Every command's bad inputs, through its real `main`: exit code 2, one line on stderr
that names the problem, no traceback, and the runs it was pointed at left unchanged.

The training command runs in subprocesses (its flags are process-global); the others run
in this process, as `main(argv)`."""

import concurrent.futures
import shutil

import numpy as np
import pytest
from helpers import listing
from PIL import Image
from toy import AE_CONFIG, run_module


@pytest.fixture(scope="module")
def runs(tmp_path_factory, diffusion_run, tiny_autoencoder_run):
    """Copies of a diffusion run and its first stage (a case that wrongly wrote would
    otherwise change the runs other tests read), and a plain file."""
    root = tmp_path_factory.mktemp("bad_inputs")
    ldm, ae = root / "ldm", root / "ae"
    shutil.copytree(diffusion_run[0], ldm)
    shutil.copytree(tiny_autoencoder_run[0], ae)
    a_file = root / "a_file.txt"
    a_file.write_text("not a run\n")
    images = {}  # condition images and masks for the sample command's --cond_image / --mask
    for name, shape in (("photo30", (30, 30, 3)), ("mask30", (30, 30)), ("photo32", (32, 32, 3)),
                        ("mask32", (32, 32))):  # fmt: skip
        images[name] = root / f"{name}.png"
        Image.fromarray(np.full(shape, 200, np.uint8)).save(images[name])
    return {"ldm": ldm, "ae": ae, "file": a_file, "root": root, "images": images}


def _train_cases(runs, data_dir):
    ae, common = runs["ae"], [f"--config.data.data_dir={data_dir}"]
    base = [f"--config={AE_CONFIG}", f"--workdir={ae}", *common]
    return [
        ("unknown config key", [*base, "--config.model.chh=8"], "chh"),
        ("missing config file", ["--config=configs/nope.py", f"--workdir={ae}"], "nope.py"),
        ("bad config argument", [f"--config={AE_CONFIG}x", f"--workdir={ae}"], "runlocalx"),
        ("non-numeric value", [*base, "--config.batch_size=abc"], "batch_size"),
        ("no workdir", [f"--config={AE_CONFIG}", *common], "--workdir"),
        ("no config", [f"--workdir={ae}"], "--config"),
        ("unknown flag", [*base, "--bogus=1"], "bogus"),
        (
            "negative learning rate",
            [*base, "--config.optim.base_learning_rate=-1e-4"],
            "base_learning_rate",
        ),  # fmt: skip
        (
            "workdir is a file",
            [f"--config={AE_CONFIG}", f"--workdir={runs['file']}", *common],
            "is a file",
        ),  # fmt: skip
        ("unknown stage", [*base, "--config.stage=third"], "stage"),
        ("bad on_nonfinite", [*base, "--config.train.on_nonfinite=ignore"], "on_nonfinite"),
        ("zero batch", [*base, "--config.batch_size=0"], "batch_size"),
    ]


def _command_cases(runs, tmp):
    ldm, ae, a_file = str(runs["ldm"]), str(runs["ae"]), str(runs["file"])
    img = {k: f"={v}" for k, v in runs["images"].items()}
    missing = str(tmp / "no_such_run")
    sample = lambda *a: ("ldm_jax.sample", [f"--workdir={ldm}", "--steps=2", *a])  # noqa: E731
    evaluate = lambda *a: ("ldm_jax.evaluate", [f"--workdir={ldm}", *a])  # noqa: E731
    export = lambda *a: ("ldm_jax.export", [f"--workdir={ldm}", *a])  # noqa: E731
    return [
        ("sample: no run", "ldm_jax.sample", [f"--workdir={missing}", "--labels=1"], "no_such_run"),
        (
            "sample: workdir is a file",
            "ldm_jax.sample",
            [f"--workdir={a_file}", "--labels=1"],
            "a_file.txt",
        ),  # fmt: skip
        (
            "sample: autoencoder run",
            "ldm_jax.sample",
            [f"--workdir={ae}", "--labels=1"],
            "autoencoder",
        ),  # fmt: skip
        ("sample: unknown sampler", *sample("--labels=1", "--sampler=euler"), "euler"),
        (
            "sample: zero steps",
            "ldm_jax.sample",
            [f"--workdir={ldm}", "--labels=1", "--steps=0"],
            "--steps",
        ),  # fmt: skip
        ("sample: steps the grid cannot take", *sample("--labels=1", "--steps=3"), "--steps 3"),
        ("sample: steps not a number", *sample("--labels=1", "--steps=many"), "--steps"),
        ("sample: label not a number", *sample("--labels=seven"), "seven"),
        ("sample: label out of range", *sample("--labels=3,10"), "class id 10"),
        ("sample: no labels for a class run", *sample(), "--labels"),
        (
            "sample: negative prompt on a class run",
            *sample("--labels=1", "--negative_prompt=x"),
            "--negative_prompt",
        ),  # fmt: skip
        (
            "sample: init image missing",
            *sample("--labels=1", f"--init_image={tmp / 'x.png'}"),
            "x.png",
        ),  # fmt: skip
        (
            "sample: init image not an image",
            *sample("--labels=1", f"--init_image={a_file}"),
            "a_file.txt",
        ),  # fmt: skip
        (
            "sample: condition image without a mask on a run without a dense condition",
            *sample("--labels=1", "--cond_image" + img["photo32"]),
            "no dense condition",
        ),  # fmt: skip
        (
            "sample: mask-guided output size not a multiple",
            *sample("--labels=1", "--cond_image" + img["photo30"], "--mask" + img["mask30"]),
            "multiples of 8",
        ),  # fmt: skip
        (
            "sample: mask of another size than the condition image",
            *sample("--labels=1", "--cond_image" + img["photo30"], "--mask" + img["mask32"]),
            "32x32 but",
        ),  # fmt: skip
        (
            "sample: condition image not an image",
            *sample("--labels=1", f"--cond_image={a_file}", "--mask" + img["mask32"]),
            "a_file.txt",
        ),  # fmt: skip
        (
            "sample: negative prompt with a condition image",
            *sample("--labels=1", "--negative_prompt=x", "--cond_image" + img["photo32"]),
            "--negative_prompt",
        ),  # fmt: skip
        ("sample: no checkpoint at that step", *sample("--labels=1", "--step=999"), "999"),
        (
            "sample: zero per condition",
            *sample("--labels=1", "--num_per_condition=0"),
            "--num_per_condition",
        ),  # fmt: skip
        ("sample: unknown flag", *sample("--labels=1", "--bogus"), "--bogus"),
        (
            "sample: unknown config key",
            *sample("--labels=1", "--config.sampling.etta=0.5"),
            "etta",
        ),  # fmt: skip
        (
            "sample: config value of another type",
            *sample("--labels=1", "--config.sampling.steps=many"),
            "sampling.steps",
        ),  # fmt: skip
        ("evaluate: unknown metric", *evaluate("--metric=kid"), "kid"),
        (
            "evaluate: unknown evaluation key",
            *evaluate("--metric=accuracy", "--config.evaluation.samples=3"),
            "evaluation.samples",
        ),  # fmt: skip
        ("evaluate: autoencoder metric on a diffusion run", *evaluate("--metric=rfid"), "rfid"),
        (
            "evaluate: diffusion metric on an autoencoder run",
            "ldm_jax.evaluate",
            [f"--workdir={ae}", "--metric=fid"],
            "fid",
        ),  # fmt: skip
        (
            "evaluate: zero samples",
            *evaluate("--metric=accuracy", "--num_samples=0"),
            "num_samples",
        ),  # fmt: skip
        (
            "evaluate: batch not over the mesh",
            *evaluate("--metric=accuracy", "--batch_size=3"),
            "batch_size",
        ),  # fmt: skip
        ("evaluate: no metric", *evaluate(), "--metric"),
        (
            "evaluate: no run",
            "ldm_jax.evaluate",
            [f"--workdir={missing}", "--metric=fid"],
            "no_such_run",
        ),  # fmt: skip
        (
            "export: takes no config overrides",
            *export("--layout=ldm_jax", f"--out={tmp / 'w.safetensors'}", "--config.seed=1"),
            "--config.seed",
        ),  # fmt: skip
        ("export: unknown layout", *export("--layout=onnx", f"--out={tmp / 'e'}"), "onnx"),
        ("export: output exists", *export("--layout=ldm_jax", f"--out={a_file}"), "exists"),
        (
            "export: suffix of the layout",
            *export("--layout=ldm_jax", f"--out={tmp / 'w.bin'}"),
            ".safetensors",
        ),  # fmt: skip
        (
            "export: diffusers layout of a class run",
            *export("--layout=diffusers", f"--out={tmp / 'd'}"),
            "CLIP",
        ),  # fmt: skip
        (
            "export: autoencoder run",
            "ldm_jax.export",
            [f"--workdir={ae}", "--layout=ldm_jax", f"--out={tmp / 'a.safetensors'}"],
            "autoencoder",
        ),  # fmt: skip
        (
            "import_sd: missing checkpoint",
            "ldm_jax.import_sd",
            [f"--checkpoint={tmp / 'sd.safetensors'}", f"--workdir={tmp / 'i'}"],
            "sd.safetensors",
        ),  # fmt: skip
        (
            "import_sd: not a checkpoint",
            "ldm_jax.import_sd",
            [f"--checkpoint={a_file}", f"--workdir={tmp / 'i'}"],
            "a_file.txt",
        ),  # fmt: skip
        (
            "import_sd: missing diffusers folder",
            "ldm_jax.import_sd",
            [f"--diffusers={tmp / 'pipe'}", f"--workdir={tmp / 'i'}"],
            "pipe",
        ),  # fmt: skip
        (
            "import_sd: nothing to import",
            "ldm_jax.import_sd",
            [f"--workdir={tmp / 'i'}"],
            "--checkpoint",
        ),  # fmt: skip
        (
            "inspect: bad mesh",
            "ldm_jax.inspect_checkpoint",
            [f"--workdir={ldm}", "--mesh=a,b"],
            "--mesh",
        ),  # fmt: skip
        (
            "inspect: two mesh sizes",
            "ldm_jax.inspect_checkpoint",
            [f"--workdir={ldm}", "--mesh=2,4"],
            "--mesh",
        ),  # fmt: skip
        ("inspect: no run", "ldm_jax.inspect_checkpoint", [f"--workdir={missing}"], "no_such_run"),
        (
            "inspect: no checkpoint at that step",
            "ldm_jax.inspect_checkpoint",
            [f"--workdir={ldm}", "--step=77"],
            "77",
        ),  # fmt: skip
    ]


def _check_one_line_error(name, code, stderr, names):
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert code == 2, f"{name}: exit code {code}\n{stderr}"
    assert "Traceback" not in stderr, f"{name}: traceback\n{stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: {stderr!r}"
    assert names in lines[0], f"{name}: {names!r} not in {lines[0]!r}"


def test_every_command_refuses_bad_input_in_one_line(runs, data_dir, tmp_path, capsys):
    import importlib

    before = {k: listing(runs[k]) for k in ("ldm", "ae")}
    file_text = runs["file"].read_text()
    cases = _command_cases(runs, tmp_path)
    for name, module, argv, names in cases:
        main = importlib.import_module(module).main
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        _check_one_line_error(name, exit_info.value.code, capsys.readouterr().err, names)
    train = _train_cases(runs, data_dir)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda c: run_module("ldm_jax.train", *c[1], check=False), train))
    for (name, _, names), proc in zip(train, procs):
        _check_one_line_error(f"train: {name}", proc.returncode, proc.stderr, names)
    assert len(cases) + len(train) >= 30
    assert {k: listing(runs[k]) for k in ("ldm", "ae")} == before
    assert runs["file"].read_text() == file_text
    written = ("i", "e", "d", "w.bin", "a.safetensors", "w.safetensors")
    assert not any((tmp_path / n).exists() for n in written)
