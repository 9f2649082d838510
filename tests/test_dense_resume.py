"""Runs conditioned per example resume exactly: an inpainting run (large masks drawn from
seeds of the example's position), a semantic run (class maps; the rescaler's weights in
params['dense']) and a layout run (boxes as tokens; the layout encoder's weights) log the
same figures over 2 steps, a restart and 2 more as over 4 steps straight. In process,
through the training loop the train command runs."""

import json

import pytest

from ldm_jax import config_common

pytestmark = pytest.mark.slow  # real training runs


def _config(kind, ae_workdir, data_dir, scenes_dir, steps):
    if kind == "inpaint":
        c = config_common.photo_ldm_config("inpaint", steps, runlocal=True)
        c.data.data_dir = data_dir
    else:
        c = config_common.digit_scene_config(kind, steps, runlocal=True)
        c.data.data_dir = scenes_dir
    c.first_stage.workdir = str(ae_workdir)
    c.batch_size = 8  # over the 8 test devices
    c.train.update(eval_every=100, image_every=100, checkpoint_every=2, progress_bar=False,
                   log_every=1)  # fmt: skip
    return c


@pytest.mark.parametrize("kind", ["inpaint", "semantic", "layout"])
def test_conditioned_run_resumes_bitwise(
    kind, tiny_autoencoder_run, data_dir, scenes_dir, tmp_path
):
    from ldm_jax.training.loop import Trainer

    def rows(workdir, steps):
        Trainer(_config(kind, tiny_autoencoder_run[0], data_dir, scenes_dir, steps), workdir).run()
        logged = map(json.loads, (workdir / "metrics.jsonl").open())
        return {r["step"]: r for r in logged if "loss" in r}

    straight = rows(tmp_path / "straight", 4)
    rows(tmp_path / "resumed", 2)
    resumed = rows(tmp_path / "resumed", 4)
    for step in (3, 4):
        for key in ("loss", "grad_norm", "param_norm", "latent_std"):
            assert straight[step][key] == resumed[step][key], (step, key)
