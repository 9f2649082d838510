"""Joining the processes of a multi-host job, before anything else touches JAX devices.

Where the coordinates come from, first match wins:
1. the config (`config.distributed.coordinator_address` / `num_processes` / `process_id`);
2. the environment the project's launchers set (LDM_JAX_COORDINATOR, LDM_JAX_NUM_PROCESSES,
   LDM_JAX_PROCESS_ID; see launch/);
3. a cluster JAX detects itself: SLURM with more than one task, a multi-host TPU slice;
4. otherwise this is a single-process run and nothing is initialised.
`heartbeat_timeout_s` bounds how long survivors wait on a dead peer before they exit non-zero.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from ldm_jax.errors import UserError

ENV_COORDINATOR = "LDM_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "LDM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LDM_JAX_PROCESS_ID"


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            coordinator_address=ml_collections.FieldReference(None, field_type=str),
            num_processes=ml_collections.FieldReference(None, field_type=int),
            process_id=ml_collections.FieldReference(None, field_type=int),
            initialization_timeout_s=300,
            heartbeat_timeout_s=30,
        )
    )


def _cluster_detected() -> str | None:
    env = os.environ
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
        return "SLURM"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU"
    return None


def coordinates(dist_cfg) -> dict | None:
    """The explicit (address, count, id) if the config or launcher gives them, {} for an
    auto-detected cluster, None for a single-process run."""
    env = os.environ
    addr = dist_cfg.coordinator_address or env.get(ENV_COORDINATOR)
    count = dist_cfg.num_processes or env.get(ENV_NUM_PROCESSES)
    pid = dist_cfg.process_id if dist_cfg.process_id is not None else env.get(ENV_PROCESS_ID)
    given = {"coordinator_address": addr, "num_processes": count, "process_id": pid}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise UserError(
                f"distributed run: {', '.join(missing)} not given (have {given}); set all three "
                f"of config.distributed.coordinator_address/num_processes/process_id or "
                f"{ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}, or none on a "
                "SLURM / TPU cluster that JAX detects."
            )
        count, pid = int(count), int(pid)
        if not 0 <= pid < count:
            raise UserError(f"process_id {pid} is not in [0, num_processes={count}).")
        return {"coordinator_address": addr, "num_processes": count, "process_id": pid}
    return {} if _cluster_detected() else None


def initialize(dist_cfg=None) -> bool:
    """Joins the job (idempotent); returns whether this is a multi-process run."""
    dist_cfg = dist_cfg if dist_cfg is not None else default_config()
    coords = coordinates(dist_cfg)
    if coords is None:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.distributed.initialize(
        **coords,
        initialization_timeout=int(dist_cfg.initialization_timeout_s),
        heartbeat_timeout_seconds=int(dist_cfg.heartbeat_timeout_s),
    )
    return True
