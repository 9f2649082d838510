"""The diffusers scheduler config written for a run, for every parameterization: diffusers
reads its prediction type as the run's, and importing it gives the run's schedule back."""

import pytest

from ldm_jax.errors import UserError
from ldm_jax.interop import diffusers_config

DIFFUSION = dict(
    beta_schedule="linear", linear_start=0.00085, linear_end=0.012, timesteps=1000
)  # fmt: skip


@pytest.mark.parametrize(
    "parameterization, prediction_type",
    [("eps", "epsilon"), ("v", "v_prediction"), ("x0", "sample")],
)
def test_scheduler_round_trip(parameterization, prediction_type):
    from diffusers import DDIMScheduler

    cfg = diffusers_config.scheduler_config_to_diffusers(
        dict(DIFFUSION, parameterization=parameterization)
    )
    scheduler = DDIMScheduler.from_config(cfg)
    assert scheduler.config.prediction_type == prediction_type
    schedule, back = diffusers_config.schedule_from_diffusers(dict(scheduler.config))
    assert back == parameterization
    assert schedule == dict(
        beta_schedule="linear", linear_start=0.00085, linear_end=0.012, timesteps=1000
    )


def test_schedules_without_a_diffusers_equivalent_are_refused():
    with pytest.raises(UserError, match="beta_schedule 'cosine'"):
        diffusers_config.scheduler_config_to_diffusers(
            dict(DIFFUSION, beta_schedule="cosine", parameterization="eps")
        )
    with pytest.raises(UserError, match="prediction_type"):
        diffusers_config.schedule_from_diffusers({"prediction_type": "flow"})
