"""Orbax checkpoints of a train state, its data-iterator position and its architecture.

Each checkpoint holds three items: `state` (the sharded train-state pytree), `data` (the
iterator position, JSON) and `meta` (stage and model config, JSON). Before restoring a
state we compare `meta` with the current config, so a workdir that belongs to another
architecture is reported, never silently overwritten or restarted.

A weights checkpoint (`save_weights`: what an import writes) holds only some fields of
the state, its weights; `meta[WEIGHTS_ONLY]` names them. Restoring one reads those fields
and has the task make the rest (optimizer moments, EMA, counters) from them, so that an
import neither holds nor writes gigabytes of zeros and copies.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import threading

import jax
import orbax.checkpoint as ocp

from ldm_jax import storage
from ldm_jax.errors import UserError


class CheckpointMismatchError(UserError):
    """The workdir holds checkpoints of a different stage or architecture."""


class CorruptCheckpointError(UserError):
    """A checkpoint exists but cannot be read."""


# Model settings that change how a step runs, not which parameters exist: a run may
# resume with other values (e.g. bf16 compute or rematerialisation on a smaller device).
RUNTIME_MODEL_KEYS = ("dtype", "remat", "attention_impl")


def architecture(config) -> dict:
    """What must match for a checkpoint to be resumable with this config."""
    arch = {"stage": config.stage, "model": json.loads(config.model.to_json())}
    if "cond" in config:
        arch["cond"] = json.loads(config.cond.to_json())
    return _without_runtime_keys(arch)


def _without_runtime_keys(arch: dict) -> dict:
    model = {k: v for k, v in arch.get("model", {}).items() if k not in RUNTIME_MODEL_KEYS}
    return {**arch, "model": model}


def metadata(config) -> dict:
    """The `meta` item: the architecture (compared on resume) and the whole config (read
    by commands that rebuild a run from its checkpoint, e.g. sampling)."""
    return {**architecture(config), "config": json.loads(config.to_json())}


WEIGHTS_ONLY = "weights_only"  # meta key: the state fields a weights checkpoint holds
# An import writes 1 GB at a time: orbax's default concurrency held 2.7 GB of an SD-1.5
# UNet's 3.4 GB in write buffers at once (bench/import_memory.py).
IMPORT_CONCURRENT_GB = 1
TRASH = "_deleted"  # a local run's retired steps, renamed here before they are removed


class Checkpointer:
    def __init__(
        self,
        directory,
        *,
        keep: int,
        async_save: bool = True,
        read_only: bool = False,
        save_concurrent_gb: int = 96,
    ):
        """`save_concurrent_gb` bounds the bytes orbax writes at once: its default (96)
        suits training hosts; IMPORT_CONCURRENT_GB keeps an import's peak near its weights'."""
        self.directory = storage.path(directory)  # a local path or a gs:// URL
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not read_only,
            enable_async_checkpointing=async_save,
            read_only=read_only,
            save_decision_policy=None,
            # orbax retires old steps itself, in a background thread. Locally it first
            # renames each into TRASH (atomic): a kill in the middle of deleting one then
            # leaves no half-deleted step among the listed ones (seen in the SIGKILL
            # drill: a step with its state but no metadata). On GCS it deletes them, and a
            # step without its commit marker is not listed.
            enable_background_delete=not read_only,
            todelete_subdir=None if read_only else TRASH,
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(save_concurrent_gb=save_concurrent_gb),
            "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )
        self._emptying = None
        self._empty_trash()

    def read_metadata(self, step: int) -> dict:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return meta["meta"]

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _empty_trash(self) -> None:
        """Removes the local steps orbax retired into TRASH, in a thread (off the step)."""
        if self.read_only or jax.process_index() != 0 or storage.is_remote(self.directory):
            return
        if self._emptying is not None and self._emptying.is_alive():
            return
        trash = self.directory / TRASH
        if trash.exists():
            # ignore_errors: orbax may rename another step in while this one runs
            remove = functools.partial(shutil.rmtree, os.fspath(trash), ignore_errors=True)
            self._emptying = threading.Thread(target=remove, daemon=True)
            self._emptying.start()

    def save(self, step: int, state, data_state: dict, config, *, force: bool = False) -> bool:
        self._empty_trash()  # the steps an earlier save retired
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(metadata(config)),
        )
        return self.manager.save(step, args=args, force=force)

    def save_weights(self, step: int, weights: dict, data_state: dict, config) -> None:
        """A checkpoint of the state fields in `weights` alone ({field: value}, e.g. a
        diffusion state's params and scale_factor); `restore` makes the others."""
        meta = {**metadata(config), WEIGHTS_ONLY: sorted(weights)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(weights),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, force=True)

    @classmethod
    def write_weights(cls, directory, weights: dict, data_state: dict, config) -> None:
        """Step 0 of a new run made from imported `weights` (see save_weights)."""
        run = cls(directory, keep=3, async_save=False, save_concurrent_gb=IMPORT_CONCURRENT_GB)
        run.save_weights(0, weights, data_state, config)
        run.close()

    def check_compatible(self, step: int, config) -> None:
        path = self.directory / str(step)
        try:
            meta = self.read_metadata(step)
        except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable files
            raise CorruptCheckpointError(
                f"checkpoint {path} cannot be read ({type(e).__name__}: {e}). Nothing was "
                "changed: move it aside (or delete it) to resume from an earlier step, or "
                "choose another --workdir."
            ) from e
        want = architecture(config)
        meta = {k: v for k, v in meta.items() if k not in ("config", WEIGHTS_ONLY)}
        meta = _without_runtime_keys(meta)
        if meta != want:
            diffs = _diff(meta, want)
            raise CheckpointMismatchError(
                f"the workdir checkpoint {path} was written for a different architecture "
                f"({'; '.join(diffs[:5])}). Use a new --workdir, or restore the original "
                "config to resume it; nothing in the workdir was changed."
            )

    def restore(self, step: int, abstract_state, complete=None):
        """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs).
        A weights checkpoint restores its fields of `abstract_state` only, and
        `complete({field: value})` makes the whole state from them."""
        path = self.directory / str(step)
        try:
            fields = self.read_metadata(step).get(WEIGHTS_ONLY)
            target = abstract_state
            if fields is not None:
                target = {name: getattr(abstract_state, name) for name in fields}
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpointError(
                f"checkpoint {path} cannot be restored ({type(e).__name__}: {e}). Nothing was "
                "changed: move it aside (or delete it) to resume from an earlier step, or "
                "choose another --workdir."
            ) from e
        if fields is None:
            return out["state"], out["data"]
        if complete is None:
            raise UserError(f"checkpoint {path} holds weights only; this reader needs a full state")
        return complete(out["state"]), out["data"]

    def restore_fields(self, step: int, fields: dict, abstract_state, from_weights):
        """Some fields of the state at `step` (`fields`: {name: abstract subtree with
        shardings}, a partial tree of the state), read without the others: inference
        opens a run without its optimizer moments. A weights checkpoint is read whole
        (`abstract_state` names its fields' shapes) and `from_weights({field: value})`
        makes the fields from it."""
        path = self.directory / str(step)
        weights = self.read_metadata(step).get(WEIGHTS_ONLY)
        if weights is not None:
            return from_weights(self.restore(step, abstract_state, lambda w: w)[0])
        try:
            reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
            args = ocp.args.PyTreeRestore(
                fields,
                restore_args=ocp.checkpoint_utils.construct_restore_args(fields),
                partial_restore=True,
            )
            return reader.restore(path / "state", args=args)
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpointError(
                f"checkpoint {path} cannot be restored ({type(e).__name__}: {e}). Nothing was "
                "changed: move it aside (or delete it) to restore an earlier step."
            ) from e

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()  # waits for orbax's deletions
        if self._emptying is not None:
            self._emptying.join()
        self._empty_trash()
        if self._emptying is not None:
            self._emptying.join()


def _diff(have, want, prefix="") -> list[str]:
    if isinstance(have, dict) and isinstance(want, dict):
        out = []
        for k in sorted(set(have) | set(want)):
            out += _diff(have.get(k), want.get(k), f"{prefix}{k}.")
        return out
    if have != want:
        return [f"{prefix.rstrip('.')}: checkpoint {have!r}, config {want!r}"]
    return []


def abstract_with_shardings(tree, shardings):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
