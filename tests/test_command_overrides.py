"""`--config.KEY=VALUE` reads the same in every command that takes a run's stored config:
an override of a sampling field samples exactly as the command's own flag for it."""

import numpy as np


def test_sample_override_equals_its_flag(diffusion_run, tmp_path):
    from ldm_jax import sample

    common = [f"--workdir={diffusion_run[0]}", "--labels=2,5", "--num_per_condition=2"]
    by_flag = sample.main([*common, "--steps=4", "--eta=0.5", f"--out={tmp_path / 'a'}"])
    by_config = sample.main([*common, "--config.sampling.steps=4", "--config.sampling.eta=0.5",
                             f"--out={tmp_path / 'b'}"])  # fmt: skip
    default = sample.main([*common, f"--out={tmp_path / 'c'}"])
    np.testing.assert_array_equal(by_flag["images"], by_config["images"])
    assert np.any(by_flag["images"] != default["images"])  # the override took effect


def test_evaluate_override_sets_the_evaluation_field(diffusion_run, data_dir, tmp_path):
    from ldm_jax import evaluate

    report = evaluate.main([
        f"--workdir={diffusion_run[0]}", f"--data_dir={data_dir}", "--metric=accuracy",
        "--num_samples=8", "--batch_size=8", "--steps=2", "--config.evaluation.seed=5",
        f"--out={tmp_path / 'r.json'}",
    ])  # fmt: skip
    assert report["settings"]["seed"] == 5 and report["settings"]["num_samples"] == 8
