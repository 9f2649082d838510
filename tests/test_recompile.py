"""One trace per run: the training loop's jitted step, its held-out evaluation and the
evaluator's sampler are each traced once, however many steps and evaluations a run makes.
A static argument that changes between calls, or an input whose dtype, weak type, shape or
sharding changes, retraces and recompiles; the function's jit cache then holds more than
one entry.
"""

from toy import tiny_autoencoder_config, tiny_diffusion_config

from ldm_jax.training.loop import Trainer

# Long enough for every periodic part of the loop to run twice: steps logged each step,
# held-out evaluation, sample grids and checkpoints at steps 2 and 4.
SHORT_RUN = dict(
    num_steps=4, log_every=1, eval_every=2, image_every=2, checkpoint_every=2, progress_bar=False
)


def _train(config, workdir) -> Trainer:
    config.train.update(SHORT_RUN)
    trainer = Trainer(config, workdir)
    result = trainer.run()
    assert result["step"] == 4
    return trainer


def test_autoencoder_run_traces_its_step_and_evaluation_once(data_dir, tmp_path):
    config = tiny_autoencoder_config()
    config.data.data_dir = data_dir
    trainer = _train(config, tmp_path / "run")
    assert trainer.step_fn._cache_size() == 1
    assert trainer._eval_means.sums._cache_size() == 1


# On the session's trained autoencoder, so marked slow (conftest).
def test_diffusion_run_traces_its_step_evaluation_and_sampler_once(
    tiny_autoencoder_run, data_dir, tmp_path
):
    config = tiny_diffusion_config(
        tiny_autoencoder_run[0],
        data_dir,
        batch_size=8,
        train__eval_batch_size=8,
        latent_cache__dir=str(tmp_path / "cache"),
        evaluation__every=2,
        evaluation__metrics=("accuracy",),
        evaluation__num_samples=8,
        evaluation__batch_size=8,
        evaluation__steps=2,
    )
    trainer = _train(config, tmp_path / "run")
    assert (tmp_path / "run" / "eval" / "train_step0000002.json").is_file()
    assert (tmp_path / "run" / "eval" / "train_step0000004.json").is_file()
    assert trainer.step_fn._cache_size() == 1
    assert trainer._eval_means.sums._cache_size() == 1
    assert trainer._evaluator._draw._cache_size() == 1
