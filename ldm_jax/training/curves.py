"""`<workdir>/curves.png`: every logged scalar of a run against the step, one panel each.

Drawn at the end of every run from its metrics.jsonl (a resumed run's rows included), so a
user can look at a run without starting TensorBoard. Losses, held-out evaluation (`eval/`)
and sample metrics (`metrics/`) are drawn; throughput (`perf/`) and counters are left to
TensorBoard. Noisy training curves get a smoothed line over the raw one. Pillow only: no
plotting library on a pod image.
"""

from __future__ import annotations

import json
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ldm_jax import storage

PANEL_W, PANEL_H, COLUMNS = 360, 220, 3
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 14, 26, 30
SKIPPED_PREFIXES = ("perf/",)
SKIPPED_KEYS = ("step", "skipped_steps")
RAW, SMOOTH, AXES, TEXT = (170, 190, 230), (30, 80, 200), (120, 120, 120), (20, 20, 20)


def read_series(metrics_jsonl) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (steps, values)} of the finite scalars in a metrics log; a step logged twice
    (a run resumed from an earlier checkpoint) keeps its last value."""
    series: dict[str, dict[int, float]] = {}
    for line in storage.path(metrics_jsonl).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for key, value in row.items():
            if key in SKIPPED_KEYS or key.startswith(SKIPPED_PREFIXES):
                continue
            if isinstance(value, int | float) and math.isfinite(value):
                series.setdefault(key, {})[int(row["step"])] = float(value)
    return {
        k: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)])) for k, v in series.items()
    }


def write_curves(metrics_jsonl, out) -> bool:
    """Draws the log's curves into the PNG `out`; False when there is nothing to draw."""
    series = read_series(metrics_jsonl)
    if not series:
        return False
    # the loss first, then the other training terms, then evaluations
    names = sorted(series, key=lambda k: (k.count("/"), k != "loss", k))
    rows = math.ceil(len(names) / COLUMNS)
    columns = min(COLUMNS, len(names))
    image = Image.new("RGB", (columns * PANEL_W, rows * PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    for i, name in enumerate(names):
        origin = ((i % COLUMNS) * PANEL_W, (i // COLUMNS) * PANEL_H)
        _panel(draw, font, origin, name, *series[name])
    with storage.path(out).open("wb") as f:
        image.save(f, format="PNG")
    return True


def _panel(draw, font, origin, name, steps, values) -> None:
    x0, y0 = origin[0] + MARGIN_L, origin[1] + MARGIN_T
    x1, y1 = origin[0] + PANEL_W - MARGIN_R, origin[1] + PANEL_H - MARGIN_B
    draw.text((x0, origin[1] + 6), f"{name}  (last {values[-1]:.4g})", fill=TEXT, font=font)
    draw.rectangle((x0, y0, x1, y1), outline=AXES)
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5 * max(abs(lo), 1e-3), hi + 0.5 * max(abs(hi), 1e-3)
    first, last = int(steps[0]), int(steps[-1])
    span = max(last - first, 1)

    def point(step, value):
        fx = (step - first) / span if last > first else 0.5
        return x0 + fx * (x1 - x0), y1 - (value - lo) / (hi - lo) * (y1 - y0)

    for value, anchor_y in ((hi, y0), (lo, y1)):
        draw.text((x0 - 6, anchor_y), f"{value:.3g}", fill=TEXT, font=font, anchor="rm")
    for step, anchor_x in ((first, x0), (last, x1)) if last > first else ((first, (x0 + x1) / 2),):
        draw.text((anchor_x, y1 + 6), str(step), fill=TEXT, font=font, anchor="mt")
    raw = [point(s, v) for s, v in zip(steps, values)]
    smoothed = _smooth(values)
    if smoothed is not None:
        draw.line(raw, fill=RAW, width=1)
        draw.line([point(s, v) for s, v in zip(steps, smoothed)], fill=SMOOTH, width=2)
    elif len(raw) > 1:
        draw.line(raw, fill=SMOOTH, width=2)
    for x, y in raw if len(raw) <= 30 else raw[-1:]:  # few points (evaluations): mark each
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=SMOOTH)


def _smooth(values: np.ndarray) -> np.ndarray | None:
    """A centred moving average over about a twentieth of the curve (no lag), for curves
    long enough to be noisy; None for short ones."""
    if len(values) < 20:
        return None
    half = max(1, len(values) // 40)
    sums = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(len(values))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(values))
    return (sums[hi] - sums[lo]) / (hi - lo)
