"""Runs conditioned per example resume exactly: an inpainting run (large masks drawn from
seeds of the example's position), a semantic run (class maps; the rescaler's weights in
params['dense']) and a layout run (boxes as tokens; the layout encoder's weights) log the
same figures over steps 3 and 4 resumed from a step-2 checkpoint as over 4 steps
straight. In process, through the training loop the train command runs."""

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
    c.batch_size = c.train.eval_batch_size = 8  # over the 8 test devices
    c.train.update(eval_every=100, image_every=100, checkpoint_every=2, progress_bar=False,
                   log_every=1)  # fmt: skip
    return c


@pytest.mark.parametrize("kind", ["inpaint", "semantic", "layout"])
def test_conditioned_run_resumes_bitwise(
    kind, tiny_autoencoder_run, data_dir, scenes_dir, tmp_path
):
    """4 steps straight (checkpoints at 2 and 4); then a copy of that run cut back to step
    2 (checkpoint 4 and the log past step 2 removed) is resumed to 4."""
    import shutil

    from ldm_jax.training.loop import Trainer

    def train(workdir):
        Trainer(_config(kind, tiny_autoencoder_run[0], data_dir, scenes_dir, 4), workdir).run()
        logged = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
        return {r["step"]: r for r in logged if "loss" in r}

    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = train(straight_dir)
    shutil.copytree(straight_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "4")
    log = resumed_dir / "metrics.jsonl"
    kept = [line for line in log.open() if json.loads(line).get("step", 0) <= 2]
    log.write_text("".join(kept))
    resumed = train(resumed_dir)
    assert sorted(resumed) == [1, 2, 3, 4]  # steps 3 and 4 trained again, after the restore
    for step in (3, 4):
        for key in ("loss", "grad_norm", "param_norm", "latent_std"):
            assert straight[step][key] == resumed[step][key], (step, key)
