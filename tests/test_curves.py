"""curves.png: the run's logged scalars drawn from metrics.jsonl (training/curves.py)."""

import json

import numpy as np
from PIL import Image

from ldm_jax.training import curves


def _log(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_series_skip_throughput_and_keep_a_resumed_steps_last_value(tmp_path):
    log = _log(tmp_path / "metrics.jsonl", [
        {"step": 1, "loss": 2.0, "perf/step_ms": 5.0, "skipped_steps": 0},
        {"step": 2, "loss": 1.5},
        {"step": 2, "loss": 1.25, "eval/psnr": 20.0},  # resumed from step 1: step 2 again
        {"step": 3, "loss": float("nan")},
    ])  # fmt: skip
    series = curves.read_series(log)
    assert set(series) == {"loss", "eval/psnr"}
    np.testing.assert_array_equal(series["loss"][0], [1, 2])
    np.testing.assert_array_equal(series["loss"][1], [2.0, 1.25])


def test_each_scalar_gets_a_panel_with_its_curve(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"step": s, "loss": float(np.exp(-s / 50) + 0.05 * rng.random()), "l1": 0.3}
            for s in range(1, 201)]  # fmt: skip
    rows += [{"step": s, "eval/psnr": 20.0 + s / 100} for s in (100, 200)]
    out = tmp_path / "curves.png"
    assert curves.write_curves(_log(tmp_path / "m.jsonl", rows), out)
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert image.shape == (curves.PANEL_H, 3 * curves.PANEL_W, 3)  # three panels, one row
    smooth = np.all(image == curves.SMOOTH, axis=-1)
    for panel in range(3):  # every panel holds its drawn line
        assert smooth[:, panel * curves.PANEL_W : (panel + 1) * curves.PANEL_W].sum() > 50
    # The loss panel (first): the curve falls, so its line starts high and ends low.
    loss = smooth[:, curves.MARGIN_L + 2 : curves.PANEL_W - curves.MARGIN_R - 2]
    cols = np.nonzero(loss.any(axis=0))[0]
    first_y = np.nonzero(loss[:, cols[0]])[0].mean()
    last_y = np.nonzero(loss[:, cols[-1]])[0].mean()
    assert last_y - first_y > 0.6 * (curves.PANEL_H - curves.MARGIN_T - curves.MARGIN_B)


def test_an_empty_log_draws_nothing(tmp_path):
    out = tmp_path / "curves.png"
    assert not curves.write_curves(_log(tmp_path / "m.jsonl", [{"step": 1, "perf/x": 1}]), out)
    assert not out.exists()
