"""The config stored with a run's latest checkpoint, as an experiment file.

    python -m ldm_jax.train --config configs/from_run.py:runs/sd15 --workdir runs/sd15 \
        --config.data.name=my_dataset --config.train.num_steps=2000

Resumes or fine-tunes a run whose config exists only inside its checkpoints, such as one
written by `python -m ldm_jax.import_sd`; `--config.x=y` overrides apply as to any
experiment. The architecture is the run's own, so the workdir's checkpoint always fits.
"""


def get_config(workdir=None):
    if not workdir:
        raise ValueError("name the run: --config configs/from_run.py:PATH/TO/WORKDIR")
    from ldm_jax.config_common import from_stored
    from ldm_jax.training.restore import stored_config

    return from_stored(stored_config(workdir))
