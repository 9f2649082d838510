"""The evaluate command on a trained tiny autoencoder: its figures agree with the
training loop's own evaluation, and the report holds the settings."""

import json

import numpy as np
import pytest

from ldm_jax import evaluate


def test_autoencoder_report_agrees_with_the_loop(tiny_autoencoder_run, data_dir, tmp_path):
    workdir = tiny_autoencoder_run[0]
    loop_eval = json.loads((workdir / "metrics.json").read_text())["eval"]
    out = tmp_path / "ae.json"
    report = evaluate.main([
        f"--workdir={workdir}", "--metric=psnr", "--metric=ssim", "--metric=lpips",
        "--metric=rfid", f"--num_samples={int(loop_eval['num_examples'])}", "--batch_size=8",
        f"--data_dir={data_dir}", f"--out={out}",
    ])  # fmt: skip
    results = report["results"]
    for key in ("psnr", "ssim", "lpips"):  # the same held-out crops as the loop's eval
        np.testing.assert_allclose(results[key], loop_eval[key], rtol=1e-5, err_msg=key)
    assert np.isfinite(results["rfid"]) and results["rfid"] > 0
    saved = json.loads(out.read_text())
    assert saved["step"] == 4 and saved["settings"]["num_images"] == loop_eval["num_examples"]
    assert saved["inception_weights"].endswith("default_1.pt")


def test_a_metric_of_the_other_stage_is_refused(tiny_autoencoder_run):
    with pytest.raises(SystemExit) as e:
        evaluate.main([f"--workdir={tiny_autoencoder_run[0]}", "--metric=fid"])
    assert e.value.code == 2
