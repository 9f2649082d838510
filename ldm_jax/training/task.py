"""The task interface: what the training loop, the evaluator, the commands and the latent
cache ask of a stage. Both stages (`AutoencoderTask`, `DiffusionTask`) subclass `Task`;
the optional hooks default to doing nothing, so the loop never probes a task.

    state       init_state(rng) -> boxed state (logical axes; the loop shards it)
                state_specs -> logical PartitionSpecs of the state (FSDP compute gather)
    data        device_batch(host batch, with_mask) -> the arrays the step takes
                train_source(mesh_run) -> a data source other than the dataset, or None
    steps       train_step(state, batch, rng, frozen) -> (state, metrics), pure
                eval_step(state, batch, frozen) -> {metric: [B]} per example
                initialize_from_batch(state, batch, frozen, rng) -> state (fresh runs)
                state_from_weights({field: value}) -> the whole state of a weights
                checkpoint's fields (an import's; optimizer moments made here)
                inference_fields(state) -> {field: subtree} sampling and evaluation read;
                inference_state(fields) -> a state of those alone (the rest None)
    frozen      frozen_params() -> host pytree of weights the steps read, never train
    outputs     sample_grid(state, batch, rows, frozen) -> rows of uint8 images
                grid_captions(batch, rows) -> a caption per grid column, or None
    checks      validate(): bad settings raise UserError before any work
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from ldm_jax.errors import UserError
from ldm_jax.parallel import mesh as mesh_lib

STAGES = ("autoencoder", "diffusion")


class Task:
    stage: str = ""
    state_type: type  # the stage's state dataclass

    def __init__(self, config):
        self.config = config

    # ----- required ------------------------------------------------------------------------
    def init_state(self, rng):
        raise NotImplementedError

    def train_step(self, state, batch, rng, frozen):
        raise NotImplementedError

    def eval_step(self, state, batch, frozen) -> dict:
        raise NotImplementedError

    def device_batch(self, batch: dict, with_mask: bool = False) -> dict:
        raise NotImplementedError

    def sample_grid(self, state, batch, rows: int, frozen) -> list:
        raise NotImplementedError

    # ----- optional hooks ------------------------------------------------------------------
    def grid_captions(self, batch, rows: int) -> list[str] | None:
        return None

    def validate(self) -> None:
        """Raises UserError for settings the task cannot train with. Subclasses add
        their own checks and call this one."""
        config = self.config
        for name, value, low in (
            ("config.optim.base_learning_rate", config.optim.base_learning_rate, 0.0),
            ("config.batch_size", config.batch_size, 0),
        ):
            if not value > low:
                raise UserError(f"{name}={value} must be positive; set a value above {low}.")
        if config.train.num_steps < 0:
            raise UserError(
                f"config.train.num_steps={config.train.num_steps} must be >= 0 (0 only "
                "initialises and saves the run)."
            )

    def frozen_params(self) -> dict:
        return {}

    def state_from_weights(self, weights: dict):
        """The state of a weights checkpoint's fields (`Checkpointer.save_weights`)."""
        raise UserError(f"a {self.stage} run's checkpoints hold whole states, not weights only")

    def inference_fields(self, state) -> dict:
        """The state's fields that sampling and evaluation read ({name: subtree}, a partial
        tree of the state: it also selects from an abstract state or its shardings).
        Opening a run for inference restores these alone, not the optimizer moments
        (default: every field)."""
        return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}

    def inference_state(self, fields: dict):
        """A state object holding `fields` (`inference_fields`), the others None."""
        fields_of_state = dataclasses.fields(self.state_type)
        return self.state_type(**{f.name: fields.get(f.name) for f in fields_of_state})

    def train_source(self, mesh_run):
        """A training source that replaces the dataset's (e.g. a latent cache), or None."""
        return None

    def initialize_from_batch(self, state, batch, frozen, rng):
        """A fresh state's settings taken from the first training batch (default: none);
        the loop rewinds the iterator, so training still starts with that batch."""
        return state

    @property
    def uses_first_batch(self) -> bool:
        """Whether `initialize_from_batch` reads the batch (else the loop skips it)."""
        return False

    @functools.cached_property
    def state_specs(self):
        """Logical PartitionSpecs of the state (for the FSDP compute gather)."""
        return mesh_lib.logical_specs(jax.eval_shape(self.init_state, jax.random.PRNGKey(0)))

    def for_compute(self, tree, *path: str):
        """`tree`, the state's field at `path` (e.g. "params", "unet"), in its compute
        layout: whole over fsdp, still split over tensor, so XLA all-gathers it for the
        forward pass and reduce-scatters its gradient."""
        specs = self.state_specs
        for name in path:
            specs = specs[name] if isinstance(specs, dict) else getattr(specs, name)
        return mesh_lib.gather_for_compute(tree, specs)


def make_task(config) -> Task:
    if config.stage == "autoencoder":
        from ldm_jax.training.autoencoder import AutoencoderTask

        return AutoencoderTask(config)
    if config.stage == "diffusion":
        from ldm_jax.training.diffusion import DiffusionTask

        return DiffusionTask(config)
    raise UserError(f"unknown config.stage {config.stage!r}; valid: {list(STAGES)}")
