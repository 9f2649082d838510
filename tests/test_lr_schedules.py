"""The diffusion stage's learning-rate schedules against the reference schedulers' formulas."""

import math

import ml_collections
import numpy as np
import pytest

from ldm_jax.errors import UserError
from ldm_jax.training import lr_schedules


def _reference_warmup_cosine(n, warm_up, max_decay, lr_start, lr_max, lr_min):
    """LambdaWarmUpCosineScheduler's multiplier, written out step by step."""
    if n < warm_up:
        return (lr_max - lr_start) / warm_up * n + lr_start
    t = min((n - warm_up) / (max_decay - warm_up), 1.0)
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(t * math.pi))


def _optim(**kw):
    base = dict(warmup_steps=1000, schedule="warmup_cosine", cosine=lr_schedules.default_cosine())
    return ml_collections.ConfigDict({**base, **kw})


def test_warmup_cosine_is_the_reference_inpainting_schedule():
    schedule = lr_schedules.make(_optim(), 2.0)
    for n in (0, 1, 500, 999, 1000, 1001, 20000, 49999, 50000, 80000):
        want = 2.0 * _reference_warmup_cosine(n, 1000, 50000, 0.001, 0.1, 0.0001)
        np.testing.assert_allclose(float(schedule(n)), want, rtol=2e-5, err_msg=str(n))


def test_constant_schedule_warms_up_linearly():
    schedule = lr_schedules.make(_optim(schedule="constant", warmup_steps=10), 3.0)
    assert [float(schedule(n)) for n in (0, 5, 10, 50)] == [0.0, 1.5, 3.0, 3.0]
    flat = lr_schedules.make(_optim(schedule="constant", warmup_steps=0), 3.0)
    assert float(flat(0)) == 3.0


@pytest.mark.parametrize(
    "optim, match",
    [
        (_optim(schedule="cosine"), "config.optim.schedule"),
        (_optim(warmup_steps=60000), "max_decay_steps"),
    ],
)
def test_bad_schedules_are_named(optim, match):
    with pytest.raises(UserError, match=match):
        lr_schedules.make(optim, 1.0)
