"""The real training CLI in a subprocess: train, resume, and every bad-input error."""

import json
import pathlib
import shutil

import pytest
from helpers import listing
from toy import AE_CONFIG as CONFIG
from toy import run_module

pytestmark = pytest.mark.slow  # every test runs the CLI in a subprocess


def run_cli(workdir, data_dir, *overrides, check=True, config=CONFIG):
    return run_module(
        "ldm_jax.train",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.train.progress_bar=False",
        *overrides,
        check=check,
    )


@pytest.fixture(scope="module")
def trained(tiny_autoencoder_run):
    return tiny_autoencoder_run


def test_train_two_steps_then_resume_to_four(trained):
    workdir, first, second = trained
    assert "resumed from" not in first.stdout + first.stderr
    assert f"resumed from {workdir}/checkpoints/2 (step 2)" in second.stdout
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]
    data_state = json.loads((workdir / "checkpoints/4/data/metadata").read_text())
    assert data_state["next_batch"] == 4
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["checkpoint"].endswith("checkpoints/4")
    ev = metrics["eval"]
    assert ev["num_examples"] == 8 and 0 < ev["psnr"] < 60 and 0 <= ev["lpips"] <= 2
    logged = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").open()]
    assert [s for s in logged if s in (1, 2, 3, 4)] == [1, 2, 2, 3, 4, 4]  # train + eval rows
    assert pathlib.Path(metrics["samples_png"]).is_file()
    assert any((workdir / "tb").iterdir())


def test_unknown_config_key_names_it(tmp_path, data_dir):
    proc = run_cli(tmp_path / "w", data_dir, "--config.model.chh=8", check=False)
    assert proc.returncode != 0
    assert "chh" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_image_size_not_divisible_by_f(tmp_path, data_dir):
    proc = run_cli(tmp_path / "w", data_dir, "--config.data.image_size=30", check=False)
    assert proc.returncode == 2
    assert "image_size=30 is not divisible" in proc.stderr and "f=4" in proc.stderr


def test_unknown_nonfinite_policy(tmp_path, data_dir):
    proc = run_cli(tmp_path / "w", data_dir, "--config.train.on_nonfinite=ignore", check=False)
    assert proc.returncode == 2 and "on_nonfinite='ignore'" in proc.stderr


def test_dataset_not_prepared(tmp_path):
    proc = run_cli(
        tmp_path / "w", tmp_path / "empty", "--config.data.prepare_if_missing=False", check=False
    )
    assert proc.returncode == 2
    assert "photo_crops" in proc.stderr and "python -m ldm_jax.data.prepare" in proc.stderr


def test_other_architecture_in_workdir_is_refused(trained, data_dir):
    workdir = trained[0]
    before = listing(workdir)
    proc = run_cli(
        workdir, data_dir, "--config.model.ch=24", "--config.train.num_steps=6", check=False
    )
    assert proc.returncode == 2
    assert f"{workdir}/checkpoints/4" in proc.stderr and "model.ch" in proc.stderr
    assert listing(workdir) == before


def test_corrupt_checkpoint_is_reported_not_replaced(trained, data_dir, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(trained[0], workdir)
    meta = workdir / "checkpoints/4/meta/metadata"
    meta.write_text("{ this is not json")
    before = listing(workdir)
    proc = run_cli(workdir, data_dir, "--config.train.num_steps=6", check=False)
    assert proc.returncode == 2
    assert f"{workdir}/checkpoints/4 cannot be read" in proc.stderr
    assert listing(workdir) == before


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, data_dir):
    workdir = tmp_path / "nan"
    proc = run_cli(
        workdir,
        data_dir,
        "--config.train.num_steps=6",
        "--config.train.checkpoint_every=1",
        "--config.train.log_every=1",
        # One Adam step of this size overflows every activation on the next forward pass.
        "--config.optim.base_learning_rate=1e36",
        check=False,
    )
    assert proc.returncode == 3, proc.stderr
    assert "became NaN/Inf at step 1" in proc.stderr
    assert f"{workdir}/checkpoints/1" in proc.stderr
    steps = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ["1"]
