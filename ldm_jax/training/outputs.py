"""What a run writes: TensorBoard events and a metrics log. Process 0 only."""

from __future__ import annotations

import json

import jax
import numpy as np

from ldm_jax import storage


class MetricWriter:
    """Scalars and images to TensorBoard plus a JSON-lines log; a no-op off process 0."""

    def __init__(self, workdir: storage.Path):
        self.active = jax.process_index() == 0
        self.log_path = workdir / "metrics.jsonl"
        if not self.active:
            return
        from tensorboardX import SummaryWriter  # no TensorFlow needed

        self.tb = SummaryWriter(str(workdir / "tb"))  # gs:// too (tensorboardX's writer)
        self.log = storage.LineLog(self.log_path)

    def scalars(self, step: int, values: dict) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in values.items()}
        for k, v in clean.items():
            self.tb.add_scalar(k, v, step)
        self.log.write(json.dumps({"step": step, **clean}) + "\n")

    def image(self, step: int, tag: str, image_uint8: np.ndarray) -> None:
        if self.active:
            self.tb.add_image(tag, image_uint8, step, dataformats="HWC")

    def close(self) -> None:
        if self.active:
            self.tb.close()
            self.log.close()
