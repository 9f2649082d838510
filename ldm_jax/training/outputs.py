"""What a run writes: TensorBoard events, a metrics log and, optionally, a Weights & Biases
run. Process 0 only.

`MetricWriter` is the loop's one writer; each destination is a sink with the same three
methods (scalars, image, close), so adding one is local to this file.
"""

from __future__ import annotations

import json
import uuid

import jax
import numpy as np

from ldm_jax import storage
from ldm_jax.errors import UserError


class _TensorBoard:
    def __init__(self, workdir: storage.Path):
        from tensorboardX import SummaryWriter  # no TensorFlow needed

        self.tb = SummaryWriter(str(workdir / "tb"))  # gs:// too (tensorboardX's writer)

    def scalars(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)

    def image(self, step: int, tag: str, image_uint8: np.ndarray) -> None:
        self.tb.add_image(tag, image_uint8, step, dataformats="HWC")

    def close(self) -> None:
        self.tb.close()


class _JsonLines:
    def __init__(self, path: storage.Path):
        self.log = storage.LineLog(path)

    def scalars(self, step: int, values: dict) -> None:
        self.log.write(json.dumps({"step": step, **values}) + "\n")

    def image(self, step: int, tag: str, image_uint8: np.ndarray) -> None:
        pass  # images go to TensorBoard and the workdir's PNGs

    def close(self) -> None:
        self.log.close()


class _Wandb:
    """A W&B run for the workdir. Its id is kept in <workdir>/wandb_id, so a resumed run
    goes on in the same W&B run; its local files sit in <workdir>/wandb (in the local
    mirror of a remote workdir). WANDB_MODE=offline keeps everything local."""

    def __init__(self, workdir: storage.Path, config, project: str, entity: str):
        try:
            import wandb
        except ImportError:
            raise UserError(
                f"config.logging.wandb={project!r} needs the wandb package: "
                "pip install wandb (or scripts/install.sh --extras wandb)."
            ) from None
        self.wandb = wandb
        id_file = workdir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        local = storage.local_mirror(workdir) if storage.is_remote(workdir) else workdir
        local.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project, entity=entity or None, name=workdir.name, id=run_id,
            resume="allow", dir=str(local), config=config.to_dict(),
        )  # fmt: skip

    def scalars(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def image(self, step: int, tag: str, image_uint8: np.ndarray) -> None:
        self.run.log({tag: self.wandb.Image(image_uint8)}, step=step)

    def close(self) -> None:
        self.run.finish()
        self.wandb.teardown()  # waits for the writer: a quick exit can lose the run's log


class MetricWriter:
    """Scalars and images to every sink; a no-op off process 0."""

    def __init__(self, workdir: storage.Path, config=None):
        self.active = jax.process_index() == 0
        self.log_path = workdir / "metrics.jsonl"
        self.sinks = []
        if not self.active:
            return
        self.sinks = [_TensorBoard(workdir), _JsonLines(self.log_path)]
        logging = config.get("logging") if config is not None else None
        if logging is not None and logging.get("wandb"):
            self.sinks.append(_Wandb(workdir, config, logging.wandb, logging.get("wandb_entity")))

    def scalars(self, step: int, values: dict) -> None:
        clean = {k: float(v) for k, v in values.items()}
        for sink in self.sinks:
            sink.scalars(step, clean)

    def image(self, step: int, tag: str, image_uint8: np.ndarray) -> None:
        for sink in self.sinks:
            sink.image(step, tag, image_uint8)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
