"""Dense conditions made by the data pipeline (data.condition): the same for the same
global position whatever the process count, reproduced on resume, independent of the
crops, fixed on the eval split, and bad settings refused."""

import numpy as np
import pytest

from ldm_jax.data import TrainIterator, eval_batches
from ldm_jax.data.pipeline import default_config
from ldm_jax.errors import UserError


def _cfg(data_dir, **condition):
    cfg = default_config(name="photo_crops", data_dir=data_dir, image_size=32, flip=True)
    cfg.condition.update(condition)
    return cfg


def _batches(cfg, seed=2, batch=8, procs=1, index=0, n=2):
    it = TrainIterator(cfg, global_batch_size=batch, seed=seed, process_index=index,
                       process_count=procs)  # fmt: skip
    return [next(it) for _ in range(n)]


def test_low_res_condition_follows_the_determinism_contract(data_dir):
    cfg = _cfg(data_dir, kind="low_res", factor=4, degradation="bsr_light")
    one = _batches(cfg)
    assert one[0]["low_res"].shape == (8, 8, 8, 3) and one[0]["low_res"].dtype == np.float32
    assert -1.0 <= one[0]["low_res"].min() and one[0]["low_res"].max() <= 1.0
    halves = [_batches(cfg, procs=2, index=p) for p in (0, 1)]
    for k in range(2):
        joined = np.concatenate([halves[0][k]["low_res"], halves[1][k]["low_res"]])
        np.testing.assert_array_equal(joined, one[k]["low_res"])
    it = TrainIterator(cfg, global_batch_size=8, seed=2, process_count=1)
    it.set_state({"next_batch": 1, "seed": 2, "global_batch_size": 8})
    np.testing.assert_array_equal(next(it)["low_res"], one[1]["low_res"])
    # The condition draws from its own generator: crops and flips are as without it.
    plain = _batches(_cfg(data_dir))
    np.testing.assert_array_equal(plain[0]["image"], one[0]["image"])
    assert "low_res" not in plain[0]


def test_bicubic_condition_is_the_bicubic_image(data_dir):
    from ldm_jax.data import degradations

    batch = _batches(_cfg(data_dir, kind="low_res", factor=2, degradation="bicubic"), n=1)[0]
    image = np.round((batch["image"][0] + 1) * 127.5).astype(np.uint8)
    want = degradations.bicubic(image, 2).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(batch["low_res"][0], want, atol=1e-6)


def test_inpaint_condition_and_its_fixed_eval_masks(data_dir):
    cfg = _cfg(data_dir, kind="inpaint", coverage=(0.2, 0.4))
    batch = _batches(cfg, n=1)[0]
    mask = batch["inpaint_mask"]
    assert mask.shape == (8, 32, 32, 1) and set(np.unique(mask)) <= {0.0, 1.0}
    shares = mask.mean(axis=(1, 2, 3))
    assert np.all((shares >= 0.2 - 1 / 32**2) & (shares <= 0.4))
    np.testing.assert_array_equal(batch["masked_image"], np.where(mask > 0, -1.0, batch["image"]))
    first = next(iter(eval_batches(cfg, global_batch_size=8, num_examples=8)))
    again = next(iter(eval_batches(cfg, global_batch_size=8, num_examples=8)))
    np.testing.assert_array_equal(first["inpaint_mask"], again["inpaint_mask"])
    assert first["mask"].dtype == bool  # the padding mask keeps its name
    cfg.condition.eval_seed = 1
    other = next(iter(eval_batches(cfg, global_batch_size=8, num_examples=8)))
    assert np.any(other["inpaint_mask"] != first["inpaint_mask"])
    padded = list(eval_batches(cfg, global_batch_size=8, num_examples=5))[0]
    assert padded["inpaint_mask"][5:].sum() == 0 and not padded["mask"][5:].any()


@pytest.mark.parametrize(
    "condition, names",
    [
        ({"kind": "depth"}, "data.condition.kind"),
        ({"kind": "low_res", "factor": 3}, "data.condition.factor"),
        ({"kind": "low_res", "degradation": "blur"}, "data.condition.degradation"),
        ({"kind": "inpaint", "coverage": (0.6, 0.2)}, "data.condition.coverage"),
    ],
)
def test_bad_condition_settings_are_named(data_dir, condition, names):
    with pytest.raises(UserError, match=names):
        TrainIterator(_cfg(data_dir, **condition), global_batch_size=8, seed=0, process_count=1)
